"""``python -m calibrun`` is the ``calibrun`` command."""

from calibrun.cli import main

main()
