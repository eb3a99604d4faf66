"""Where a stored result came from: the settings it was measured with, the commit, the date, the CPU and the
library versions, and whether those settings are still today's defaults.

A results folder holds one ``provenance.json``, keyed by the name of each result file in it (a sub-folder
written as a whole, e.g. a sweep's tables, has its own with the key ``"*"``). A record declares either

- ``"current defaults"``: its ``configs`` (``label -> {"overrides": ..., "resolved": ...}``) were resolved
  from today's defaults when measured; :func:`stale_settings` re-resolves each ``overrides`` with today's
  code and lists what differs, so a later change of a default shows up (a test fails) until the result is
  re-measured or re-declared; or
- ``"named settings"``: measured under settings described in ``settings`` (e.g. older defaults), shown as
  such wherever the result is read; or
- ``"derived"``: computed from the results listed in ``from`` (e.g. the claims table), no measurement of its
  own.
"""
from __future__ import annotations

import datetime
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from emloc import io
from emloc.config import PRESETS, RunConfig, applicable, merge_dicts
from emloc.model_tasks import task_for

CURRENT = "current defaults"
NAMED = "named settings"
DERIVED = "derived"
PROVENANCE = "provenance.json"


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_commit(where: str | Path = ".") -> str:
    """The checked-out commit, with ``+changes`` when the work tree differs from it; ``unknown`` outside
    git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """The machine and library versions a measurement ran on."""
    import torch
    import transformers
    return {"cpu": cpu_model(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def resolve(overrides: dict) -> dict:
    """The full configuration ``overrides`` give under today's defaults (a ``preset`` key is expanded;
    automatic targets resolved to the model's module types)."""
    raw = dict(overrides)
    preset = raw.pop("preset", None)
    config = RunConfig.from_dict(merge_dicts(PRESETS[preset], raw) if preset else raw)
    return task_for(config).resolve_targets(config).to_dict()


def record(configs: dict[str, dict] | None = None, command: str = "", **extra) -> dict:
    """A provenance record declaring today's defaults: ``configs`` maps a label to the overrides each
    measurement used (``{}`` for the defaults themselves, ``{"preset": "standard"}``, ...)."""
    configs = configs or {}
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"declares": CURRENT, "command": command,
            "configs": {label: {"overrides": o, "resolved": resolve(o)} for label, o in configs.items()},
            "commit": git_commit(), "date": now, **environment(), **extra}


def write(result: str | Path | Iterable[str | Path], provenance: dict) -> Path:
    """Record ``provenance`` for the result file (or whole folder) ``result``, or for each of several results
    (e.g. a JSON file and the Markdown table made from it); returns the (last) provenance file written."""
    results = [Path(result)] if isinstance(result, (str, Path)) else [Path(r) for r in result]
    keys_by_folder: dict[Path, list[str]] = {}
    for path in results:
        folder, key = (path, "*") if path.is_dir() else (path.parent, path.name)
        keys_by_folder.setdefault(folder, []).append(key)
    for folder, keys in keys_by_folder.items():
        path = folder / PROVENANCE
        records = io.read_json(path) if path.exists() else {}
        records |= {key: provenance for key in keys}
        io.write_json(path, dict(sorted(records.items())))
    return path


def read(result: str | Path) -> dict | None:
    """The provenance of a result file or folder: its own entry, else its folder's ``"*"`` entry."""
    result = Path(result)
    candidates = ([(result / PROVENANCE, "*")] if result.is_dir() else
                  [(result.parent / PROVENANCE, result.name), (result.parent / PROVENANCE, "*")])
    for path, key in candidates:
        if path.exists() and key in (records := io.read_json(path)):
            return records[key]
    return None


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: measured {old!r}, today {new!r}"]


def stale_settings(provenance: dict) -> list[str]:
    """For a record declaring today's defaults, every setting that differs from what its overrides resolve to
    today (``label: key: measured X, today Y``); empty when current, and for named-settings records."""
    if provenance.get("declares") != CURRENT:
        return []
    return [f"{label}: {difference}" for label, config in provenance.get("configs", {}).items()
            for difference in _differences(applicable(config["resolved"]),
                                           applicable(resolve(config["overrides"])))]


def measured_under(provenance: dict | None) -> str:
    """One line for tables and notebooks: ``current defaults`` or the named settings."""
    if provenance is None:
        return "settings not recorded"
    if provenance.get("declares") == CURRENT:
        stale = stale_settings(provenance)
        return CURRENT if not stale else f"STALE: {stale[0]}"
    if provenance.get("declares") == DERIVED:
        return f"derived from {', '.join(provenance.get('from', []))}"
    return f"{NAMED}: {provenance.get('settings', 'not described')}"
