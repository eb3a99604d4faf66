"""All file I/O of the suite: atomic writes of JSON, YAML, safetensors and whole folders.

Every artifact is written to a temporary sibling first and renamed into place, so a crash never
leaves a half-written file or folder behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emloc.errors import EmlocError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()
"""Read once: temporaries are created private (0600 / 0700) and given the modes a plain write would have."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmlocError(f"{path} does not exist: run the stage that writes it first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmlocError(f"{path} is not valid JSON ({exc}): delete it and re-run its stage") from None


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")


def read_yaml(path: str | os.PathLike) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EmlocError(f"config file {path} does not exist: check the path") from None
    except UnicodeDecodeError:
        raise EmlocError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise EmlocError(f"config file {path} is not valid YAML ({first}): fix its syntax") from None


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a report table the suite wrote; a missing, empty or garbled file is a one-line error."""
    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise EmlocError(f"{path} does not exist: run the stage that writes it first") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise EmlocError(f"{path} is corrupted or truncated ({str(exc).splitlines()[0]}): "
                         f"delete it and re-run its stage") from None


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never a pickle)."""
    if not Path(path).exists():
        raise EmlocError(f"{path} does not exist: run the stage that writes it first")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise EmlocError(f"{path} is corrupted or truncated ({exc}): "
                         f"delete it and re-run its stage") from None


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def concat_safetensors(parts: list[Path], path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> None:
    """Join safetensors files (distinct keys) into one, copying bytes in chunks: memory stays constant.

    Lets a layer-by-layer writer produce one standard file without holding every tensor at once.
    """
    headers = [_safetensors_header(Path(part)) for part in parts]
    joined, offset = {}, 0
    for header, _ in headers:
        for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if key in joined:
                raise EmlocError(f"tensor {key} appears in two parts: each part must hold distinct tensors")
            begin, end = entry["data_offsets"]
            joined[key] = {"dtype": entry["dtype"], "shape": entry["shape"],
                           "data_offsets": [offset, offset + end - begin]}
            offset += end - begin
    text = json.dumps(joined, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for part, (header, data_start) in zip(parts, headers):
            _copy_data(Path(part), out, data_start, header, chunk_bytes)


def _copy_data(part: Path, out, data_start: int, header: dict, chunk_bytes: int) -> None:
    with open(part, "rb") as handle:
        for entry in sorted(header.values(), key=lambda entry: entry["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            handle.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                chunk = handle.read(min(chunk_bytes, remaining))
                out.write(chunk)
                remaining -= len(chunk)
