"""``calibrun-pack ROOT OUT.npz``: an image folder packed into one file
(:mod:`calibrun.data.packed`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calibrun import UserError
from calibrun.data import packed
from calibrun.data.packed import pack_folder


def main(argv: list[str] | None = None) -> int:
    """``calibrun-pack ROOT OUT.npz``: pack an image folder."""
    parser = argparse.ArgumentParser(prog="calibrun-pack", description=packed.__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder with train/<class>/* and test/<class>/*")
    parser.add_argument("out", type=Path, help="the packed file to write (.npz)")
    args = parser.parse_args(argv)
    try:
        counts = pack_folder(args.root, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size / 2**20
    print(f"Packed {counts['train']} train and {counts['test']} test images into {args.out} ({size:.1f} MiB).")
    return 0
