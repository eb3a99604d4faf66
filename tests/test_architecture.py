"""The house keeps its floors: the floors table of docs/architecture.md and the layers contract of pyproject.toml
list the same modules on the same floors, every module of emloc sits on exactly one, and no import circles.
(`lint-imports`, run by `make test`, checks the imports against the contract itself.)"""
import re
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def contract_floors() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [{name.strip().removeprefix("emloc.") for name in re.split(r"[:|]", layer)} for layer in contract["layers"]]


def documented_floors() -> list[set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| floor (top to bottom)"):].split("\n\n")[0].splitlines()[2:]
    floors = [set(re.findall(r"`([a-z_]+)`", row.split("|")[3])) for row in table]
    return [floor for floor in floors if floor and "widgets" not in " ".join(floor)]


def emloc_modules() -> set[str]:
    return {path.stem if path.parent.name == "emloc" else path.parent.name
            for path in (ROOT / "emloc").rglob("*.py") if path.stem not in ("__init__", "__main__")}


def test_the_doc_and_the_contract_list_the_same_floors():
    assert documented_floors() == contract_floors()


def test_every_module_sits_on_exactly_one_floor():
    floors = contract_floors()
    placed = [name for floor in floors for name in floor]
    assert len(placed) == len(set(placed)), "a module is on two floors"
    assert set(placed) == emloc_modules()


def test_no_import_circles():
    graph = grimp.build_graph("emloc")
    modules = {m for m in graph.modules if m != "emloc"}
    edges = {m: {t for t in graph.find_modules_directly_imported_by(m) if t in modules} for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            assert state.get(target) != 1, " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
