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

The archive starts with ``BUNDLE.json``: the run names, a sha256 and size per file, and the stages of runs
packed unfinished (``--partial``). A bundle is untrusted input: :func:`unpack` checks the manifest, the run
names (each one plain folder name), the members' types and sizes and the target before writing anything, then
checks every file against its checksum in a temporary folder inside the target and moves the runs into place
only when all match, so a corrupt, partial or crafted file never writes outside ``--into`` nor leaves a
half-unpacked run. An existing run is replaced only with ``--replace`` (the user's own files in it are kept).
"""
from __future__ import annotations

import hashlib
import io as bytes_io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from emloc import io
from emloc.arguments import OneLineParser
from emloc.errors import EmlocError, report_errors

FORMAT = "emloc-bundle"
VERSION = 1
MANIFEST = "BUNDLE.json"
SMALL = ["config.yaml", "manifests/*.json", "results.json", "fidelity.json", "training/*.json",
         "emulator/report.csv", "emulator/spectra.safetensors", "emulator/structured.json",
         "emulator/indices.safetensors", "correction/report.csv", "correction/subspace.safetensors",
         "calibration/stats.json", "adapters/*/*"]
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
        raise EmlocError(f"{run_dir} has no finished stage (no manifests/*.json): "
                         f"run `emloc run --out {run_dir}` first")
    patterns = SMALL + [FACTORS] * with_factors + [STATS] * with_stats
    found = {p.relative_to(run_dir).as_posix() for pattern in patterns for p in run_dir.glob(pattern)
             if p.is_file()}
    return sorted(path for path in found
                  if not Path(path).name.startswith("."))  # atomic writers' temporaries


def missing_stages(run_dir: str | Path) -> list[str]:
    """The stages a run's config needs that are not finished (and still valid) in ``run_dir``."""
    from emloc.rundir import RunDir
    from emloc.stages import STAGES
    run = RunDir(run_dir)
    return [stage.name for stage in STAGES if not run.is_done(stage.name)]


def pack(run_dirs: list[str | Path], out_file: str | Path, with_factors: bool = False,
         with_stats: bool = False, partial: bool = False) -> dict:
    """Write one ``.tar.gz`` (mode 0644) holding the small artifacts of ``run_dirs`` (each under its folder
    name).

    Every run must be finished (each stage its config needs done), unless ``partial``: then the missing stages
    are recorded per run under ``"partial"``. Returns the bundle manifest
    ``{"format", "version", "runs", "files": {path: {"sha256", "bytes"}}, "partial": {run: [stage, ...]}}``.
    """
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise EmlocError("no run directory given: pass the finished runs to pack")
    if Path(out_file).is_dir():
        raise EmlocError(f"--out {out_file} is a folder: give the bundle's file name, "
                         f"e.g. runs/class_bundle.tar.gz")
    names = [r.resolve().name for r in runs]
    if len(set(names)) != len(names):
        raise EmlocError(f"two runs share a folder name ({', '.join(names)}): give each run its own name, "
                         f"e.g. seed0, seed1")
    files = {f"{name}/{rel}": run / rel for run, name in zip(runs, names)
             for rel in run_files(run, with_factors, with_stats)}
    unfinished = {name: missing for run, name in zip(runs, names) if (missing := missing_stages(run))}
    if unfinished and not partial:
        name, missing = next(iter(unfinished.items()))
        raise EmlocError(f"run {name} is unfinished (missing {', '.join(missing)}): finish it with "
                         f"`emloc run --out {runs[names.index(name)]}`, "
                         f"or pass --partial to pack it as it is")
    manifest = {"format": FORMAT, "version": VERSION, "runs": names,
                "files": {arc: {"sha256": sha256(path), "bytes": path.stat().st_size}
                          for arc, path in files.items()},
                "partial": unfinished}
    text = json.dumps(manifest, indent=1).encode()
    with io.atomic_path(out_file) as tmp, tarfile.open(tmp, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode = len(text), 0o644
        tar.addfile(info, bytes_io.BytesIO(text))
        for arc, path in files.items():
            tar.add(path, arcname=arc, recursive=False)
    return manifest


MAX_TOTAL_BYTES = 4 * 2**30
"""The largest unpacked size a bundle may declare (the standard three-seed bundle holds about 130 MB)."""
MAX_MANIFEST_BYTES = 16 * 2**20
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_run_name(name, file: Path) -> str:
    """A run name is one plain path component: a folder directly inside ``--into``, nothing else."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or CONTROL_CHARACTERS.search(name) or Path(name).is_absolute() or Path(name).name != name):
        raise EmlocError(f"{file} names a run {name!r}, which is not a plain folder name: "
                         f"the bundle is not safe to unpack; ask for a bundle made with `emloc bundle pack`")
    return name


def _check_file_entry(rel, entry, runs: set[str], file: Path) -> int:
    """A listed file lies inside one of the runs and declares a size and a sha256; returns its size."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (len(parts) < 2 or parts[0] not in runs or any(p in ("", ".", "..") for p in parts)
            or "\\" in rel or CONTROL_CHARACTERS.search(rel)):
        raise EmlocError(f"{file} lists a file {rel!r} outside its runs: the bundle is not safe to unpack; "
                         f"ask for a bundle made with `emloc bundle pack`")
    size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
        raise EmlocError(f"{file} declares no size or checksum for {rel}: "
                         f"the bundle is altered; copy it again")
    return size


def check_manifest(manifest, file: Path) -> dict:
    """Refuse a manifest whose run names or file paths could reach outside the target, or that is
    malformed."""
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or manifest.get("version") != VERSION):
        raise EmlocError(f"{file} is not an emloc bundle of version {VERSION}: pack it again with this suite")
    runs, files = manifest.get("runs"), manifest.get("files")
    if not isinstance(runs, list) or not runs or not isinstance(files, dict):
        raise EmlocError(f"{file} has a {MANIFEST} without runs or files: "
                         f"the bundle is altered; copy it again")
    names = [check_run_name(name, file) for name in runs]
    if len(set(names)) != len(names):
        raise EmlocError(f"{file} names the run {_first_repeat(names)!r} twice: "
                         f"the bundle is altered; copy it again")
    declared = sum(_check_file_entry(rel, entry, set(names), file) for rel, entry in files.items())
    empty = [name for name in names if not any(rel.startswith(name + "/") for rel in files)]
    if empty:
        raise EmlocError(f"{file} lists no file of the run {empty[0]!r}: "
                         f"the bundle is altered; copy it again")
    partial = manifest.get("partial") or {}
    if not isinstance(partial, dict) or not all(isinstance(v, list) for v in partial.values()):
        raise EmlocError(f"{file} has a malformed 'partial' entry in {MANIFEST}: "
                         f"the bundle is altered; copy it again")
    if declared > MAX_TOTAL_BYTES:
        raise EmlocError(f"{file} declares {declared / 2**30:.1f} GiB of files, "
                         f"over the {MAX_TOTAL_BYTES // 2**30} GiB "
                         f"a class bundle may hold: it is not a class bundle; pack fewer or smaller runs")
    return manifest


def _first_repeat(items: list[str]) -> str:
    seen: set[str] = set()
    return next(item for item in items if item in seen or seen.add(item))


def _read_members(tar: tarfile.TarFile, file: Path) -> tuple[dict, list[tarfile.TarInfo]]:
    """The bundle's manifest (read before anything is extracted) and its members, every one checked: regular
    files and folders only, each name once, each file listed in the manifest with the size it declares."""
    members = tar.getmembers()
    for member in members:
        what = _unsafe_kind(member)
        if what:
            raise EmlocError(f"{file} holds {member.name!r}, {what}, "
                             f"which is not a plain file inside the bundle: "
                             f"not an emloc bundle; ask for one made with `emloc bundle pack`")
    names = [m.name.rstrip("/") for m in members]
    if len(set(names)) != len(names):
        raise EmlocError(f"{file} holds {_first_repeat(names)!r} twice: the bundle is altered; copy it again")
    manifest = check_manifest(_manifest_of(tar, members, file), file)
    for member in members:
        _check_member(member, manifest, file)
    return manifest, members


def _unsafe_kind(member: tarfile.TarInfo) -> str | None:
    """What makes an archive member unsafe to extract (``None``: a regular file or folder with a relative
    name)."""
    if member.issym() or member.islnk():
        return f"a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
    if not (member.isreg() or member.isdir()):
        return "a device, pipe or other special file"
    if member.name.startswith("/") or ".." in Path(member.name).parts:
        return "a path leading out of the target"
    return None


def _manifest_of(tar: tarfile.TarFile, members: list[tarfile.TarInfo], file: Path):
    member = next((m for m in members if m.name == MANIFEST and m.isreg()), None)
    no_manifest = EmlocError(f"{file} has no readable {MANIFEST}: it is not an emloc bundle (make one with "
                             f"`emloc bundle pack`)")
    if member is None or member.size > MAX_MANIFEST_BYTES:
        raise no_manifest
    try:
        return json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise no_manifest from None


def _check_member(member: tarfile.TarInfo, manifest: dict, file: Path) -> None:
    if member.name == MANIFEST:
        return
    name = member.name.rstrip("/")
    if member.isdir():
        if name.split("/")[0] not in manifest["runs"]:
            raise EmlocError(f"{file} has an unlisted folder {name}: "
                             f"the bundle is incomplete or altered; copy it again")
        return
    entry = manifest["files"].get(name)
    if entry is None:
        raise EmlocError(f"{file} has an unlisted file {name}: "
                         f"the bundle is incomplete or altered; copy it again")
    if member.size != entry["bytes"]:
        raise EmlocError(f"{file}: {name} holds {member.size} bytes "
                         f"where {MANIFEST} declares {entry['bytes']}: "
                         f"the bundle is altered; copy it again")


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
            raise EmlocError(f"{file}: {rel} does not match its checksum (corrupt copy): "
                             f"copy the bundle again")


def _existing_ancestor(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (where a new ``path`` would be created)."""
    while not path.exists() and not path.is_symlink():
        path = path.parent
    return path


def check_target(target: Path, manifest: dict, file: Path, replace: bool) -> dict[str, list[str]]:
    """Everything about ``--into`` that can be refused before a byte is written: it is a folder (or can be
    made one) with room for the bundle; each run lands directly inside it; an existing run is replaced only
    when asked. Returns, per run being replaced, its files the bundle does not hold (they are kept)."""
    ancestor = _existing_ancestor(target)
    if not ancestor.is_dir():
        where = "" if ancestor == target else f" ({ancestor} is a file)"
        raise EmlocError(f"--into {target} is a file, not a folder{where}: give --into a folder path")
    declared = sum(entry["bytes"] for entry in manifest["files"].values())
    free = shutil.disk_usage(ancestor).free
    if declared > free:
        raise EmlocError(f"{file} unpacks to {declared / 2**20:.0f} MB "
                         f"but {ancestor} has {free / 2**20:.0f} MB free: "
                         f"free some space or unpack elsewhere with --into")
    root = target.resolve()
    kept = {}
    for name in manifest["runs"]:
        destination = target / name
        if destination.is_symlink() or destination.resolve().parent != root:
            raise EmlocError(f"{destination} is a link to another place: "
                             f"remove it, or unpack elsewhere with --into")
        if destination.exists():
            kept[name] = _files_kept(destination, name, manifest, replace)
    return kept


def _files_kept(destination: Path, name: str, manifest: dict, replace: bool) -> list[str]:
    if not replace:
        raise EmlocError(f"{destination} already exists: pass --replace to replace it with the bundle's copy "
                         f"(files of yours the bundle lacks are kept), or unpack elsewhere with --into")
    if not destination.is_dir():
        raise EmlocError(f"{destination} is a file, not a run folder: "
                         f"move it away, or unpack elsewhere with --into")
    bundled = {rel.split("/", 1)[1] for rel in manifest["files"] if rel.split("/", 1)[0] == name}
    folders = {"/".join(rel.split("/")[:i]) for rel in bundled for i in range(1, rel.count("/") + 1)}
    own = sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*")
                 if p.is_file() or p.is_symlink())
    clash = [rel for rel in own if rel in folders]
    if clash:
        raise EmlocError(f"{destination / clash[0]} is a file where the bundle has a folder: move it away, "
                         f"or unpack elsewhere with --into")
    return [rel for rel in own if rel not in bundled]


def _make_folders(target: Path) -> list[Path]:
    """Create ``target`` and its missing parents; returns the folders created, outermost first."""
    created = []
    for folder in reversed([target, *target.parents]):
        if not folder.exists():
            folder.mkdir()
            created.append(folder)
    return created


def _place(staged: Path, destination: Path, kept: list[str] | None) -> None:
    """Move a verified run into place; an existing run is swapped out whole after its kept files are
    copied."""
    if kept is None:
        os.replace(staged, destination)
        return
    for rel in kept:
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(destination / rel, staged / rel, follow_symlinks=False)
    old = staged.with_name(staged.name + ".old")
    os.replace(destination, old)
    try:
        os.replace(staged, destination)
    except OSError:
        os.replace(old, destination)
        raise
    shutil.rmtree(old)


@dataclass
class Unpacked:
    """What :func:`unpack` did: the run folders placed, and per replaced run the files of its own it kept."""

    runs: list[Path]
    kept: dict[str, list[str]]
    partial: dict[str, list[str]]
    """Runs packed unfinished (``pack --partial``): run name -> stages missing."""

    def lines(self) -> list[str]:
        """What the command line prints: one line per run, one per replaced run with kept files."""
        out = [str(path) for path in self.runs]
        out += [f"{name}: kept {len(files)} file(s) of yours the bundle does not hold: {', '.join(files)}"
                for name, files in self.kept.items() if files]
        out += [f"{name} was packed unfinished (missing {', '.join(stages)}): "
                f"its notebooks may compute those stages"
                for name, stages in self.partial.items()]
        return out


def unpack(file: str | Path, target: str | Path = DEFAULT_TARGET, replace: bool = False) -> Unpacked:
    """Verify the bundle and put each run at ``target/<run name>``.

    The bundle is untrusted: its manifest, member types, names and sizes are checked before anything is
    written, then it is extracted into a temporary folder and checked against its checksums. A corrupt,
    truncated, foreign or crafted file is a one-line :class:`EmlocError` and changes nothing on disk (not even
    an empty ``target``). An existing run is refused unless ``replace``; then it is replaced by the bundle's
    copy, keeping (and reporting) the files of its own the bundle does not hold.
    """
    file, target = Path(file), Path(target)
    if not file.is_file():
        raise EmlocError(f"bundle {file} does not exist: "
                         f"check the path (the instructor's `make class` writes it)")
    try:
        with tarfile.open(file, "r:gz") as tar:
            manifest, members = _read_members(tar, file)
            kept = check_target(target, manifest, file, replace)
            created = _make_folders(target)
            try:
                placed = _extract_and_place(tar, members, manifest, file, target, kept)
            except BaseException:
                for folder in reversed(created):
                    shutil.rmtree(folder, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise EmlocError(f"{file} is corrupted or partial ({type(exc).__name__}): "
                         f"copy the bundle again") from None
    return Unpacked(placed, kept, dict(manifest.get("partial") or {}))


def _extract_and_place(tar, members, manifest: dict, file: Path, target: Path, kept: dict) -> list[Path]:
    staging = Path(tempfile.mkdtemp(prefix=".bundle.", suffix=".tmp", dir=target))
    try:
        try:
            tar.extractall(staging, members=members, filter="data")
        except OSError as exc:
            raise EmlocError(f"{file} could not be unpacked into {target} "
                             f"({exc.strerror or type(exc).__name__}): "
                             f"free some space or unpack elsewhere with --into") from None
        verify(staging, manifest, file)
        placed = []
        for name in manifest["runs"]:
            _place(staging / name, target / name, kept.get(name))
            placed.append(target / name)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- reading an unpacked run -----------------------------------------------------------------

def light_factors(run_dir: str | Path):
    """The emulator's spectra and report without its factors (``u``, ``v`` empty): all the spectrum
    explorer, the error map and :mod:`emloc.reports` need. Works on a bundle's run and on a full run."""
    from emloc.svd_emulator import EmulatorFactors
    folder = Path(run_dir) / "emulator"
    report = io.read_csv(folder / "report.csv")
    spectra_flat = io.read_tensors(folder / "spectra.safetensors")
    names = list(report["module"])
    missing = [n for n in names if f"{n}.whitened" not in spectra_flat or f"{n}.plain" not in spectra_flat]
    if missing:
        raise EmlocError(f"{folder / 'spectra.safetensors'} lacks the spectra of {missing[0]}: "
                         f"re-run `emloc build`")
    spectra = {n: {"whitened": spectra_flat[f"{n}.whitened"], "plain": spectra_flat[f"{n}.plain"]}
               for n in names}
    manifest = Path(run_dir) / "manifests" / "build.json"
    method = (io.read_json(manifest).get("method", "activation_aware") if manifest.exists()
              else "activation_aware")
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
    """``emloc bundle pack RUN... --out FILE`` / ``emloc bundle unpack FILE [--into DIR] [--replace]``."""
    parser = OneLineParser(prog="emloc bundle", description="pack or unpack a class bundle")
    sub = parser.add_subparsers(dest="command", required=True)
    pack_p = sub.add_parser("pack", help="pack finished runs into one .tar.gz")
    pack_p.add_argument("runs", nargs="+",
                        help="finished run directories (their folder names become the run names)")
    pack_p.add_argument("--out", required=True, help="bundle file to write, e.g. runs/class_bundle.tar.gz")
    pack_p.add_argument("--with-factors", action="store_true", help="also the emulator's factors (large)")
    pack_p.add_argument("--with-stats", action="store_true", help="also the calibration covariances (larger)")
    pack_p.add_argument("--partial", action="store_true",
                        help="pack unfinished runs too (the missing stages are recorded in the bundle)")
    unpack_p = sub.add_parser("unpack", help="verify a bundle and unpack its runs")
    unpack_p.add_argument("file")
    unpack_p.add_argument("--into", default=str(DEFAULT_TARGET),
                          help="folder for the runs (default runs/class)")
    unpack_p.add_argument("--replace", action="store_true",
                          help="replace runs that already exist there "
                               "(files of yours the bundle lacks are kept)")

    def command() -> None:
        args = parser.parse_args(argv)
        if args.command == "pack":
            manifest = pack(args.runs, args.out, args.with_factors, args.with_stats, args.partial)
            size = sum(entry["bytes"] for entry in manifest["files"].values())
            print(f"{args.out}: {len(manifest['runs'])} run(s), {len(manifest['files'])} files, "
                  f"{size / 2**20:.1f} MB unpacked")
            for name, stages in manifest["partial"].items():
                print(f"{name} packed unfinished (missing {', '.join(stages)})")
        else:
            print("\n".join(unpack(args.file, args.into, args.replace).lines()))

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
