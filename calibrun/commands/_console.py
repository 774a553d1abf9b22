"""What every command shares: its console (progress on stdout, errors alone on stderr)
and the one policy that turns a user's mistake into one line and exit status 1."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from calibrun import UserError

log = logging.getLogger("calibrun")
# Errors of a folder calibrun cannot write to: permission denied, read-only file system, disk full.
WRITE_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


class BelowError(logging.Filter):
    """Lets through records below ERROR: the console shows progress on stdout and errors
    on stderr only (conf/config.yaml, hydra.job_logging)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def console_logging() -> None:
    """The companion commands' console: progress and results on stdout (so that
    ``calibrun-report ... > table.md`` captures the table), errors alone on stderr."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(BelowError())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.ERROR)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[out, err])


@contextmanager
def mistakes_exit(folder: Path | None, write_hint: str = "") -> Iterator[None]:
    """A user's mistake inside the block (a UserError, or a config the composition itself
    rejects) is logged as one line and exits 1; so is a folder that cannot be written
    (``folder``: the one named when the error names none). Anything else is a bug and
    keeps its traceback."""
    try:
        yield
    except (UserError, HydraException, OmegaConfBaseException) as err:
        # Hydra's and OmegaConf's messages can span lines; an error stays one line.
        log.error("%s", "; ".join(line.strip() for line in str(err).splitlines() if line.strip()))
        sys.exit(1)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        hint = f" {write_hint}" if write_hint else ""
        log.error("Cannot write %s: %s.%s", err.filename or folder, err.strerror, hint)
        sys.exit(1)
