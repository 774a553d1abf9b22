"""Atomic file writes: results, checkpoints and figures are never seen half-written."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

# The name atomic_open gives its temporary file: .<name>.<pid>.<8 hex>.tmp
_TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


@contextmanager
def atomic_open(path: Path | str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` when the
    block ends without an error, delete it otherwise.

    The file is created with ``open(..., "x")``, which honours the umask (tempfile's
    0600 would hide results from the other users of a shared run folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_torch_save(obj: object, path: Path | str) -> None:
    """``torch.save`` through :func:`atomic_open`."""
    import torch  # here, so that the command line's config check does not load torch

    with atomic_open(path) as fh:
        torch.save(obj, fh)


def remove_stale_temp_files(folder: Path | str) -> int:
    """Delete the temporary files of atomic writes that a killed process left below
    ``folder`` (``.<name>.<pid>.<8 hex>.tmp``); returns how many there were."""
    stale = [p for p in Path(folder).rglob(".*.tmp") if _TEMP_NAME.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
