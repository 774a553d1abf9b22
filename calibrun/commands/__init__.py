"""The console scripts, one module each, named after the command: ``calibrun``
(:mod:`calibrun.commands.calibrun`), ``calibrun-calibrate``, ``calibrun-evaluate``,
``calibrun-report`` and ``calibrun-pack``. Each parses its arguments, calls the library
and turns a user's mistake into one line and exit status 1 (:mod:`._console`)."""
