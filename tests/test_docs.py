"""The documentation's code runs and its links lead somewhere.

Every fenced code block of README.md and docs/**/*.md that is marked runnable is executed
here, offline and on the CPU, in a temporary folder that holds the demo's real logits
(tests/fixtures/demo_logits) under the names the examples read. The mark is an HTML
comment on the line just before the fence, invisible on GitHub and on the site:

    <!-- run -->
    ```python
    ...
    ```

Only ```python blocks can be marked. Blocks that train, download or need a run folder
(the bash blocks) are not marked and not run. ``make docs`` (mkdocs build --strict) checks
the site's links and anchors; the tests below check the same for the Markdown sources, so
that ``make test`` catches a broken link too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_LOGITS = Path(__file__).resolve().parent / "fixtures" / "demo_logits"
RUN_MARK = "<!-- run -->"
# An opening fence (CommonMark: a backtick fence's info string holds no backtick).
FENCE = re.compile(r"^(`{3,}(?=[^`]*$)|~{3,})\s*([^\s`]*)")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    marked: bool
    source: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file (top-level fences, as GitHub and the site
    read them), each with whether the line before its fence is the run mark."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.group(1), opening.group(2).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        assert end is not None, f"{path.relative_to(REPO)}:{i + 1}: the code block never closes"
        marked = i > 0 and lines[i - 1].strip() == RUN_MARK
        blocks.append(Block(path, i + 1, language, marked, "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in documents() for block in code_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.marked]


def test_the_run_mark_precedes_only_python_blocks_and_nothing_else():
    for path in documents():
        lines = path.read_text().split("\n")
        for i, line in enumerate(lines):
            if line.strip() == RUN_MARK:
                following = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
                where = f"{path.relative_to(REPO)}:{i + 1}"
                assert following, f"{where}: {RUN_MARK} must sit on the line just before a code fence"
                assert following.group(2).lower() == "python", f"{where}: only python blocks can be run"


def test_the_library_examples_are_marked_runnable():
    """The examples on the demo's logits run here; losing their mark would drop them silently."""
    marked = {block.path.relative_to(REPO).as_posix() for block in RUNNABLE}
    assert {"docs/guide/own-logits.md", "docs/guide/own-components.md", "docs/api/index.md"} <= marked


@pytest.fixture
def example_folder(tmp_path, monkeypatch):
    """A working folder with the demo's real logits as the examples read them: val.npz and
    test.npz (``logits``, ``labels``) and {val,test}_{logits,labels}.npy."""
    for split in ("val", "test"):
        shutil.copy(DEMO_LOGITS / f"{split}.npz", tmp_path / f"{split}.npz")
        with np.load(DEMO_LOGITS / f"{split}.npz") as data:
            np.save(tmp_path / f"{split}_logits.npy", data["logits"])
            np.save(tmp_path / f"{split}_labels.npy", data["labels"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_runnable_block_runs(block: Block, example_folder: Path, capsys):
    namespace = {"__name__": "__docs__"}
    exec(compile(block.source, block.name, "exec"), namespace)
    if "print(" in block.source:
        assert capsys.readouterr().out.strip(), f"{block.name} printed nothing"
    if "reliability.png" in block.source:
        assert (example_folder / "reliability.png").stat().st_size > 10_000


# Links: [text](target) outside code, relative targets only.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The file without its fenced code blocks and inline code spans."""
    lines = path.read_text().split("\n")
    for block in code_blocks(path):
        n = block.source.count("\n")
        for j in range(block.line - 1, block.line + n + 1):
            lines[j] = ""
    return re.sub(r"`[^`\n]*`", "", "\n".join(lines))


def _slug(heading: str) -> str:
    """GitHub's and the site's anchor of a heading (both drop punctuation, lowercase and
    join words with hyphens for the headings used here)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _prose(path), re.M)}


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_and_anchors_resolve(path: Path):
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{path.relative_to(REPO)}: broken links {broken}"
