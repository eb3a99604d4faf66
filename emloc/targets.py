"""Which linears an emulator targets, by name: their layer index, module type, ratio and the ones left dense.

Pure functions of qualified module names (``model.layers.3.mlp.down_proj``) and config values; the modules
that walk a model (:mod:`emloc.svd_emulator`, :mod:`emloc.allocation`, :mod:`emloc.sequential`) ask here.
"""
from __future__ import annotations

import re

DOWN_PROJECTIONS = ("down_proj", "w2", "fc2")
"""Names of the MLP down projection in Llama/Qwen/Mistral, InternLM2 and OPT-style decoders."""


def ratio_for(name: str, config) -> float:
    """The parameter-retention ratio rho of module ``name``: the first pattern of ``config.ratio_patterns``
    that matches wins, else ``config.ratio`` (``config``: an :class:`~emloc.config.EmulatorConfig`)."""
    for pattern, ratio in config.ratio_patterns.items():
        if re.fullmatch(pattern, name) or re.search(pattern, name):
            return float(ratio)
    return float(config.ratio)


def module_type(name: str) -> str:
    """``q_proj`` for ``model.layers.0.self_attn.q_proj``."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int:
    """The decoder layer a module sits in (``3`` for ``model.layers.3.mlp.up_proj``), ``-1`` outside the
    layers."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def excluded_modules(names, config, last_layer: str | None) -> set[str]:
    """Targeted linears the emulator keeps dense: with ``config.skip_last_down_proj``, the MLP down
    projection of the last decoder layer (qualified name ``last_layer``, e.g. ``model.layers.29``; the
    official configuration compresses every other decoder linear). Without a known last layer: the down
    projection with the highest layer index."""
    if not config.skip_last_down_proj:
        return set()
    downs = [name for name in names if module_type(name) in DOWN_PROJECTIONS]
    if last_layer is None:
        last_index = max((layer_index(name) for name in downs), default=-1)
        return {name for name in downs if last_index >= 0 and layer_index(name) == last_index}
    return {name for name in downs if name.startswith(last_layer + ".")}
