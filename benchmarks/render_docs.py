"""Render the result tables quoted in the docs from their result files, so no table is typed by hand:

    python benchmarks/render_docs.py            # rewrite every marked block
    python benchmarks/render_docs.py --check    # exit 1 and name the blocks that differ (a test runs this)

A block in a Markdown file is marked as

    <!-- rendered from benchmarks/results/sweep_addition/gap.md -->
    | ... the first table of that file ... |
    <!-- end rendered -->
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "benchmarks/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- rendered from (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S)


def first_table(path: Path) -> str:
    """The first Markdown table of a result file (its header, rule and rows)."""
    lines, table = path.read_text(encoding="utf-8").splitlines(), []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    if not table:
        raise ValueError(f"{path} holds no Markdown table")
    return "\n".join(table) + "\n"


def render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + first_table(ROOT / m.group("source")) + m.group(4), text)


def stale_blocks() -> list[str]:
    """``doc: source`` for every block whose text is not its source's table."""
    stale = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            if match.group("body") != first_table(ROOT / match.group("source")):
                stale.append(f"{doc}: {match.group('source')}")
    return stale


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_blocks()
        for block in stale:
            print(f"differs from its file: {block} (run python benchmarks/render_docs.py)")
        return 1 if stale else 0
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text(encoding="utf-8")
        if render(text) != text:
            path.write_text(render(text), encoding="utf-8")
            print("rendered", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
