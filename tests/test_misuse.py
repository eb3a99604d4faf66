"""Command-line misuse, exports and data hygiene (issue 19): every mistake is one line with its remedy, a
refused command creates or removes nothing (a sentinel folder beside the target), and data files are checked
for duplicates and test records that leak from training."""
import json

import nbformat
import pytest

from emloc import cli, export
from emloc.data import hygiene_line, load_user_data
from emloc.errors import EmlocError


def tree(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with a sentinel beside where the command would write."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_text("must survive")
    return tmp_path


def refused(place, argv, capsys, *fragments) -> str:
    """``emloc ARGV`` exits 2 with one stderr line holding every fragment, and changes nothing on disk."""
    before = tree(place)
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("emloc: error: "), err
    assert "usage:" not in captured.out + captured.err
    for fragment in fragments:
        assert fragment in err, err
    assert tree(place) == before
    return err


def test_a_misspelt_choice_names_the_flag_and_its_values(place, capsys):
    refused(place, ["run", "--out", "r", "--allocation", "globl"], capsys,
            "argument --allocation: invalid choice: 'globl'", "'uniform', 'global'", "see `emloc run --help`")


def test_choices_are_case_insensitive():
    args = cli.parser().parse_args(["run", "--out", "r", "--allocation", "Global", "--calibration", "SEQUENTIAL",
                                    "--preset", "Quick", "--correction-method", "Aligned"])
    assert (args.allocation, args.calibration, args.preset, args.correction_method) == ("global", "sequential", "quick", "aligned")
    assert cli.config_from_args(args).emulator.allocation == "global"


def test_a_flag_without_its_value_lists_the_values(place, capsys):
    refused(place, ["run", "--out", "r", "--calibration"], capsys,
            "argument --calibration: expected one argument (one of independent, sequential)")
    refused(place, ["run", "--out", "r", "--calibration", "--preset", "quick"], capsys, "expected one argument")


def test_a_value_that_starts_with_a_dash_reaches_its_check(place, capsys):
    spaced = refused(place, ["run", "--out", "r", "--memory-budget", "-1GB"], capsys, "memory_budget = '-1GB'")
    joined = refused(place, ["run", "--out", "r", "--memory-budget=-1GB"], capsys)
    assert spaced == joined


def test_other_parser_mistakes_are_one_line(place, capsys):
    refused(place, ["run", "--out", "r", "--ratio", "abc"], capsys, "argument --ratio: invalid float value: 'abc'")
    refused(place, ["run"], capsys, "required: --out")
    refused(place, ["bundle", "unpack"], capsys, "required: file", "emloc bundle unpack --help")
    refused(place, ["export", "--out", "x"], capsys, "required: notebooks")
    refused(place, ["run", "--out", "r", "--bogus"], capsys, "unrecognized arguments: --bogus: see `emloc run --help`")
    refused(place, ["bundle", "unpack", "b.tar.gz", "--bogus"], capsys, "see `emloc bundle unpack --help`")


def test_out_that_is_an_existing_file(place, capsys):
    (place / "afile").write_text("a file")
    refused(place, ["calibrate", "--out", "afile"], capsys, "run directory afile is a file")
    refused(place, ["export", "--out", "afile", "nb.ipynb"], capsys, "--out afile is a file")


def _notebook(path, source):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_export_writes_every_page_or_none_and_names_the_failing_notebook(place, capsys):
    good = _notebook(place / "good.ipynb", "print('fine')")
    bad = _notebook(place / "bad.ipynb", "open('no_such_results.json')")
    refused(place, ["export", "--out", "html", str(good), str(bad)], capsys,
            "a cell of", "bad.ipynb failed", "no_such_results.json", "no page was written")
    assert not (place / "html").exists()
    pages = export.export_notebooks([good], place / "html")
    assert [p.name for p in pages] == ["good.html"] and pages[0].read_text().startswith("<!DOCTYPE html>")


# ---- data hygiene -----------------------------------------------------------------------------------

def _jsonl(path, records):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in records))
    return path


def test_a_file_of_identical_records_is_refused(place):
    path = _jsonl(place / "same.jsonl", [("What is 2+2?", "4")] * 60)
    with pytest.raises(EmlocError, match=r"has 1 record\(s\) \(59 exact duplicate\(s\) removed\)") as error:
        load_user_data(path)
    assert "\n" not in str(error.value)


def test_duplicates_and_test_overlap_are_removed_and_counted(place):
    records = [(f"Q{i}", f"A{i}") for i in range(50)] + [("Q1", "A1")] * 5 + [(f"Q{i}", "other") for i in range(10)]
    path = _jsonl(place / "mixed.jsonl", records)
    data = load_user_data(path, n_test=100, seed=0)
    hygiene = data.source["hygiene"]
    assert hygiene["duplicates"] == 5 and hygiene["removed"]
    trained = {e.prompt for e in data.train} | {e.prompt for e in data.calibration}
    assert not any(e.prompt in trained for e in data.test)
    assert len(data.test) == 60 // 5 - hygiene["test_overlap"]
    assert len(set(data.train)) == len(data.train)
    kept = load_user_data(path, n_test=100, seed=0, keep_duplicates=True)
    assert len(kept.train) + len(kept.test) == 65 and kept.source["hygiene"]["removed"] is False
    line = hygiene_line(hygiene | {"truncated": 2, "max_length": 96})
    assert line.startswith("data: 5 exact duplicate record(s)") and "2 record(s) longer than data.max_length = 96" in line
    assert "\n" not in line and hygiene_line({"duplicates": 0, "test_overlap": 0, "truncated": 0}) is None


def test_every_test_prompt_in_training_is_refused(place):
    path = _jsonl(place / "leaky.jsonl", [(f"Q{i % 2}", f"A{i}") for i in range(10)])
    with pytest.raises(EmlocError, match="every test record's prompt also occurs in training"):
        load_user_data(path)


def test_data_report_is_stored_with_the_statistics(tiny_model_dir, place, capsys):
    """Calibrating on a user file prints the one data line and writes its counts to calibration/stats.json."""
    from conftest import tiny_run_config
    from emloc import pipeline
    records = [(f"Q{i}", f"A{i}") for i in range(40)] + [("Q1", "A1")] * 4 + [("long " * 300, "A")]
    path = _jsonl(place / "d.jsonl", records)
    run = pipeline.Run(place / "r", tiny_run_config(tiny_model_dir, data={"path": str(path), "max_length": 64}),
                       progress=False)
    pipeline.calibrate(run)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    stored = json.loads((place / "r" / "calibration" / "stats.json").read_text())["data"]
    assert stored["duplicates"] == 4 and stored["truncated"] == 1 and stored["max_length"] == 64
    assert line.startswith("data: 4 exact duplicate record(s)") and "1 record(s) longer than data.max_length = 64" in line
