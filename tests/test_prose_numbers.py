"""Every measured number in the docs' prose is one of the result files it cites (issue 24, item 5).

The rendered tables are checked by test_docs_numbers.py; this checks the sentences around them. Per section
(a heading to the next), the result files it names (``benchmarks/results/...`` paths, file names such as
``claims.md`` or folders such as ``sweep_addition_5seeds/``, in backticks) form its pool of numbers; every decimal
number in its prose (at least two decimal places, e.g. 0.84, -0.016, 3.1e-04) must equal a pool number rounded
to the places it is written with (or a pool share written as a percentage). Settings and code (anything in
backticks, code blocks), formulas (``$...$``) and integers (counts, MB) are not checked.
"""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOKS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "notebooks").glob("*.ipynb"))
FENCED = re.compile(r"```.*?```", re.S)
CODE = re.compile(r"`[^`]*`")
ARXIV = re.compile(r"arXiv[ :]\S+")
MATH = re.compile(r"\$[^$]+\$")
PROSE_NUMBER = re.compile(r"(?<![\w.+\-/])[+-]?\d+\.\d{2,}(?:e[+-]?\d+)?(?!\w|\.\d)|(?<![\w.+\-/])[+-]?\d\.\de[+-]?\d+")
FILE_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?")
RESULT_SUFFIXES = {".md", ".csv", ".json"}


def result_files() -> list[Path]:
    return [p for p in RESULTS.rglob("*") if p.is_file() and p.suffix in RESULT_SUFFIXES]


def cited_files(section: str, every: list[Path]) -> set[Path]:
    """The result files a section names in backticks: a path under ``benchmarks/results/``, a folder there, or a
    file name (every result file ending with it)."""
    files: set[Path] = set()
    for span in re.findall(r"`([^`]+)`", section):
        for token in re.split(r"[\s,]+", span.replace("benchmarks/results/", "")):
            token = token.strip("()`").rstrip("/")
            if not token or token.startswith(("/", ".", "~")) or any(c in token for c in "*{<"):
                continue
            target = RESULTS / token
            if target.is_dir():
                files |= {p for p in target.rglob("*") if p.is_file() and p.suffix in RESULT_SUFFIXES}
            elif target.is_file():
                files.add(target)
            elif "." in token:
                files |= {p for p in every if p.as_posix().endswith("/" + token)}
    return files


def pool(files: set[Path]) -> list[float]:
    return [float(n) for f in files for n in FILE_NUMBER.findall(f.read_text(encoding="utf-8", errors="ignore"))]


def written_as(text: str, values: list[float]) -> bool:
    """Whether a value of ``values`` reads ``text`` at the precision ``text`` is written with (a share may be
    written as a percentage of it)."""
    mantissa, _, exponent = text.partition("e")
    places = len(mantissa.split(".")[1]) if "." in mantissa else 0
    tolerance = 0.5 * 10 ** -places + 1e-12
    if exponent:
        scale = 10.0 ** int(exponent)
        return any(abs(v / scale - float(mantissa)) <= tolerance for v in values)
    number = float(text)
    return any(abs(v - number) <= tolerance or abs(100 * v - number) <= tolerance for v in values)


def sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{1,6} )", text)


def unsupported(text: str, every: list[Path]) -> list[str]:
    """``heading: number`` for each prose number that no file its section cites holds."""
    missing = []
    for section in sections(FENCED.sub("", render_docs.BLOCK.sub("", text))):
        values = pool(cited_files(section, every))
        prose = MATH.sub("", ARXIV.sub("", CODE.sub("", section)))
        missing += [f"{section.strip().splitlines()[0][:60]}: {number}" for number in PROSE_NUMBER.findall(prose)
                    if not written_as(number, values)]
    return missing


def markdown_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", render_docs.DOCS + NOTEBOOKS)
def test_every_prose_number_is_in_a_result_file_it_cites(doc):
    assert unsupported(markdown_of(ROOT / doc), result_files()) == []


def test_a_number_its_files_do_not_hold_is_caught(tmp_path):
    table = RESULTS / "claims.csv"
    measured = next(n for n in FILE_NUMBER.findall(table.read_text(encoding="utf-8")) if re.fullmatch(r"\d\.\d{3,}", n))
    held = f"{float(measured):.3f}"
    other = f"{float(measured) + 0.0123:.3f}"
    assert unsupported(f"## A\n\nFrom `claims.csv`: {held}.\n", result_files()) == []
    assert unsupported(f"## A\n\nFrom `claims.csv`: {other}.\n", result_files()) == [f"## A: {other}"]
    assert unsupported(f"## A\n\nNo file named: {held}.\n", result_files()) == [f"## A: {held}"]
    assert unsupported("## A\n\nA setting in code, `0.37`, and an id, arXiv 2506.12015.\n", result_files()) == []
