"""Stage 1b, the SVD emulator: the low-rank layer, its factors and their construction (and lean loading).

Each targeted ``nn.Linear`` becomes a :class:`LowRankLinear` with the same name, ``in_features`` and
``out_features``, so a LoRA adapter trained on it fits the original model. The emulator *kinds* (this one and
the structured baselines) behind one interface are in :mod:`emloc.emulator_kinds`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from emloc.calibration import CalibrationStats, PairedStats, target_linears
from emloc.config import EmulatorConfig
from emloc.errors import EmlocError
from emloc.lowrank import (break_even_rank, calibration_error, damped_gram, least_squares_target,
                           plain_truncation, rank_from_ratio, relative_error_curve, sequential_error,
                           whitened_basis, whitened_basis_from_gram, whitened_basis_from_right_gram,
                           whitening_factor, project_onto_basis)
from emloc.models import (contiguous_output_layer_input, meta_model, resolve_dtype,
                          resolve_model_path)
from emloc.families import is_linear_like, last_block_output, linear_shape, weight_matrix
from emloc.targets import excluded_modules, layer_index, module_type, ratio_for, typed

class LowRankLinear(nn.Module):
    """``y = u (v x) + b`` with ``u: (out, r)``, ``v: (r, in)``; a drop-in for ``nn.Linear``."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.rank = u.shape
        self.in_features = v.shape[1]
        self.down = nn.Linear(self.in_features, self.rank, bias=False, device=v.device, dtype=v.dtype)
        self.up = nn.Linear(self.rank, self.out_features, bias=bias is not None, device=u.device,
                            dtype=u.dtype)
        with torch.no_grad():
            self.down.weight.copy_(v)
            self.up.weight.copy_(u)
            if bias is not None:
                self.up.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``W' = u v`` (``out x in``), for inspection."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class EmulatorFactors:
    """The emulator's low-rank factors ``u``/``v`` per module, spectra, and the per-layer report."""

    u: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    spectra: dict[str, dict[str, torch.Tensor]]
    report: pd.DataFrame
    method: str

    def W_emulated(self, name: str) -> torch.Tensor:
        return self.u[name] @ self.v[name]


def _factorise(W: torch.Tensor, C: torch.Tensor, S_cache: dict, leader: str, r: int, method: str):
    """Return ``(u, v, sigma_whitened)``; the whitening factor ``S`` is cached per shared input."""
    if method == "plain":
        u, v, _ = plain_truncation(W, r)
        sigma = (whitened_basis_from_gram(W, C) if W.shape[0] < W.shape[1]
                 else whitened_basis(W, _S(C, S_cache, leader)))[1]
        return u, v, sigma
    # eigh on the smaller side of W S: (out x out) from C directly, or (in x in) through the shared S
    if W.shape[0] <= W.shape[1]:
        U, sigma = whitened_basis_from_gram(W, C)
    else:
        U, sigma = whitened_basis_from_right_gram(W, _S(C, S_cache, leader), r)
    u, v = project_onto_basis(W, U, r)
    return u, v, sigma


def _S(C: torch.Tensor, cache: dict, leader: str) -> torch.Tensor:
    if leader not in cache:
        cache[leader] = whitening_factor(C)
    return cache[leader]


def build_factors(model: nn.Module, stats: CalibrationStats, config: EmulatorConfig, progress: bool = True,
                  ranks: dict[str, int] | None = None) -> EmulatorFactors:
    """Compute rank-``r`` factors for every targeted linear; the model is not changed.

    ``r`` comes from ``ranks`` when given, else from ``config.allocation``: ``rho`` per module (uniform) or
    :func:`emloc.allocation.allocate` (global; the report then also lists the uniform rule's
    ``rank_uniform``).
    """
    if config.calibration == "sequential" and not isinstance(stats, PairedStats):
        raise EmlocError("emulator.calibration = 'sequential' builds from the calibration samples, not from "
                         "saved statistics: use emloc.sequential.build_sequential (or the streamed build)")
    linears = target_linears(model, config.target_modules)
    for name in excluded_modules(linears, config, last_block_output(model)):
        del linears[name]
    missing = [name for name in linears if name not in stats.input_of]
    if missing:
        raise EmlocError(f"calibration statistics do not cover {missing[0]}: they belong to another model or "
                         f"target list; re-run `emloc calibrate`")
    for leader, C in stats.covariances.items():
        if not torch.isfinite(C).all():
            raise EmlocError(f"calibration statistics of {leader} contain NaN or Inf: "
                             f"re-run `emloc calibrate` (and check the model's weights and dtype)")
    uniform = None
    if ranks is None and config.allocation == "global":
        from emloc.allocation import allocate  # here: emloc.allocation imports this module
        ranks, uniform = allocate(model, stats, config, progress)
    u_all, v_all, spectra, rows, S_cache = {}, {}, {}, [], {}
    for name, linear in tqdm(linears.items(), desc="emulator", disable=not progress):
        u_all[name], v_all[name], spectra[name], row = factor_linear(
            name, linear, stats, config, S_cache, rank=None if ranks is None else ranks[name])
        rows.append(row | ({} if uniform is None else {"rank_uniform": uniform[name]}))
        if len(S_cache) > 1:  # keep only the current shared input's factor
            S_cache.pop(next(iter(S_cache)))
    return EmulatorFactors(u_all, v_all, spectra, typed(pd.DataFrame(rows)), config.method)


def factor_linear(name: str, linear: nn.Linear, stats: CalibrationStats, config: EmulatorConfig,
                  S_cache: dict | None = None,
                  rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """One linear's ``(u, v, spectra, report_row)``; shared by the in-memory and the layer-streamed builds.

    ``u``/``v`` are in the layer's dtype on the CPU; ``S_cache`` reuses ``S`` across linears sharing an input;
    ``rank`` overrides the rank ``rho`` gives.
    With :class:`PairedStats` (sequential calibration) ``W'`` minimises
    ``||W X - W' X~||_F^2 + delta ||W' - W||_F^2`` (``delta = sequential_damping * mean(diag C~)``): the
    truncation of the ridge solution ``W_ls`` under ``C~ + delta I``
    (:func:`emloc.lowrank.sequential_truncation`); the report's ``calibration_error`` is
    ``||W X - W' X~||_F / ||W X||_F`` and the whitened spectrum that of ``W_ls`` under ``C~ + delta I``.
    """
    compute = torch.float64 if config.compute_dtype == "float64" else torch.float32
    W = weight_matrix(linear).to(compute)
    C = stats.C(name).to(W.device, compute)
    out_features, in_features = W.shape
    rho = ratio_for(name, config)
    r = rank_from_ratio(rho, out_features, in_features) if rank is None else int(rank)
    if not 1 <= r <= min(out_features, in_features):
        raise EmlocError(f"rank {r} for {name} is outside 1..{min(out_features, in_features)}: "
                         f"fix the ranks passed to build_factors")
    S_cache = {} if S_cache is None else S_cache
    if isinstance(stats, PairedStats):
        C_tilde, P = stats.C_tilde(name).to(W.device, compute), stats.P(name).to(W.device, compute)
        W_ls = least_squares_target(W, C_tilde, P, config.sequential_damping)
        u, v, sigma = _factorise(W_ls, damped_gram(C_tilde, config.sequential_damping), S_cache,
                                 stats.input_of[name], r, config.method)
        error = sequential_error(W, u @ v, C, P, C_tilde)
    else:
        u, v, sigma = _factorise(W, C, S_cache, stats.input_of[name], r, config.method)
        error = None
    sigma_plain = torch.linalg.svdvals(W)
    spectra = {"whitened": sigma.float().cpu(), "plain": sigma_plain.float().cpu()}
    row = _report_row(name, W, C, u @ v, sigma, r, rho, linear)
    if error is not None:
        row["calibration_error"] = error
    # contiguous: u = U[:, :r] is otherwise a view holding all of U
    return u.to(linear.weight.dtype).cpu().contiguous(), v.to(linear.weight.dtype).cpu(), spectra, row


def _report_row(name, W, C, W_emulated, sigma, r, rho, linear) -> dict:
    out_features, in_features = W.shape
    params_before = out_features * in_features + (linear.bias.numel() if linear.bias is not None else 0)
    params_after = r * (out_features + in_features) + (linear.bias.numel() if linear.bias is not None else 0)
    return {
        "module": name, "layer": layer_index(name), "type": module_type(name),
        "out_features": out_features, "in_features": in_features, "ratio": rho, "rank": r,
        "break_even_rank": break_even_rank(out_features, in_features),
        "params_before": params_before, "params_after": params_after,
        "calibration_error": calibration_error(W, W_emulated, C),
        "whitened_error_at_rank": float(relative_error_curve(sigma)[min(r, len(sigma))]),
    }


def emulate(model: nn.Module, factors: EmulatorFactors, copy_model: bool = True) -> nn.Module:
    """Return the emulator: ``model`` with each factored linear swapped for a :class:`LowRankLinear`.

    With ``copy_model=False`` the swap happens in place (saves memory when the caller owns ``model``).
    """
    emulator = copy.deepcopy(model) if copy_model else model
    swap_in_low_rank(emulator, factors.u, factors.v)
    return emulator


def swap_in_low_rank(root: nn.Module, u: dict[str, torch.Tensor],
                     v: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """Replace, in place, each linear ``root.<name>`` by a :class:`LowRankLinear` ``u[name] v[name]``
    (same bias); returns the replaced linears by name, so a caller can put them back."""
    modules = dict(root.named_modules())
    replaced = {}
    for name in u:
        if name not in modules or not is_linear_like(modules[name]):
            raise EmlocError(f"emulator factors name {name}, which is not a linear layer of this model: "
                             f"the emulator was built for another model; rebuild it with `emloc build`")
        linear = modules[name]
        u_name, v_name = u[name], v[name]
        if (u_name.shape[0], v_name.shape[1]) != linear_shape(linear):
            raise EmlocError(f"emulator factors for {name} have shape "
                             f"{tuple(u_name.shape)}x{tuple(v_name.shape)}, "
                             f"which does not fit {linear_shape(linear)}: rebuild with `emloc build`")
        device, dtype = linear.weight.device, linear.weight.dtype
        bias = linear.bias.detach() if linear.bias is not None else None
        set_submodule(root, name, LowRankLinear(u_name.to(device, dtype), v_name.to(device, dtype), bias))
        replaced[name] = linear
    return replaced


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_emulator_lean(model: str, factors, dtype: str = "float32", trust_remote_code: bool = False):
    """The emulator built without ever holding the original model's targeted weights in memory.

    The architecture is made on the meta device, each factored linear becomes a ``LowRankLinear``
    from ``factors``, and only the remaining tensors are read from the safetensors files. This is how
    LoRA on the emulator stays within the inference memory budget (the usual ``emulate(load_model())``
    holds the original first).
    """
    path = Path(resolve_model_path(model))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise EmlocError(f"{model} has no safetensors files: the lean emulator loader reads safetensors only")
    torch_dtype = resolve_dtype(dtype)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    emulator = meta_model(config)
    for name in factors.u:
        parent_name, _, child = name.rpartition(".")
        parent = emulator.get_submodule(parent_name)
        has_bias = getattr(parent, child).bias is not None
        u, v = factors.u[name].to(torch_dtype), factors.v[name].to(torch_dtype)
        def shaped(t):
            return torch.empty(t.shape, dtype=torch_dtype, device="meta")
        low_rank = LowRankLinear(shaped(u), shaped(v), shaped(u[:, 0]) if has_bias else None)
        # use the factor tensors themselves: a copy would hold the emulator twice at the peak
        low_rank.up.weight, low_rank.down.weight = nn.Parameter(u), nn.Parameter(v)
        setattr(parent, child, low_rank)
    skip = {f"{name}.weight" for name in factors.u}
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            state.update({key: handle.get_tensor(key).to(torch_dtype) for key in handle.keys()
                          if key not in skip})
    state = {(k[: -len(".bias")] + ".up.bias" if k[: -len(".bias")] in factors.u else k): t
             for k, t in state.items()}
    emulator.load_state_dict(state, strict=False, assign=True)
    emulator.tie_weights()
    # non-persistent buffers (rotary) were made on meta
    for module_name, module in list(emulator.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = module_name.rpartition(".")
            setattr(emulator.get_submodule(parent_name) if parent_name else emulator, child,
                    type(module)(config=config))
    left = [n for n, t in [*emulator.named_parameters(), *emulator.named_buffers()] if t.is_meta]
    if left:
        raise EmlocError(f"the lean emulator loader found no weights for {left[0]} in the checkpoint's "
                         f"tensor names")
    contiguous_output_layer_input(emulator)
    return emulator.eval()
