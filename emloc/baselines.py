"""Baseline emulators with the EMLoC emulator's parameter budget: layer drop and structured pruning.

- ``layer_drop`` (Offsite-Tuning style): keep the first and last decoder layers and a uniform subset of
  the middle ones, ``round(rho * L)`` in all; a dropped layer becomes the identity. LoRA on dropped
  layers is never trained: in the transferred adapter those modules keep their initialisation
  (``B = 0``), so they add nothing.
- ``prune`` (LORAM / UPop style): per layer keep the most important MLP channels and query heads,
  by the activation-aware score ``||x_j|| * ||W_{:, j}||`` on the input of ``down_proj`` / ``o_proj``
  (``||x_j||^2 = C_jj`` from the calibration statistics). Key/value heads are kept, and the same
  number of query heads is kept in every key/value group, so grouped-query attention still works.
  LoRA trained on the pruned model is recovered to the original shapes by zero filling the
  rows (``B``) or columns (``A``) of the pruned channels.

Both budgets target the SVD emulator's: ``rho`` times the parameters of the targeted linears.
The artifact is a :class:`StructuredEmulator` (indices of what is kept), applied to a fresh model by
:func:`apply_structured`. LoRA correction does not apply to these emulators (there is no ``W'``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import pandas as pd
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from emloc import io
from emloc.calibration import CalibrationStats, target_linears
from emloc.config import EmulatorConfig, LoraConfigSpec
from emloc.svd_emulator import count_parameters
from emloc.families import linear_shape
from emloc.targets import layer_index, module_type, typed
from emloc.errors import EmlocError
from emloc.lora import add_lora
from emloc.models import find_decoder_layers

METHODS = ("layer_drop", "prune")
ROW_PRUNED = ("q_proj", "gate_proj", "up_proj")
"""Linears whose output rows are pruned (their LoRA ``B`` is zero filled)."""
COL_PRUNED = ("o_proj", "down_proj")
"""Linears whose input columns are pruned (their LoRA ``A`` is zero filled)."""
PRUNE_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj")
"""What ``prune`` reads of every decoder layer (Llama-style layers have them)."""
DECODER_REMEDY = "layer_drop and prune support Llama-style models; use method activation_aware or plain"
"""The end of the error when a model's decoder layers cannot be found."""


def is_structured(method: str) -> bool:
    return method in METHODS


@dataclass
class StructuredEmulator:
    """What a baseline emulator keeps of the original model.

    ``kept_layers``: decoder layer indices kept (layer drop; all layers for pruning).
    ``rows[name]`` / ``cols[name]``: kept output rows / input columns (long tensors) of pruned linears.
    ``report``: one row per targeted linear with ``params_before`` and ``params_after``.
    """

    method: str
    n_layers: int
    kept_layers: list[int]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)
    report: pd.DataFrame = field(default_factory=pd.DataFrame)
    kv_groups: dict[int, int] = field(default_factory=dict)
    """Pruning: query heads kept per key/value head, by layer."""

    # the emloc.emulator_kinds.Emulator interface
    corrects: ClassVar[bool] = False
    """No LoRA correction: these emulators have no dense ``W'`` to correct against."""
    transfer_adapter: ClassVar[str] = "recovered"
    """The emulator-trained adapter zero filled / completed to the original shapes
    (:meth:`recover_adapter`)."""

    @classmethod
    def build(cls, model: nn.Module, stats: CalibrationStats, config: EmulatorConfig,
              progress: bool = True) -> "StructuredEmulator":
        return build_structured(model, stats, config)

    @classmethod
    def load(cls, folder: Path, method: str | None = None) -> "StructuredEmulator":
        return load_structured(folder)

    def save(self, folder: Path) -> None:
        save_structured(self, folder)

    def apply(self, model: nn.Module) -> nn.Module:
        return apply_structured(model, self)

    def parameters(self, params_original: int, fresh_model: Callable[[], nn.Module]) -> int:
        return count_parameters(self.apply(fresh_model()))

    def recover_adapter(self, trained: PeftModel, original: nn.Module, spec: LoraConfigSpec,
                        target_modules: list[str], seed: int) -> PeftModel:
        return recover_adapter(trained, original, spec, target_modules, seed, self)


# ---- pure selection rules ---------------------------------------------------------------------

def uniform_layer_subset(n_layers: int, n_keep: int) -> list[int]:
    """First, last and ``n_keep - 2`` evenly spaced middle layers (sorted, distinct)."""
    n_keep = max(2, min(n_layers, n_keep))
    if n_keep >= n_layers:
        return list(range(n_layers))
    kept = {int(round(float(i))) for i in torch.linspace(0, n_layers - 1, n_keep)}
    candidates = iter(range(1, n_layers - 1))
    while len(kept) < n_keep:  # rounding may collide: fill with the lowest unused middle layer
        kept.add(next(candidates))
    return sorted(kept)


def channel_importance(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Score of each input channel ``j`` of ``W`` (``out x in``): ``sqrt(C_jj) * ||W_{:, j}||`` (``in``)."""
    return C.diagonal().clamp_min(0).sqrt() * W.norm(dim=0)


def head_importance(W_o: torch.Tensor, C_o: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per query head ``h``: ``sqrt(sum_{j in h} C_jj ||W_o[:, j]||^2)`` from ``o_proj``'s input
    (``n_heads``)."""
    scores = channel_importance(W_o, C_o).pow(2)
    return scores.view(-1, head_dim).sum(1).sqrt()


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order (keeps the original channel order)."""
    return torch.topk(scores, k).indices.sort().values


def heads_to_keep(scores: torch.Tensor, n_kv_heads: int, per_group: int) -> torch.Tensor:
    """Keep the ``per_group`` best query heads inside each key/value group (heads are group-major)."""
    groups = scores.view(n_kv_heads, -1)
    kept = [g * groups.shape[1] + top_k_sorted(groups[g], per_group) for g in range(n_kv_heads)]
    return torch.cat(kept)


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ``q_proj`` output rows (= ``o_proj`` input columns) of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def zero_fill(A: torch.Tensor, B: torch.Tensor, out_features: int, in_features: int,
              rows: torch.Tensor | None = None,
              cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA ``(A, B)`` of a pruned linear -> the original shapes ``A: (r, in)``, ``B: (out, r)``.

    ``B A`` lands on the kept rows/columns and the pruned ones get zero, so the recovered update is the
    pruned update placed inside the original weight.
    """
    A_full = A.new_zeros(A.shape[0], in_features)
    B_full = B.new_zeros(out_features, B.shape[1])
    A_full[:, cols if cols is not None else slice(None)] = A
    B_full[rows if rows is not None else slice(None)] = B
    return A_full, B_full


# ---- building the artifacts -------------------------------------------------------------------

def _targeted_report(model: nn.Module, config: EmulatorConfig, params_after) -> pd.DataFrame:
    rows = []
    for name, linear in target_linears(model, config.target_modules).items():
        before = linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
        rows.append({"module": name, "layer": layer_index(name), "type": module_type(name),
                     "out_features": linear_shape(linear)[0], "in_features": linear_shape(linear)[1],
                     "ratio": config.ratio, "params_before": before,
                     "params_after": params_after(name, linear)})
    return typed(pd.DataFrame(rows))


def build_layer_drop(model: nn.Module, config: EmulatorConfig) -> StructuredEmulator:
    """Keep ``round(rho * L)`` decoder layers (at least the first and last)."""
    n_layers = len(find_decoder_layers(model, DECODER_REMEDY).layers)
    kept = uniform_layer_subset(n_layers, round(config.ratio * n_layers))

    def after(name, linear):
        if layer_index(name) not in kept:
            return 0
        return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)
    return StructuredEmulator("layer_drop", n_layers, kept, report=_targeted_report(model, config, after))


def _attention_shapes(attention: nn.Module) -> tuple[int, int, int]:
    head_dim = attention.head_dim
    n_heads = attention.q_proj.out_features // head_dim
    n_kv = attention.k_proj.out_features // head_dim
    return head_dim, n_heads, n_kv


def prune_sizes(ratio: float, hidden: int, intermediate: int, head_dim: int, n_heads: int,
                n_kv: int) -> tuple[int, int]:
    """``(query heads per group, MLP channels)`` so one layer's q/k/v/o/gate/up/down keep about ``ratio``
    of their weights: heads first (whole heads, at least one per group), the MLP takes the rest."""
    groups = n_heads // n_kv
    per_group = max(1, min(groups, round(ratio * groups)))
    total = 2 * hidden * n_heads * head_dim + 2 * hidden * n_kv * head_dim + 3 * hidden * intermediate
    attention = 2 * hidden * n_kv * per_group * head_dim + 2 * hidden * n_kv * head_dim
    channels = round((ratio * total - attention) / (3 * hidden))
    return per_group, max(1, min(intermediate, channels))


def build_prune(model: nn.Module, stats: CalibrationStats, config: EmulatorConfig) -> StructuredEmulator:
    """Keep the most important query heads and MLP channels of every layer (activation-aware scores)."""
    found = find_decoder_layers(model, DECODER_REMEDY)
    layers = found.layers
    rows, cols, groups = {}, {}, {}
    for i, layer in enumerate(layers):
        names = {name for name, _ in layer.named_modules()}
        missing = [part for part in PRUNE_PARTS if part not in names]
        if missing:
            raise EmlocError(f"prune needs Llama-style decoder layers ({', '.join(PRUNE_PARTS)}); "
                             f"{type(layer).__name__} has no {missing[0]}: use method layer_drop, "
                             f"activation_aware or plain")
        attention, mlp = layer.self_attn, layer.mlp
        prefix = f"{found.prefix}.{i}"
        for name in (f"{prefix}.self_attn.o_proj", f"{prefix}.mlp.down_proj"):
            if name not in stats.input_of:
                raise EmlocError(f"prune needs calibration statistics of {name}: keep o_proj and down_proj "
                                 f"in emulator.target_modules and re-run `emloc calibrate`")
        head_dim, n_heads, n_kv = _attention_shapes(attention)
        per_group, channels = prune_sizes(config.ratio, attention.q_proj.in_features,
                                          mlp.down_proj.in_features, head_dim, n_heads, n_kv)
        W_o, W_down = attention.o_proj.weight.detach().double(), mlp.down_proj.weight.detach().double()
        heads = heads_to_keep(head_importance(W_o, stats.C(f"{prefix}.self_attn.o_proj").double(), head_dim),
                              n_kv, per_group)
        q_rows = head_rows(heads, head_dim)
        mlp_kept = top_k_sorted(channel_importance(W_down, stats.C(f"{prefix}.mlp.down_proj").double()),
                                channels)
        rows |= {f"{prefix}.self_attn.q_proj": q_rows, f"{prefix}.mlp.gate_proj": mlp_kept,
                 f"{prefix}.mlp.up_proj": mlp_kept}
        cols |= {f"{prefix}.self_attn.o_proj": q_rows, f"{prefix}.mlp.down_proj": mlp_kept}
        groups[i] = per_group

    def after(name, linear):
        bias = linear.bias.numel() if linear.bias is not None else 0
        if name in rows:
            return len(rows[name]) * linear.in_features + (len(rows[name]) if bias else 0)
        if name in cols:
            return linear.out_features * len(cols[name]) + bias
        return linear.weight.numel() + bias
    return StructuredEmulator("prune", len(layers), list(range(len(layers))), rows, cols,
                              _targeted_report(model, config, after), groups)


def build_structured(model: nn.Module, stats: CalibrationStats, config: EmulatorConfig) -> StructuredEmulator:
    """The baseline emulator named by ``config.method``; the model is not changed."""
    if config.ratio_patterns:
        raise EmlocError(f"emulator.ratio_patterns is not supported by method {config.method!r}: "
                         f"remove it or use activation_aware / plain")
    if config.method == "layer_drop":
        return build_layer_drop(model, config)
    if config.method == "prune":
        return build_prune(model, stats, config)
    raise EmlocError(f"{config.method!r} is not a structured baseline: use one of {', '.join(METHODS)}")


# ---- applying, saving, loading ----------------------------------------------------------------

class SkippedLayer(nn.Module):
    """A dropped decoder layer: returns its input hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    W = linear.weight.detach()
    W = W[rows.to(W.device)] if rows is not None else W
    W = W[:, cols.to(W.device)] if cols is not None else W
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias[rows.to(bias.device)]
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias.detach())
    return new


def apply_structured(model: nn.Module, emulator: StructuredEmulator) -> nn.Module:
    """Turn ``model`` (in place) into the baseline emulator; module names of kept parts do not change."""
    layers = find_decoder_layers(model, DECODER_REMEDY).layers
    if len(layers) != emulator.n_layers:
        raise EmlocError(f"the {emulator.method} emulator was built for {emulator.n_layers} layers, this "
                         f"model has {len(layers)}: rebuild it with `emloc build`")
    for i in range(len(layers)):
        if i not in emulator.kept_layers:
            layers[i] = SkippedLayer()
    for name in sorted(set(emulator.rows) | set(emulator.cols)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _sliced_linear(getattr(parent, child), emulator.rows.get(name),
                                              emulator.cols.get(name)))
    for i, per_group in emulator.kv_groups.items():
        layers[i].self_attn.num_key_value_groups = per_group
    return model


def save_structured(emulator: StructuredEmulator, folder: Path) -> None:
    io.write_json(folder / "structured.json",
                  {"method": emulator.method, "n_layers": emulator.n_layers,
                   "kept_layers": emulator.kept_layers,
                   "kv_groups": {str(k): v for k, v in emulator.kv_groups.items()}})
    # the same index tensor serves several linears (q rows = o cols): store copies, safetensors refuses
    # shared memory
    io.write_tensors(folder / "indices.safetensors",
                     {**{f"{n}.rows": t.clone() for n, t in emulator.rows.items()},
                      **{f"{n}.cols": t.clone() for n, t in emulator.cols.items()}})
    with io.atomic_path(folder / "report.csv") as tmp:
        emulator.report.to_csv(tmp, index=False)


def load_structured(folder: Path) -> StructuredEmulator:
    meta = io.read_json(folder / "structured.json")
    tensors = io.read_tensors(folder / "indices.safetensors")
    rows = {k[:-5]: t for k, t in tensors.items() if k.endswith(".rows")}
    cols = {k[:-5]: t for k, t in tensors.items() if k.endswith(".cols")}
    return StructuredEmulator(meta["method"], meta["n_layers"], meta["kept_layers"], rows, cols,
                              pd.read_csv(folder / "report.csv"),
                              {int(k): v for k, v in meta["kv_groups"].items()})


# ---- recovering the adapter for the original model --------------------------------------------

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def recover_state_dict(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                       emulator: StructuredEmulator) -> dict[str, torch.Tensor]:
    """peft state dicts (``get_peft_model_state_dict``) -> the adapter for the original model.

    ``initial`` is a fresh adapter on the original model (every key, ``B = 0``); each trained module
    replaces its entry, zero filled where the module was pruned. Dropped layers keep ``initial``.
    """
    recovered = dict(initial)
    for key, tensor in trained.items():
        match = _LORA_KEY.match(key)
        if key not in initial:
            raise EmlocError(f"adapter key {key} has no counterpart on the original model: the adapter was "
                             f"trained on another emulator")
        if match is None:
            recovered[key] = tensor
            continue
        module, which = match["module"], match["which"]
        key_A, key_B = (key.replace(f"lora_{which}.", f"lora_{w}.") for w in "AB")
        A, B = zero_fill(trained[key_A], trained[key_B], initial[key_B].shape[0], initial[key_A].shape[1],
                         emulator.rows.get(module), emulator.cols.get(module))
        recovered[key] = A if which == "A" else B
    return recovered


def recover_adapter(trained: PeftModel, original: nn.Module, spec: LoraConfigSpec, target_modules: list[str],
                    seed: int, emulator: StructuredEmulator) -> PeftModel:
    """A peft model on ``original`` carrying the emulator-trained adapter in the original shapes.

    Modules the emulator lacks (dropped layers) keep the fresh initialisation from ``seed`` (``B = 0``).
    """
    recovered = add_lora(original, spec, target_modules, seed)
    state = recover_state_dict(get_peft_model_state_dict(trained), get_peft_model_state_dict(recovered),
                               emulator)
    set_peft_model_state_dict(recovered, state)
    recovered.eval()
    return recovered
