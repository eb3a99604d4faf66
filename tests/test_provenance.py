"""emloc.provenance: every stored result says what it was measured with, and a result that claims today's
defaults fails here once a default changes."""
from pathlib import Path

from emloc import provenance
from emloc.config import CorrectionConfig

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DECLARATIONS = {provenance.CURRENT, provenance.NAMED, provenance.DERIVED}


def _result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.name != provenance.PROVENANCE)


def test_every_stored_result_records_its_provenance():
    missing = [str(p.relative_to(RESULTS)) for p in _result_files() if provenance.read(p) is None]
    assert not missing, f"results without a provenance record: {missing}"
    for path in _result_files():
        record = provenance.read(path)
        assert record["declares"] in DECLARATIONS, path
        if record["declares"] == provenance.DERIVED:
            assert all((RESULTS / source).exists() for source in record["from"]), path
            continue
        assert {"commit", "date", "cpu", "torch"} <= set(record), path  # the machine and the code
        if record["declares"] == provenance.NAMED:
            assert record["settings"], path


def test_no_stored_result_names_a_path_of_the_machine_it_was_measured_on():
    """Result files are shared: commands and folders in them are relative to the repository."""
    root = str(RESULTS.parents[1])
    named = [str(p.relative_to(RESULTS)) for p in _result_files() if root in p.read_text(errors="ignore")]
    assert not named, f"result files naming this machine's repository path: {named}"


def test_no_stored_result_claims_defaults_it_was_not_measured_under():
    """The staleness check: a result declaring today's defaults must resolve to the same settings today."""
    stale = {str(p.relative_to(RESULTS)): provenance.stale_settings(provenance.read(p)) for p in _result_files()}
    stale = {name: differences for name, differences in stale.items() if differences}
    assert not stale, ("results declared 'current defaults' but measured under other settings: re-measure them or "
                       f"re-declare them as named settings: {stale}")


def test_a_changed_default_makes_a_current_record_stale(tmp_path, monkeypatch):
    result = tmp_path / "result.json"
    result.write_text("{}")
    provenance.write(result, provenance.record({"standard": {"preset": "standard"}, "mine": {"lora": {"r": 4}}}))
    record = provenance.read(result)
    assert record["declares"] == provenance.CURRENT and record["cpu"] and record["torch"]
    assert provenance.stale_settings(record) == [] and provenance.measured_under(record) == provenance.CURRENT
    monkeypatch.setattr(CorrectionConfig, "__init__", _with_clamp(CorrectionConfig.__init__, 10.0))
    stale = provenance.stale_settings(record)
    assert stale == ["standard: correction.clamp: measured 3.0, today 10.0",
                     "mine: correction.clamp: measured 3.0, today 10.0"]
    assert provenance.measured_under(record).startswith("STALE: standard: correction.clamp")
    named = {"declares": provenance.NAMED, "settings": "older defaults"}
    assert provenance.stale_settings(named) == [] and "older defaults" in provenance.measured_under(named)


def _with_clamp(init, clamp):
    def patched(self, clamp_=clamp, **kwargs):
        init(self, **{"clamp": clamp_, **kwargs})
    return patched


def test_folder_records_and_file_records(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "summary.csv").write_text("a\n1\n")
    provenance.write(folder, {"declares": provenance.NAMED, "settings": "x"})
    assert provenance.read(folder / "summary.csv")["settings"] == "x"   # the folder's "*" entry
    provenance.write(folder / "summary.csv", {"declares": provenance.NAMED, "settings": "y"})
    assert provenance.read(folder / "summary.csv")["settings"] == "y"   # a file's own entry first
    assert provenance.read(tmp_path / "elsewhere.json") is None


def test_commit_inside_and_outside_git(tmp_path):
    assert provenance.git_commit(tmp_path) == "unknown"
    commit = provenance.git_commit(Path(__file__).parent)
    assert commit == "unknown" or len(commit.removesuffix("+changes")) == 40  # a clean clone, or not git


def test_one_record_for_several_results_is_one_record_each(tmp_path):
    """``provenance.write([json, md], record)`` leaves the same file as writing each result on its own."""
    from emloc import provenance
    for name in ("result.json", "result.md"):
        (tmp_path / name).write_text("{}")
    record = {"declares": "named settings: a test", "command": "x"}
    together = provenance.write([tmp_path / "result.json", tmp_path / "result.md"], record).read_text()
    (tmp_path / "provenance.json").unlink()
    provenance.write(tmp_path / "result.json", record)
    assert provenance.write(tmp_path / "result.md", record).read_text() == together
    assert provenance.read(tmp_path / "result.md") == record
