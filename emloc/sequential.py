"""Sequential calibration: the emulator built layer by layer (``emulator.calibration: sequential``).

Two streams of hidden states walk the decoder: the original model's and the emulator's built so far.
For decoder layer ``l`` the original layer gives ``X`` for each distinct linear input; the emulator's stream
gives ``X~``, group by group in forward order with the groups already built swapped in
(:func:`build_layer_sequentially`), accumulated as ``C = X X^T``, ``C~ = X~ X~^T`` and ``P = X X~^T``
(:class:`emloc.calibration.PairedStats`). Each linear's ``W'`` then minimises
``||W X - W' X~||_F^2 + delta ||W' - W||_F^2``, ``delta = sequential_damping * mean(diag C~)``
(:func:`emloc.lowrank.sequential_truncation`; ``delta = 0`` without damping). The original stream moves on
through the original layer, the emulator's through the layer with its low-rank linears swapped in.
The derivation and the cost are in ``docs/sequential.md``. The same per-layer steps serve the
in-memory build here and the layer-streamed one in :mod:`emloc.streaming`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emloc.calibration import PairedStats, paired_stats_from_accumulator, recording_inputs, target_linears
from emloc.config import EmulatorConfig
from emloc.svd_emulator import EmulatorFactors, factor_linear, set_submodule, swap_in_low_rank
from emloc.errors import EmlocError
from emloc.layerwalk import LayerBatch, first_inputs, llama_decoder, merge_stats, through_layer
from emloc.families import last_block_output
from emloc.targets import excluded_modules, typed


def decoder_targets(model: nn.Module, config: EmulatorConfig, layers_prefix: str, builder: str,
                    instead: str) -> tuple[dict[str, nn.Module], set[str]]:
    """The targeted linears (all inside the decoder layers, else a one-line error naming ``builder`` and the
    ``instead`` to use) and the ones left dense (:func:`emloc.targets.excluded_modules`)."""
    linears = target_linears(model, config.target_modules)
    outside = [name for name in linears if not name.startswith(layers_prefix + ".")]
    if outside:
        raise EmlocError(f"target {outside[0]} is outside the decoder layers: {builder} factors "
                         f"decoder-layer linears only; drop it from emulator.target_modules or {instead}")
    return linears, excluded_modules(linears, config, last_block_output(model))


def relative_to(prefix: str, factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``factors`` keyed by names relative to the layer ``prefix`` (``self_attn.q_proj``)."""
    return {name[len(prefix) + 1:]: tensor for name, tensor in factors.items()}


@contextlib.contextmanager
def low_rank_swapped(layer: nn.Module, u: dict[str, torch.Tensor],
                     v: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``layer`` with the named linears (names relative to ``layer``) replaced by ``u v``, restored on
    exit."""
    replaced = swap_in_low_rank(layer, u, v)
    try:
        yield layer
    finally:
        for name, linear in replaced.items():
            set_submodule(layer, name, linear)


@torch.no_grad()
def advance(layer: nn.Module, prefix: str, u: dict, v: dict, batches: list[LayerBatch],
            emulated: list[torch.Tensor]) -> list[torch.Tensor]:
    """The emulator's hidden states after ``layer`` with its factored linears (qualified names under
    ``prefix``) swapped for ``u v``."""
    with low_rank_swapped(layer, relative_to(prefix, u), relative_to(prefix, v)):
        return [through_layer(layer, hidden, batch) for batch, hidden in zip(batches, emulated)]


def factor_layer(layer_linears: dict[str, nn.Module], stats, config: EmulatorConfig, skip: set[str],
                 ranks: dict[str, int] | None = None):
    """``(u, v, spectra, report rows)`` of one layer's linears, leaving out those in ``skip``; ``ranks``
    overrides the ranks ``rho`` gives (a global allocation)."""
    u, v, spectra, rows, S_cache = {}, {}, {}, [], {}
    for name, linear in layer_linears.items():
        if name in skip:
            continue
        u[name], v[name], spectra[name], row = factor_linear(
            name, linear, stats, config, S_cache, rank=None if ranks is None else ranks[name])
        rows.append(row)
    return u, v, spectra, rows


@dataclass
class SequentialLayer:
    """One decoder layer built sequentially: its factors, spectra and report rows, the statistics of every
    linear group, and the emulator's hidden states after it."""

    u: dict
    v: dict
    spectra: dict
    rows: list
    stats: PairedStats
    emulated: list


@torch.no_grad()
def build_layer_sequentially(layer: nn.Module, prefix: str, layer_linears: dict[str, nn.Module],
                             batches: list[LayerBatch], emulated: list[torch.Tensor], device: torch.device,
                             n_samples: int, config: EmulatorConfig, skip: set[str],
                             ranks: dict[str, int] | None = None) -> SequentialLayer:
    """Factor one layer's linears group by group, in the order the forward pass reaches them.

    A group is the linears sharing one input (q/k/v, then o, then gate/up, then down). The original layer
    gives every group's ``X`` in one pass (the original stream then moves on: ``batch.hidden`` becomes the
    layer's output). A group's ``X~`` comes from the layer with the groups before it already replaced by
    their factors, so a later linear sees the inputs the emulator will really give it; with ``X~`` from the
    original upstream linears it would also correct drift that those linears already removed.
    """
    with recording_inputs(layer_linears, device) as accumulator:
        originals = []
        for batch in batches:
            originals.append(accumulator.capture(batch.token_mask))
            batch.hidden = through_layer(layer, batch.hidden, batch)
        accumulator.captured = None
        input_of = dict(accumulator.input_of)
    u, v, spectra, rows = {}, {}, {}, []
    stats = PairedStats({}, {}, {}, n_samples)
    for leader in list(originals[0]):
        members = {name: module for name, module in layer_linears.items() if input_of.get(name) == leader}
        with recording_inputs({leader: layer_linears[leader]}, device) as paired, \
                low_rank_swapped(layer, relative_to(prefix, u), relative_to(prefix, v)):
            for batch, hidden, X in zip(batches, emulated, originals):
                X_tilde = paired.capture(batch.token_mask)
                through_layer(layer, hidden, batch)
                paired.add_pair({leader: X[leader]}, X_tilde)
        group = paired_stats_from_accumulator(paired, n_samples)
        group.input_of = {name: leader for name in members}
        merge_stats(stats, group)
        group_u, group_v, group_spectra, group_rows = factor_layer(members, group, config, skip, ranks)
        u.update(group_u), v.update(group_v), spectra.update(group_spectra), rows.extend(group_rows)
    return SequentialLayer(u, v, spectra, rows, stats, advance(layer, prefix, u, v, batches, emulated))


@torch.no_grad()
def build_sequential(model: nn.Module, features: list[dict], config: EmulatorConfig, pad_token_id: int,
                     batch_size: int = 8, progress: bool = True,
                     keep_statistics: bool = False, ranks: dict[str, int] | None = None
                     ) -> tuple[EmulatorFactors, PairedStats | None]:
    """The emulator's factors, built layer by layer from the calibration samples; the model is not changed.

    With ``keep_statistics`` also returns all layers' statistics (``covariances`` are the original's ``C``,
    as :func:`emloc.calibration.collect_statistics` gives them, plus ``C~`` and ``P``: three times its
    memory).
    ``ranks`` (module -> rank, e.g. a global allocation from the independent statistics) overrides ``rho``.
    """
    if not features:
        raise EmlocError("the calibration set is empty: set data.n_calibration >= 1 and provide "
                         "training data")
    found = llama_decoder(model, "use emulator.calibration: independent for it")
    layers_prefix, device = found.prefix, next(model.parameters()).device
    linears, skip = decoder_targets(model, config, layers_prefix, "sequential calibration",
                                    "calibrate independently")
    batches = first_inputs(model, features, pad_token_id, batch_size, device, found.decoder.embed_tokens,
                           found.decoder.rotary_emb)
    emulated = [batch.hidden for batch in batches]
    u_all, v_all, spectra, rows = {}, {}, {}, []
    kept = PairedStats({}, {}, {}, len(features))
    for index, layer in enumerate(tqdm(found.layers, desc="sequential emulator", disable=not progress)):
        prefix = f"{layers_prefix}.{index}"
        layer_linears = {name: module for name, module in linears.items() if name.startswith(prefix + ".")}
        built = build_layer_sequentially(layer, prefix, layer_linears, batches, emulated, device,
                                         len(features), config, skip, ranks)
        emulated = built.emulated
        if keep_statistics:
            merge_stats(kept, built.stats)
        u_all.update(built.u), v_all.update(built.v), spectra.update(built.spectra), rows.extend(built.rows)
    return (EmulatorFactors(u_all, v_all, spectra, typed(pd.DataFrame(rows)), config.method),
            kept if keep_statistics else None)
