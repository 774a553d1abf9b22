"""How long a run will take: an estimate logged early, from the first timed batches, so
that a run sized for a GPU is recognised on a CPU before it has cost an hour."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("calibrun")

# The first batches pay for memory allocation, cuDNN's autotuning and torch.compile's
# tracing; they are left out of the timing.
WARMUP_BATCHES = 2
# Seconds of timed batches the estimate is made from: long enough to average out a noisy
# machine, short enough to come before a user gives up waiting.
TIMED_SECONDS = 10.0


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h`` or ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def run_eta(history: list[dict], epochs_left: int) -> str:
    """`` (run ETA 12:34)`` from the mean time of the epochs done so far, or nothing yet."""
    if not history:
        return ""
    minutes, seconds = divmod(int(epochs_left * sum(h["seconds"] for h in history) / len(history)), 60)
    return f" (run ETA {minutes}:{seconds:02d})"


class DurationEstimate:
    """Logs the expected training time once: from the batches timed after the warm-up
    in the first epoch, or, if that epoch ends sooner, from the second epoch's time
    (validation included; the first one's holds the warm-up).

    ``synchronize`` waits for the device's queued work (``torch.cuda.synchronize`` on a
    GPU), so that the clock measures computation and not how fast kernels were queued.
    """

    def __init__(self, batches_left: int, batches_per_epoch: int, synchronize: Callable[[], None]) -> None:
        self.batches_left = batches_left
        self.batches_per_epoch = batches_per_epoch
        self.synchronize = synchronize
        self.batches_seen = 0
        self.epochs_seen = 0
        self.started: float | None = None
        self.done = batches_left <= 0  # nothing left to train, nothing to estimate

    def batch_done(self) -> None:
        """Called after each training batch."""
        if self.done or self.epochs_seen:
            return
        self.batches_seen += 1
        if self.batches_seen == WARMUP_BATCHES:
            self.synchronize()
            self.started = time.perf_counter()
        elif self.started is not None and time.perf_counter() - self.started >= TIMED_SECONDS:
            self.synchronize()
            timed = self.batches_seen - WARMUP_BATCHES
            per_batch = (time.perf_counter() - self.started) / timed
            batches = self.batches_left - self.batches_seen
            self._report(per_batch * batches, batches / self.batches_per_epoch,
                         f"{per_batch:.3g} s per batch over {timed} batches; validation adds to it")

    def epoch_done(self, seconds: float, epochs_left: int) -> None:
        """Called after each epoch with its time, validation included."""
        self.epochs_seen += 1
        if not self.done and self.epochs_seen >= 2 and epochs_left > 0:
            self._report(seconds * epochs_left, epochs_left, f"the last epoch took {format_duration(seconds)}")

    def _report(self, seconds_left: float, epochs_left: float, basis: str) -> None:
        log.info("Expected training time: about %s more, for %s epoch(s) (%s).",
                 format_duration(seconds_left), f"{epochs_left:.3g}", basis)
        self.done = True
