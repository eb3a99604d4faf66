"""Layer-streamed calibration and emulator construction, for models too large to hold in memory.

The model is built on the ``meta`` device from its config (no weights). Calibration hidden states
leave the embeddings, then for each decoder layer in turn: its weights are read from the
safetensors shards, the hidden states go through it with the calibration hooks on (``C`` per
distinct input, exactly as :func:`emloc.calibration.collect_statistics` collects them), its
linears are factored with :func:`emloc.svd_emulator.factor_linear` (the same math as the in-memory
build), the factors go to disk, and the layer's weights are dropped. The hidden states move on
through the *original* layer, as in the in-memory calibration. Peak memory is about one layer's
weights, the embeddings and the calibration activations.

The artifacts are those of :func:`emloc.pipeline.build` (``emulator/factors.safetensors``,
spectra, ``report.csv``, the 'build' manifest), so the later stages run unchanged.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from emloc import io
from emloc.calibration import CalibrationStats, recording_inputs, stats_from_accumulator
from emloc.config import EmulatorConfig
from emloc import sequential
from emloc.svd_emulator import count_parameters
from emloc.errors import EmlocError
from emloc.layerwalk import (LayerBatch, first_inputs, llama_decoder, merge_stats, qualified_name,
                             through_layer)
from emloc.models import resolve_dtype, resolve_model_path
from emloc.rundir import factor_tensors, save_emulator, save_stats
from emloc.targets import typed

if TYPE_CHECKING:
    from emloc.pipeline import Run


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


class ShardReader:
    """Reads named tensors lazily from a model folder's safetensors file(s), one shard open at a time.

    A shard is opened (memory-mapped) only while its tensors are copied out and closed right after,
    so its pages do not stay resident.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            self.shard_of = dict(io.read_json(index)["weight_map"])
        elif single.exists():
            with safe_open(str(single), framework="pt") as handle:
                self.shard_of = {key: single.name for key in handle.keys()}
        else:
            raise EmlocError(f"{self.folder} has no safetensors weights (model.safetensors or its index): "
                             f"save the model with `save_pretrained(..., safe_serialization=True)`")

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in self.shard_of]
        if missing:
            raise EmlocError(f"{self.folder} has no tensor {missing[0]}: the checkpoint's names do not match "
                             f"the model built from its config; stream only checkpoints saved by "
                             f"transformers")
        by_shard = defaultdict(list)
        for name in names:
            by_shard[self.shard_of[name]].append(name)
        tensors = {}
        for shard, shard_names in by_shard.items():
            with safe_open(str(self.folder / shard), framework="pt") as handle:
                for name in shard_names:
                    tensors[name] = handle.get_tensor(name).to(dtype)
        return tensors


def materialise(module: nn.Module, prefix: str, reader: ShardReader, dtype: torch.dtype,
                device: torch.device) -> None:
    """Give a meta-device ``module`` its weights from the shards (``prefix`` is its qualified name)."""
    if any(True for _ in module.buffers()):
        raise EmlocError(f"{prefix} has buffers, which streaming cannot restore from a checkpoint: "
                         f"use the in-memory `emloc build` for this model")
    names = {name: f"{prefix}.{name}" for name, _ in module.named_parameters()}
    tensors = reader.load(list(names.values()), dtype)
    module.load_state_dict({name: tensors[key].to(device) for name, key in names.items()}, assign=True)


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to the meta device) and hand the freed memory back to the system."""
    module.to("meta")
    gc.collect()
    if _LIBC is not None:
        # glibc keeps freed large blocks in its heap (its mmap threshold grows after each free), so without
        # a trim the per-layer temporaries pile up as fragmentation and the peak grows layer after layer.
        _LIBC.malloc_trim(0)


@dataclass
class StreamedBuild:
    """What :func:`stream_build` did; the factors themselves are in the run directory (``run.factors()``)."""

    report: pd.DataFrame
    spectra: dict[str, dict[str, torch.Tensor]]
    seconds: float
    params_original: int
    layers: int
    stats: CalibrationStats | None = None
    """All layers' ``C``, only with ``keep_statistics=True`` (they can be larger than the model)."""


def skeleton(model_path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM built from its config on the meta device: the structure, no weights."""
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model.tie_weights()  # so shared embeddings count once, as in the loaded model
    return model.eval()


def _streamed_first_inputs(model: nn.Module, decoder: nn.Module, reader: ShardReader, features: list[dict],
                           pad_token_id: int, batch_size: int, dtype: torch.dtype,
                           device: torch.device) -> list[LayerBatch]:
    """Embed the calibration batches once (:func:`emloc.layerwalk.first_inputs`) with the embeddings read
    from the shards for the occasion and the rotary embeddings rebuilt off the meta device."""
    embed = decoder.embed_tokens
    materialise(embed, qualified_name(model, embed), reader, dtype, device)
    with torch.device(device):  # the skeleton's rotary buffers are on meta: rebuild them
        rotary = type(decoder.rotary_emb)(config=model.config)
    batches = first_inputs(model, features, pad_token_id, batch_size, device, embed, rotary)
    release(embed)
    return batches


@torch.no_grad()
def stream_layers(model_path: str | Path, features: list[dict], config: EmulatorConfig, pad_token_id: int,
                  parts_dir: Path, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                  batch_size: int = 8, keep_statistics: bool = False, progress: bool = True,
                  trust_remote_code: bool = False) -> StreamedBuild:
    """Calibrate and factor one decoder layer at a time; each layer's ``u``/``v`` go to
    ``parts_dir/layer_<i>.safetensors``; spectra and the report come back in a :class:`StreamedBuild`.

    With ``config.calibration == 'sequential'`` a second stream of hidden states (the emulator built so far)
    runs alongside (:mod:`emloc.sequential`): one layer's weights at a time still, twice the activations."""
    if not features:
        raise EmlocError("the calibration set is empty: set data.n_calibration >= 1 and provide "
                         "training data")
    start = time.perf_counter()
    dtype, device = resolve_dtype(dtype), torch.device(device)
    reader = ShardReader(model_path)
    model = skeleton(model_path, dtype, trust_remote_code)
    params_original = count_parameters(model)  # before releasing weights unties shared ones
    found = llama_decoder(model, "use the in-memory `emloc build` for it")
    layers_prefix = found.prefix
    linears, skip = sequential.decoder_targets(model, config, layers_prefix, "streaming",
                                               "use the in-memory build")
    batches = _streamed_first_inputs(model, found.decoder, reader, features, pad_token_id, batch_size, dtype,
                                     device)
    # the emulator's stream (sequential only): the hidden states of the emulator built so far
    emulated = [batch.hidden for batch in batches] if config.calibration == "sequential" else None
    spectra, rows, kept = {}, [], CalibrationStats({}, {}, {}, len(features))
    for index, layer in enumerate(tqdm(found.layers, desc="streamed layers", disable=not progress)):
        prefix = f"{layers_prefix}.{index}"
        materialise(layer, prefix, reader, dtype, device)
        layer_linears = {n: m for n, m in linears.items() if n.startswith(prefix + ".")}
        if emulated is None:
            stats = _calibrate_layer(layer, layer_linears, batches, device, len(features))
            u, v, layer_spectra, layer_rows = sequential.factor_layer(layer_linears, stats, config, skip)
        else:
            built = sequential.build_layer_sequentially(layer, prefix, layer_linears, batches, emulated,
                                                        device, len(features), config, skip)
            u, v, layer_spectra, layer_rows, stats, emulated = (built.u, built.v, built.spectra, built.rows,
                                                                built.stats, built.emulated)
        spectra.update(layer_spectra)
        rows.extend(layer_rows)
        io.write_tensors(parts_dir / f"layer_{index:05d}.safetensors", factor_tensors(u, v))
        if keep_statistics:
            merge_stats(kept, stats)
        release(layer)
    return StreamedBuild(typed(pd.DataFrame(rows)), spectra, time.perf_counter() - start, params_original,
                         len(found.layers), kept if keep_statistics else None)


def _calibrate_layer(layer: nn.Module, layer_linears: dict[str, nn.Module], batches: list[LayerBatch],
                     device: torch.device, n_samples: int) -> CalibrationStats:
    """``C`` for the layer's linears while every batch moves on through the (original) layer."""
    with recording_inputs(layer_linears, device) as accumulator:
        for batch in batches:
            accumulator.begin_batch(batch.token_mask)
            batch.hidden = through_layer(layer, batch.hidden, batch)
    return stats_from_accumulator(accumulator, n_samples)


def stream_build(run: Run, batch_size: int = 8, keep_statistics: bool = False) -> StreamedBuild:
    """Stage 1 (calibration + emulator) streamed layer by layer; writes the same artifacts as
    :func:`emloc.pipeline.build` (and the calibration's, with ``keep_statistics``)."""
    cfg = run.config
    if cfg.emulator.allocation != "uniform":
        raise EmlocError("emulator.allocation = 'global' needs every layer's spectrum before the first is "
                         "built, which the streamed build does not have: use allocation 'uniform' with "
                         "--stream")
    features = run.features("calibration")
    for stage in (["calibrate", "build"] if keep_statistics else ["build"]):
        run.begin(stage)
    run.save_config()
    run.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".emulator-parts-", dir=run.dir) as scratch:
        parts_dir = Path(scratch)
        result = stream_layers(resolve_model_path(cfg.model), features, cfg.emulator,
                               run.tokenizer.pad_token_id, parts_dir, cfg.dtype, run.device, batch_size,
                               keep_statistics, run.progress, cfg.trust_remote_code)
        if result.stats is not None:
            save_stats(run, result.stats, result.seconds, run.data_report())
        parts = sorted(parts_dir.glob("layer_*.safetensors"))
        save_emulator(run, lambda path: io.concat_safetensors(parts, path), result.spectra, result.report,
                      cfg.emulator.method, result.params_original, result.seconds)
    return result


def model_size(model_path: str | Path) -> dict[str, float]:
    """Parameters and bytes of a saved model: on disk (its safetensors files) and as float32 in memory."""
    folder = Path(model_path)
    disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        n_params = count_parameters(AutoModelForCausalLM.from_config(config))
    return {"parameters": n_params, "disk_bytes": disk, "float32_bytes": 4 * n_params}
