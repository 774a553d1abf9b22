"""The end of a sweep: one line per job that failed or was interrupted, and the exit status.

A Hydra callback (``hydra.callbacks`` in conf/config.yaml). Jobs never raise into Hydra
(which would end the sweep with a traceback); each records its state in its own
``status.json``, which this reads, so it works for every launcher.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from calibrun.runfolder import STATUS, resume_command


# Jobs this process refused or saw fail before they wrote a status.json (a folder holding
# another config, say): (run folder, message). Launchers that run jobs in this process
# (the basic one) report them here; the others through status.json alone.
REFUSED: list[tuple[Path, str]] = []


class SweepSummary(Callback):
    """Lists the jobs of this sweep that did not finish and exits 1 if there are any."""

    def __init__(self) -> None:
        self.start = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        unfinished = []
        for status_file in sorted(Path(str(config.hydra.sweep.dir)).glob(f"**/{STATUS}")):
            if status_file.stat().st_mtime < self.start - 1:
                continue  # a job of an earlier sweep into the same folder
            try:
                status = json.loads(status_file.read_text())
            except (OSError, ValueError):
                status = {"state": "unreadable status.json"}
            if status.get("state") not in ("done", "running"):
                unfinished.append((status_file.parent.resolve(), status.get("state"), status.get("error")))
        seen = {folder for folder, _, _ in unfinished}
        unfinished += [(folder.resolve(), "refused", message) for folder, message in REFUSED if folder.resolve() not in seen]
        REFUSED.clear()
        if not unfinished:
            return
        # Printed, not logged: after the last job, logging is still that job's set-up.
        for folder, state, error in unfinished:
            print(f"{state} job {folder}: {error}", file=sys.stderr)
        # The default run_name is a timestamp: the same command again would start afresh.
        print(f"{len(unfinished)} job(s) of the sweep did not finish. Resume them (the finished ones are "
              f"skipped) with: {resume_command(sys.argv[1:], str(config.run_name))}", file=sys.stderr)
        sys.exit(1)
