"""Class bundles: pack the small artifacts, unpack them verified, refuse corrupt or partial files without residue."""
import io as bytes_io
import tarfile

import pandas as pd
import pytest
import torch

from emloc import bundle, io
from emloc.config import RunConfig
from emloc.errors import EmlocError
from emloc.rundir import PROVENANCE, RunDir, fingerprint
from emloc.stages import STAGES
from widgets import spectrum_explorer

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def fake_run(folder, seed=0, stages=tuple(s.name for s in STAGES)):
    """A run's files (tiny tensors, no model) with ``stages`` finished (all by default): their manifests carry
    the config's fingerprints and the adapters their provenance. Includes the big files a bundle leaves out."""
    run = RunDir(folder, RunConfig(seed=seed))
    run.save_config()
    for stage in stages:
        run.finish(stage, 0.0, method="activation_aware")
    for which in ("emulator", "original", "corrected"):
        io.write_json(run.adapter_dir(which) / PROVENANCE,
                      {"fingerprint": fingerprint(run.config, "train_original" if which == "original" else "train_emulator")})
    io.write_json(folder / "results.json", {"variants": {"zero_shot": {"accuracy": 0.0, "loss": 3.0, "n": 4}}})
    io.write_json(folder / "training" / "emulator_lora.json", {"history": [[1, 2.0], [2, 1.5]]})
    report = pd.DataFrame({"module": MODULES, "layer": [0, 0], "type": ["q_proj", "down_proj"], "rank": [2, 3],
                           "out_features": [8, 8], "in_features": [8, 16], "ratio": [0.5, 0.5],
                           "break_even_rank": [4.0, 5.33], "params_before": [64, 128], "params_after": [32, 72]})
    (folder / "emulator").mkdir()
    report.to_csv(folder / "emulator" / "report.csv", index=False)
    sigma = torch.linspace(4, 0.5, 8) + seed
    io.write_tensors(folder / "emulator" / "spectra.safetensors",
                     {f"{m}.{k}": sigma * (1 + i) for i, m in enumerate(MODULES) for k in ("whitened", "plain")})
    io.write_tensors(folder / "emulator" / "factors.safetensors", {"big": torch.zeros(64, 64)})
    io.write_tensors(folder / "calibration" / "stats.safetensors", {"big": torch.zeros(64, 64)})
    io.write_json(folder / "calibration" / "stats.json", {"input_of": {m: m for m in MODULES}})
    (folder / "correction").mkdir()
    pd.DataFrame({"module": MODULES}).to_csv(folder / "correction" / "report.csv", index=False)
    io.write_tensors(folder / "correction" / "subspace.safetensors", {f"{m}.D": torch.ones(8, 2) for m in MODULES})
    adapter = folder / "adapters" / "emulator_lora"
    (adapter / "adapter_config.json").write_text("{}")
    io.write_tensors(adapter / "adapter_model.safetensors", {"a": torch.ones(2, 8)})
    (folder / "emulator" / ".factors.safetensors.abc.tmp").write_text("an interrupted write")
    return folder


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "made" / f"seed{s}", s) for s in range(2)]


def test_pack_holds_the_small_files_and_a_checksum_per_file(runs, tmp_path):
    manifest = bundle.pack(runs, tmp_path / "class.tar.gz")
    assert manifest["runs"] == ["seed0", "seed1"]
    files = set(manifest["files"])
    for name in ("seed0/config.yaml", "seed0/emulator/spectra.safetensors", "seed1/correction/subspace.safetensors",
                 "seed0/adapters/emulator_lora/adapter_model.safetensors", "seed0/training/emulator_lora.json"):
        assert name in files
    assert not any(f.endswith(("factors.safetensors", "stats.safetensors", ".tmp")) for f in files)
    with tarfile.open(tmp_path / "class.tar.gz") as tar:
        names = tar.getnames()
    assert names[0] == bundle.MANIFEST and set(names[1:]) == files
    assert manifest["files"]["seed0/config.yaml"]["sha256"] == bundle.sha256(runs[0] / "config.yaml")

    with_big = bundle.pack(runs[:1], tmp_path / "big.tar.gz", with_factors=True, with_stats=True)
    assert {"seed0/emulator/factors.safetensors", "seed0/calibration/stats.safetensors"} <= set(with_big["files"])


def test_unpack_round_trip_and_reads_without_factors(runs, tmp_path):
    bundle.pack(runs, tmp_path / "class.tar.gz")
    target = tmp_path / "students" / "class"
    unpacked = bundle.unpack(tmp_path / "class.tar.gz", target)
    assert unpacked.runs == [target / "seed0", target / "seed1"] and unpacked.kept == {} == unpacked.partial
    for run in runs:
        for rel in bundle.run_files(run):
            assert (target / run.name / rel).read_bytes() == (run / rel).read_bytes()
    assert not (target / "seed0" / "emulator" / "factors.safetensors").exists()
    assert [p.name for p in target.iterdir()] and not any(p.name.startswith(".") for p in target.iterdir())
    # the notebooks' views work from the bundle alone
    factors = bundle.light_factors(target / "seed1")
    assert factors.u == {} and list(factors.spectra) == MODULES
    torch.testing.assert_close(factors.spectra[MODULES[0]]["whitened"], torch.linspace(4, 0.5, 8) + 1)
    view = spectrum_explorer(factors)
    assert view.rank_slider.max == 8
    # notebook 05 opens every seed of the bundle
    opened = bundle.class_runs(target)
    assert [run.dir.name for run in opened] == ["seed0", "seed1"] and [run.config.seed for run in opened] == [0, 1]
    assert bundle.class_runs(tmp_path / "no_bundle") == []
    # unpacking again needs --replace, which keeps the student's own files and says so
    (target / "seed0" / "mynotes.txt").write_text("mine")
    (target / "seed0" / "results.json").write_text("edited")
    with pytest.raises(EmlocError, match="already exists: pass --replace"):
        bundle.unpack(tmp_path / "class.tar.gz", target)
    again = bundle.unpack(tmp_path / "class.tar.gz", target, replace=True)
    assert again.kept == {"seed0": ["mynotes.txt"], "seed1": []}
    assert (target / "seed0" / "mynotes.txt").read_text() == "mine"
    assert (target / "seed0" / "results.json").read_bytes() == (runs[0] / "results.json").read_bytes()
    assert any("kept 1 file(s)" in line and "mynotes.txt" in line for line in again.lines())
    assert sorted(p.name for p in target.iterdir()) == ["seed0", "seed1"]  # no staging or old copy left


def _assert_untouched(target, before):
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == before


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "no_manifest", "drop_file", "tamper"])
def test_unpack_refuses_damaged_bundles_and_leaves_nothing(runs, tmp_path, damage):
    good = tmp_path / "class.tar.gz"
    bundle.pack(runs, good)
    bad = tmp_path / "bad.tar.gz"
    raw = good.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_byte":
        bad.write_bytes(raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:])
    elif damage == "garbage":
        bad.write_bytes(b"not a tar file at all")
    else:
        _repack(good, bad, damage)
    target = tmp_path / "class"
    target.mkdir()
    (target / "keep.txt").write_text("an earlier file")
    before = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    with pytest.raises(EmlocError) as error:
        bundle.unpack(bad, target)
    assert "\n" not in str(error.value) and str(bad) in str(error.value)
    _assert_untouched(target, before)


def _repack(good, bad, damage):
    """Rewrite the bundle: without its manifest, without one listed file, or with one file's bytes changed."""
    with tarfile.open(good) as source, tarfile.open(bad, "w:gz") as out:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if damage == "no_manifest" and member.name == bundle.MANIFEST:
                continue
            if damage == "drop_file" and member.name.endswith("results.json"):
                continue
            if damage == "tamper" and member.name.endswith("results.json"):
                data = data.replace(b"3.0", b"0.1")
            member.size = len(data)
            out.addfile(member, bytes_io.BytesIO(data))


def test_unpack_refuses_paths_outside_the_bundle(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, bytes_io.BytesIO(b"hi"))
    with pytest.raises(EmlocError, match="not a plain file inside the bundle"):
        bundle.unpack(evil, tmp_path / "class")
    assert not (tmp_path / "outside.txt").exists()


def test_pack_refuses_unfinished_and_clashing_runs(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmlocError, match="no finished stage"):
        bundle.pack([tmp_path / "empty"], tmp_path / "x.tar.gz")
    twin = fake_run(tmp_path / "other" / "seed0")
    with pytest.raises(EmlocError, match="share a folder name"):
        bundle.pack([runs[0], twin], tmp_path / "x.tar.gz")
    assert not (tmp_path / "x.tar.gz").exists()


def test_command_line(runs, tmp_path, capsys):
    out = tmp_path / "class.tar.gz"
    assert bundle.main(["pack", *map(str, runs), "--out", str(out)]) == 0
    assert bundle.main(["unpack", str(out), "--into", str(tmp_path / "class")]) == 0
    assert (tmp_path / "class" / "seed1" / "results.json").exists()
    assert bundle.main(["unpack", str(tmp_path / "missing.tar.gz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pack_refuses_an_unfinished_run_unless_partial(tmp_path, capsys):
    """A run stopped after 4 of its 7 stages: refused in one line naming the missing stages; --partial packs it and
    records them, and unpacking says so. The bundle file is readable by others (0644)."""
    done = [s.name for s in STAGES][:4]
    run = fake_run(tmp_path / "made" / "seed0", stages=done)
    out = tmp_path / "class.tar.gz"
    assert bundle.main(["pack", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run seed0 is unfinished (missing train_original, correct, evaluate)" in err
    assert "--partial" in err and not out.exists()
    assert bundle.main(["pack", str(run), "--out", str(out), "--partial"]) == 0
    assert "seed0 packed unfinished (missing train_original, correct, evaluate)" in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o644 & ~io.UMASK
    unpacked = bundle.unpack(out, tmp_path / "class")
    assert unpacked.partial == {"seed0": ["train_original", "correct", "evaluate"]}
    assert any("was packed unfinished" in line for line in unpacked.lines())


def test_pack_into_a_folder_is_one_line(runs, tmp_path):
    with pytest.raises(EmlocError, match="is a folder: give the bundle's file name"):
        bundle.pack(runs, tmp_path)
