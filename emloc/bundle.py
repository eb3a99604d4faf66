"""A class bundle: the small artifacts of finished runs in one ``.tar.gz`` that students unpack (issue 14).

An instructor runs the pipeline ahead of the session (``make class``: standard preset, seeds 0, 1, 2) and
packs the runs; students unpack the file and the notebooks read the runs instead of computing them.

What a bundle holds, per run (``<run name>/<path in the run>``): ``config.yaml``, ``manifests/``,
``results.json``, ``fidelity.json``, ``training/*.json`` (loss histories), ``emulator/report.csv``,
``emulator/spectra.safetensors``, ``correction/report.csv``, ``correction/subspace.safetensors``
(``Q``, ``B~``, ``D`` per module), ``calibration/stats.json`` and the LoRA adapter folders ``adapters/*``
(a few MB). Left out unless asked: ``emulator/factors.safetensors`` (``--with-factors``, about half the
model's linear weights) and ``calibration/stats.safetensors`` (``--with-stats``, one ``in x in`` matrix
per distinct linear input: larger than the model).

What each notebook can then do without computing (the default model must still be installed):

- 00 quickstart, 05 results: everything (results, histories, results board).
- 01 spectra, 02 error map: the spectrum explorer, the error map and every table, through
  :func:`load_factors` (spectra and report). Building the emulator model (``run.emulator()``, 02's
  parameter count) needs ``--with-factors``; the whitened-truncation exercise needs ``--with-stats``.
- 03 LoRA: loss curves, adapter shapes and parameter counts; training again computes.
- 04 correction: the correction inspector, the lambda sweep (``reclamp_report``) and the ``B~``/``D``
  exercise, all from the saved subspace tensors.
- Evaluating again (``emloc evaluate``) needs ``--with-factors``.

The archive starts with ``BUNDLE.json``: the run names and a sha256 and size per file. :func:`unpack`
checks every file against it in a temporary folder beside the target and moves the runs into place only
when all match, so a corrupt or partial download never leaves a half-unpacked run.
"""
from __future__ import annotations

import argparse
import hashlib
import io as bytes_io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from emloc import io
from emloc.errors import EmlocError, report_errors

FORMAT = "emloc-bundle"
VERSION = 1
MANIFEST = "BUNDLE.json"
SMALL = ["config.yaml", "manifests/*.json", "results.json", "fidelity.json", "training/*.json", "emulator/report.csv",
         "emulator/spectra.safetensors", "emulator/structured.json", "emulator/indices.safetensors",
         "correction/report.csv", "correction/subspace.safetensors", "calibration/stats.json", "adapters/*/*"]
FACTORS = "emulator/factors.safetensors"
STATS = "calibration/stats.safetensors"
DEFAULT_TARGET = Path("runs") / "class"


def sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def run_files(run_dir: str | Path, with_factors: bool = False, with_stats: bool = False) -> list[str]:
    """The paths (relative, ``/``-separated, sorted) of a run's files a bundle carries."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifests").is_dir() or not any((run_dir / "manifests").glob("*.json")):
        raise EmlocError(f"{run_dir} has no finished stage (no manifests/*.json): run `emloc run --out {run_dir}` first")
    patterns = SMALL + [FACTORS] * with_factors + [STATS] * with_stats
    found = {p.relative_to(run_dir).as_posix() for pattern in patterns for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(path for path in found if not Path(path).name.startswith("."))  # atomic writers' temporaries


def pack(run_dirs: list[str | Path], out_file: str | Path, with_factors: bool = False, with_stats: bool = False) -> dict:
    """Write one ``.tar.gz`` holding the small artifacts of ``run_dirs`` (each under its folder name).

    Returns the bundle manifest ``{"format", "version", "runs", "files": {path: {"sha256", "bytes"}}}``.
    """
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise EmlocError("no run directory given: pass the finished runs to pack")
    names = [r.resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise EmlocError(f"two runs share a folder name ({', '.join(names)}): give each run its own name, e.g. seed0, seed1")
    files = {f"{name}/{rel}": run / rel for run, name in zip(runs, names)
             for rel in run_files(run, with_factors, with_stats)}
    manifest = {"format": FORMAT, "version": VERSION, "runs": names,
                "files": {arc: {"sha256": sha256(path), "bytes": path.stat().st_size} for arc, path in files.items()}}
    text = json.dumps(manifest, indent=1).encode()
    with io.atomic_path(out_file) as tmp, tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, bytes_io.BytesIO(text))
        for arc, path in files.items():
            tar.add(path, arcname=arc, recursive=False)
    return manifest


def _safe_members(tar: tarfile.TarFile, file: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for member in members:
        parts = Path(member.name).parts
        if not (member.isfile() or member.isdir()) or member.name.startswith("/") or ".." in parts:
            raise EmlocError(f"{file} holds {member.name!r}, which is not a plain file inside the bundle: not an emloc bundle")
    return members


def _read_manifest(folder: Path, file: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EmlocError(f"{file} has no readable {MANIFEST}: it is not an emloc bundle (make one with "
                         f"`python -m emloc.bundle pack`)") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise EmlocError(f"{file} is not an emloc bundle of version {VERSION}: pack it again with this suite")
    return manifest


def verify(folder: Path, manifest: dict, file: Path) -> None:
    """Every listed file is present with its size and sha256, and nothing else is there."""
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
    missing, extra = sorted(set(manifest["files"]) - present), sorted(present - set(manifest["files"]))
    if missing or extra:
        what = f"misses {missing[0]}" if missing else f"has an unlisted file {extra[0]}"
        raise EmlocError(f"{file} {what}: the bundle is incomplete or altered; copy it again")
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
            raise EmlocError(f"{file}: {rel} does not match its checksum (corrupt copy): copy the bundle again")


def unpack(file: str | Path, target: str | Path = DEFAULT_TARGET) -> list[Path]:
    """Verify the bundle and put each run at ``target/<run name>`` (replacing an older copy whole).

    A corrupt, truncated or foreign file is a one-line :class:`EmlocError` and changes nothing on disk.
    Returns the unpacked run directories.
    """
    file, target = Path(file), Path(target)
    if not file.is_file():
        raise EmlocError(f"bundle {file} does not exist: check the path (the instructor's `make class` writes it)")
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle.", suffix=".tmp", dir=target))
    try:
        try:
            with tarfile.open(file, "r:gz") as tar:
                tar.extractall(staging, members=_safe_members(tar, file), filter="data")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise EmlocError(f"{file} is corrupted or partial ({type(exc).__name__}): copy the bundle again") from None
        manifest = _read_manifest(staging, file)
        verify(staging, manifest, file)
        placed = []
        for name in manifest["runs"]:
            destination = target / name
            if destination.exists():
                shutil.rmtree(destination)
            os.replace(staging / name, destination)
            placed.append(destination)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- reading an unpacked run -----------------------------------------------------------------

def light_factors(run_dir: str | Path):
    """The emulator's spectra and report without its factors (``u``, ``v`` empty): all the spectrum
    explorer, the error map and :mod:`emloc.reports` need. Works on a bundle's run and on a full run."""
    from emloc.emulator import EmulatorFactors
    folder = Path(run_dir) / "emulator"
    report = io.read_csv(folder / "report.csv")
    spectra_flat = io.read_tensors(folder / "spectra.safetensors")
    names = list(report["module"])
    missing = [n for n in names if f"{n}.whitened" not in spectra_flat or f"{n}.plain" not in spectra_flat]
    if missing:
        raise EmlocError(f"{folder / 'spectra.safetensors'} lacks the spectra of {missing[0]}: re-run `emloc build`")
    spectra = {n: {"whitened": spectra_flat[f"{n}.whitened"], "plain": spectra_flat[f"{n}.plain"]} for n in names}
    manifest = Path(run_dir) / "manifests" / "build.json"
    method = io.read_json(manifest).get("method", "activation_aware") if manifest.exists() else "activation_aware"
    return EmulatorFactors({}, {}, spectra, report, method)


def load_factors(run):
    """``run.factors()`` when the factors are on disk, else :func:`light_factors` (a bundle without them)."""
    if (Path(run.dir) / FACTORS).exists():
        return run.factors()
    return light_factors(run.dir)


def _class_folder(directory: str | Path | None) -> Path:
    """Where bundle runs are unpacked: ``directory``, or ``runs/class`` beside the shared notebook run."""
    from emloc.notebook import notebook_run_dir
    return Path(directory) if directory else notebook_run_dir().parent / "class"


def class_run(name: str = "seed0", directory: str | Path | None = None):
    """The unpacked bundle run ``directory/name`` (default ``runs/class/seed0`` in the repository) opened with
    its own stored config, or ``None`` when no bundle was unpacked there (then compute as usual)."""
    from emloc.pipeline import Run
    run_dir = _class_folder(directory) / name
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "manifests").is_dir():
        return None
    return Run(run_dir)


def class_runs(directory: str | Path | None = None) -> list:
    """Every unpacked bundle run under ``directory`` (default ``runs/class``), by name: one per seed for the
    instructor's multi-seed bundle; an empty list when none was unpacked."""
    folder = _class_folder(directory)
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return [run for run in (class_run(name, folder) for name in names) if run is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m emloc.bundle pack RUN... --out FILE`` / ``python -m emloc.bundle unpack FILE [--into DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m emloc.bundle", description="pack or unpack a class bundle")
    sub = parser.add_subparsers(dest="command", required=True)
    pack_p = sub.add_parser("pack", help="pack finished runs into one .tar.gz")
    pack_p.add_argument("runs", nargs="+", help="finished run directories (their folder names become the run names)")
    pack_p.add_argument("--out", required=True, help="bundle file to write, e.g. runs/class_bundle.tar.gz")
    pack_p.add_argument("--with-factors", action="store_true", help="also the emulator's factors (large)")
    pack_p.add_argument("--with-stats", action="store_true", help="also the calibration covariances (larger)")
    unpack_p = sub.add_parser("unpack", help="verify a bundle and unpack its runs")
    unpack_p.add_argument("file")
    unpack_p.add_argument("--into", default=str(DEFAULT_TARGET), help="folder for the runs (default runs/class)")
    args = parser.parse_args(argv)

    def command() -> None:
        if args.command == "pack":
            manifest = pack(args.runs, args.out, args.with_factors, args.with_stats)
            size = sum(entry["bytes"] for entry in manifest["files"].values())
            print(f"{args.out}: {len(manifest['runs'])} run(s), {len(manifest['files'])} files, {size / 2**20:.1f} MB unpacked")
        else:
            for path in unpack(args.file, args.into):
                print(path)

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
