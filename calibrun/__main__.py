"""``python -m calibrun`` is the ``calibrun`` command."""

from calibrun.commands.calibrun import main

main()
