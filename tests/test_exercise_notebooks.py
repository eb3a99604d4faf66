"""The exercise notebooks: every exercise cell follows the convention, and the solved notebooks pass every check.

The unsolved notebooks run under nbval like the others (their checks print ❌ lines, never raise); here the
solved copies (``python -m emloc.exercises solve``) run in a kernel and must print only ✅ lines.
"""
from pathlib import Path

import nbformat
import pytest

from emloc import exercises

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("0[1-48]_*.ipynb"))
WITH_EXERCISES = [nb for nb in NOTEBOOKS if exercises.exercise_ids(nbformat.read(nb, as_version=4))]


def _ids(paths):
    return [p.stem[:2] for p in paths]


def test_exercise_cells_follow_the_convention():
    """Known ids, each once, each followed by a cell that calls its check, and a solution for each."""
    solutions = exercises.read_solutions()
    seen = []
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for index, cell in enumerate(cells):
            match = exercises.EXERCISE_HEADER.match(cell.source.split("\n", 1)[0]) if cell.cell_type == "code" else None
            if not match:
                continue
            exercise_id = match.group("id")
            assert exercise_id in exercises.CHECKS, f"{path.name}: unknown exercise id {exercise_id!r}"
            assert exercise_id in solutions, f"{path.name}: exercise {exercise_id!r} has no solution"
            following = cells[index + 1] if index + 1 < len(cells) else None
            check = exercises.CHECKS[exercise_id].__name__
            assert following is not None and check in following.source, \
                f"{path.name}: the cell after '# EXERCISE {exercise_id}' must call {check}(...)"
            seen.append(exercise_id)
    assert len(seen) == len(set(seen)), f"an exercise id is used twice: {seen}"


@pytest.mark.integration
@pytest.mark.parametrize("path", WITH_EXERCISES, ids=_ids(WITH_EXERCISES))
def test_solved_notebook_passes_every_check(path, tmp_path):
    from nbclient import NotebookClient
    (solved_path,) = exercises.solve_files([path], tmp_path)
    notebook = nbformat.read(solved_path, as_version=4)
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    lines = [line for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
             if output.get("output_type") == "stream" for line in output.get("text", "").splitlines()]
    failed = [line for line in lines if line.startswith("❌")]
    assert not failed, failed
    assert sum(line.startswith("✅") for line in lines) >= len(exercises.exercise_ids(notebook))


def test_some_notebook_has_exercises_or_skip():
    if not WITH_EXERCISES:
        pytest.skip("no notebook has '# EXERCISE <id>' cells yet (docs/teaching.md, 'Writing an exercise')")
    assert set(exercises.CHECKS) >= {i for nb in WITH_EXERCISES for i in exercises.exercise_ids(nbformat.read(nb, as_version=4))}
