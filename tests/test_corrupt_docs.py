"""docs/guide/corrupt.md's table of constants is the code's: one row per corruption, as
calibrun.corrupt holds them."""

from __future__ import annotations

from itertools import takewhile
from pathlib import Path

from calibrun.corrupt import corruptions

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "corrupt.md"


def _written(value: object) -> str:
    """A constant as the table writes it: tuples in parentheses, floats without trailing zeros."""
    if isinstance(value, tuple):
        return "(" + ", ".join(_written(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_guide_lists_every_corruption_with_the_codes_constants():
    lines = GUIDE.read_text().splitlines()
    start = lines.index("| corruption | draws | cifar (32×32) | imagenet (224×224) |") + 2
    rows = list(takewhile(lambda line: line.startswith("| `"), lines[start:]))
    by_name = {row.split("`")[1]: row for row in rows}
    assert list(by_name) == list(corruptions()), "the table's rows are the corruptions, in the code's order"
    for name, corruption in corruptions().items():
        cells = [cell.strip() for cell in by_name[name].strip("|").split("|")]
        assert cells[1] == ("random" if corruption.random else "none"), name
        for cell, recipe in zip(cells[2:], ("cifar", "imagenet")):
            assert cell == "; ".join(_written(c) for c in corruption.params[recipe]), (name, recipe)
