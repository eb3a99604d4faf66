"""Which linears an emulator targets, by name: their layer index, module type, ratio and the ones left dense.

Pure functions of qualified module names (``model.layers.3.mlp.down_proj``) and config values; the modules
that walk a model (:mod:`emloc.svd_emulator`, :mod:`emloc.allocation`, :mod:`emloc.sequential`) ask here, and
:mod:`emloc.families` finds the names from a model's structure.
"""
from __future__ import annotations

import re

import pandas as pd

AUTO = "auto"
"""``emulator.target_modules: [auto]`` (the default): every linear-like layer inside the decoder blocks, found
from the model's structure (:func:`emloc.families.automatic_targets`)."""

DOWN_PROJECTIONS = ("down_proj", "w2", "fc2")
"""Names of the MLP down projection in Llama/Qwen/Mistral, InternLM2 and OPT-style decoders (the fallback
when a model's blocks are unknown)."""

_IN_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
"""``<blocks>.<index>.<path in the block>``: ``model.layers`` . ``3`` . ``mlp.down_proj``."""


def ratio_for(name: str, config) -> float:
    """The parameter-retention ratio rho of module ``name``: the first pattern of ``config.ratio_patterns``
    that matches wins, else ``config.ratio`` (``config``: an :class:`~emloc.config.EmulatorConfig`)."""
    for pattern, ratio in config.ratio_patterns.items():
        if re.fullmatch(pattern, name) or re.search(pattern, name):
            return float(ratio)
    return float(config.ratio)


def module_type(name: str) -> str:
    """The last part of a name: ``q_proj`` for ``model.layers.0.self_attn.q_proj`` (see :func:`module_types`
    for the type that stays unique within a block)."""
    return name.rsplit(".", 1)[-1]


def block_path(name: str) -> tuple[str, str] | None:
    """``(blocks, path in the block)`` of a qualified name (``("model.layers", "mlp.down_proj")`` for
    ``model.layers.3.mlp.down_proj``), or None outside any block."""
    match = _IN_BLOCK.match(name)
    return (match.group(1), match.group(3)) if match else None


def module_types(names) -> dict[str, str]:
    """Qualified name -> module type: the shortest suffix of the module's path inside its block that no other
    path of ``names`` inside the same list of blocks ends with. ``q_proj`` for Llama's
    ``model.layers.0.self_attn.q_proj``; ``attn.c_proj`` and ``mlp.c_proj`` for GPT-2's two ``c_proj`` (in
    every block, also where one of them is left out); a suffix never starts at a list index (``to_out.0``,
    not ``0``); a name outside any block keeps its last part."""
    located = {name: block_path(name) for name in names}
    paths: dict[str, set[tuple[str, ...]]] = {}
    for where in filter(None, located.values()):
        paths.setdefault(where[0], set()).add(tuple(where[1].split(".")))
    types = {}
    for name, where in located.items():
        if where is None:
            types[name] = module_type(name)
            continue
        parts, siblings = tuple(where[1].split(".")), paths[where[0]]
        k = next((k for k in range(1, len(parts) + 1)
                  if not parts[-k].isdigit() and sum(other[-k:] == parts[-k:] for other in siblings) == 1),
                 len(parts))
        types[name] = ".".join(parts[-k:])
    return types


def typed(report: pd.DataFrame) -> pd.DataFrame:
    """``report`` (one row per module) with its ``type`` column set by :func:`module_types`."""
    if report.empty or "module" not in report:
        return report
    return report.assign(type=report["module"].map(module_types(list(report["module"]))))


def layer_index(name: str) -> int:
    """The decoder layer a module sits in (``3`` for ``model.layers.3.mlp.up_proj``), ``-1`` outside the
    layers."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def excluded_modules(names, config, last_block_output: str | None) -> set[str]:
    """Targeted linears the emulator keeps dense: with ``config.skip_last_down_proj``, the MLP output
    projection of the last decoder layer, located by position (``last_block_output``: the last linear-like
    layer of the last block, :func:`emloc.families.last_block_output`; the official configuration compresses
    every other decoder linear), when it is targeted. Without a known block: the down projection (by name)
    with the highest layer index."""
    if not config.skip_last_down_proj:
        return set()
    if last_block_output is not None:
        return {last_block_output} & set(names)
    downs = [name for name in names if module_type(name) in DOWN_PROJECTIONS]
    last_index = max((layer_index(name) for name in downs), default=-1)
    return {name for name in downs if last_index >= 0 and layer_index(name) == last_index}


def targeting_summary(names, kept_dense) -> str:
    """One line naming what an emulator targets: module types with their counts and the layers kept dense,
    e.g. ``targets: 210 linear layers in 30 blocks (q_proj 30, ...); kept dense: model.layers.29.mlp...``."""
    types = module_types(list(names))
    counts = pd.Series(list(types.values()), dtype=object).value_counts(sort=False)
    blocks = {layer_index(name) for name in names}
    line = (f"targets: {len(types)} linear layers in {len(blocks)} blocks "
            f"({', '.join(f'{kind} {count}' for kind, count in counts.items())})")
    return line + (f"; kept dense: {', '.join(sorted(kept_dense))}" if kept_dense else "")
