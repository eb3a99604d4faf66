"""The model-family interface: where a model's repeated blocks are, which of their layers are linear-like, and
what every stage reads from such a layer (``W`` as ``out x in``, its shape).

A family says how to find the blocks and which linears inside a block stay dense; everything else (the
automatic targets, their module types, the layer left dense by position) follows from the structure. Causal
language models of any architecture are one family: Llama, Qwen2, Phi-3 and OPT use ``nn.Linear``; GPT-2 uses
transformers' ``Conv1D`` (``y = x W + b`` with ``W`` stored ``in x out``), which every stage reads through
:func:`weight_matrix`. A diffusion transformer or a vision-language model adds a :class:`ModelFamily` with its
own block finder and dense rule.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig
from transformers.pytorch_utils import Conv1D

from emloc.config import RunConfig
from emloc.errors import EmlocError
from emloc.models import DecoderLayers, find_decoder_layers, meta_model, resolve_model_path
from emloc.targets import AUTO, block_path, module_types

LINEAR_LIKE = (nn.Linear, Conv1D)
"""The layer classes an emulator compresses: ``nn.Linear`` (``W``: ``out x in``) and ``Conv1D`` (stored
``in x out``)."""


PEFT_WRAPPABLE = (*LINEAR_LIKE, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
"""Layers peft's LoRA wraps when a target suffix matches them (a DiT's patch embedding ``pos_embed.proj`` is a
``Conv2d``, so the type ``proj`` alone would reach it)."""


@dataclass(frozen=True)
class ModelFamily:
    """What the stages need to know about a kind of model."""

    name: str
    find_blocks: Callable[[nn.Module], DecoderLayers | None]
    """The repeated blocks in forward order (decoder layers, transformer blocks), or None."""
    keeps_dense: Callable[[str], bool] = lambda relative_name: False
    """Linears inside a block that stay dense by their path in the block (e.g. a DiT's adaLN modulation)."""
    peft_task_type: str | None = "CAUSAL_LM"
    """peft's ``task_type`` for LoRA on this family (None: a plain ``PeftModel``, e.g. a denoiser)."""


CAUSAL_LM = ModelFamily("causal language model", find_decoder_layers)

CONDITIONING = re.compile(r"(^|\.)norm[^.]*\.(linear|emb)(\.|$)")
"""A diffusion block's conditioning layers: the adaLN modulation (``norm1.linear``, 6 x dim outputs from the
timestep and class embedding) and the timestep embedder inside it (``norm1.emb.timestep_embedder.*``)."""


def transformer_blocks(model: nn.Module) -> DecoderLayers | None:
    """A diffusers transformer's blocks: its ``transformer_blocks`` list (DiT, PixArt, FLUX's first stack)."""
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        return None
    return DecoderLayers(model, blocks, "transformer_blocks")


def diffusion_transformer(keep_conditioning_dense: bool = True) -> ModelFamily:
    """The diffusion-transformer family; ``keep_conditioning_dense`` leaves the adaLN modulation and timestep
    layers (:data:`CONDITIONING`) out of the automatic targets (cutting them changes every block's scale and
    shift at once)."""
    dense = (lambda relative: CONDITIONING.search(relative) is not None) if keep_conditioning_dense else None
    return ModelFamily("diffusion transformer", transformer_blocks, dense or (lambda relative: False), None)


def family_of(model: nn.Module) -> ModelFamily:
    """The family of ``model``: a diffusion transformer (a ``transformer_blocks`` list and no decoder), else a
    causal language model."""
    if transformer_blocks(model) is not None and not hasattr(model, "get_decoder"):
        return diffusion_transformer()
    return CAUSAL_LM


def matches_target(name: str, patterns: list[str]) -> bool:
    """A module is targeted when its name ends with a pattern (``q_proj``, ``attn.c_proj``) or fully matches
    it as a regex."""
    return any(name == p or name.endswith("." + p) or _regex_fullmatch(p, name) for p in patterns)


def target_regex(pattern: str) -> str:
    """One regex whose full match is what :func:`matches_target` accepts for ``pattern``: the name itself or a
    dotted suffix, or, for a pattern with regex characters, its own full match (for peft's regex targets)."""
    suffix = rf"(?:.*\.)?{re.escape(pattern)}"
    return f"{suffix}|{pattern}" if _looks_like_regex(pattern) else suffix


def _looks_like_regex(pattern: str) -> bool:
    return any(ch in pattern for ch in ".*+?[]()|^$\\")


def _regex_fullmatch(pattern: str, name: str) -> bool:
    if not _looks_like_regex(pattern):
        return False
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        raise EmlocError(f"target module pattern {pattern!r} is not a valid regex: "
                         f"fix it or use a plain name") from None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_LIKE)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``W`` as ``out x in`` (a view, detached): ``Conv1D`` stores its transpose."""
    weight = module.weight.detach()
    return weight.t() if isinstance(module, Conv1D) else weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a linear-like layer (or of a low-rank or LoRA-wrapped one)."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def _wraps_a_layer(module: nn.Module) -> bool:
    """A low-rank layer or a peft LoRA layer: it counts as one layer, its inner linears do not."""
    return is_linear_like(module) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def block_linears(model: nn.Module, family: ModelFamily | None = None) -> dict[str, nn.Module]:
    """Qualified name -> layer for every linear-like layer inside the family's blocks, in forward order.

    Layers outside the blocks (embeddings, the output layer, a vision tower's projector) are not listed; an
    emulator's low-rank layer or a LoRA-wrapped layer is listed as the layer it stands for (not its inner
    linears), so an emulator has the same targets as its original.
    """
    family = family or family_of(model)
    found = family.find_blocks(model)
    if found is None:
        return {}
    return {name: layer for index, block in enumerate(found.layers)
            for name, layer in _layers_of_block(block, f"{found.prefix}.{index}", family).items()}


def _layers_of_block(block: nn.Module, prefix: str, family: ModelFamily) -> dict[str, nn.Module]:
    """One block's layers for :func:`block_linears` (qualified under ``prefix``), in forward order."""
    layers, wrappers = {}, []
    for name, module in block.named_modules(prefix=prefix):
        if any(name.startswith(wrapper + ".") for wrapper in wrappers) or not _wraps_a_layer(module):
            continue
        wrappers.append(name)
        if not family.keeps_dense(name[len(prefix) + 1:]):
            layers[name] = module
    return layers


def last_block_output(model: nn.Module) -> str | None:
    """The last linear-like layer of the last block (``model.layers.29.mlp.down_proj``, GPT-2's
    ``transformer.h.11.mlp.c_proj``, OPT's ``fc2``): the MLP output projection the official configuration
    keeps dense, found by position. None when the model has no blocks."""
    family = family_of(model)
    found = family.find_blocks(model)
    if found is None or len(found.layers) == 0:
        return None
    names = list(_layers_of_block(found.layers[-1], f"{found.prefix}.{len(found.layers) - 1}", family))
    return names[-1] if names else None


def automatic_targets(model: nn.Module, family: ModelFamily | None = None) -> list[str]:
    """``emulator.target_modules`` for ``'auto'``: the module types of the blocks' linear-like layers, in
    forward order (Llama: ``q_proj`` ... ``down_proj``; GPT-2: ``c_attn``, ``attn.c_proj``, ``c_fc``,
    ``mlp.c_proj``). A type that would also match a layer outside the blocks that peft could wrap (a linear,
    a convolution, an embedding) is lengthened along its path until it does not (a DiT's ``proj`` becomes
    ``net.0.proj``: its patch embedding ``pos_embed.proj`` is a ``Conv2d``), else qualified by its blocks
    (``transformer_blocks\\.\\d+\\.ff\\.net\\.0\\.proj``)."""
    inside = block_linears(model, family)
    if not inside:
        raise EmlocError(f"emulator.target_modules 'auto' found no linear layer inside the decoder blocks of "
                         f"{type(model).__name__}: name the layers to compress in emulator.target_modules")
    outside = [name for name, module in model.named_modules()  # what peft could wrap by the same suffix
               if isinstance(module, PEFT_WRAPPABLE) and name not in inside]
    example = {}  # type -> one qualified name of that type
    for name, kind in module_types(list(inside)).items():
        example.setdefault(kind, name)
    return [_unambiguous(kind, example[kind], outside) for kind in example]


def _unambiguous(kind: str, name: str, outside: list[str]) -> str:
    """``kind``, or the shortest longer suffix of ``name``'s path in its block that matches no ``outside``."""
    blocks, path = block_path(name)
    parts = path.split(".")
    suffixes = [".".join(parts[-k:]) for k in range(len(kind.split(".")), len(parts) + 1)
                if not parts[-k].isdigit()]
    for suffix in suffixes:
        if not any(matches_target(other, [suffix]) for other in outside):
            return suffix
    return rf"{re.escape(blocks)}\.\d+\.{re.escape(path)}"


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """``patterns`` with ``'auto'`` replaced by :func:`automatic_targets` (explicit patterns kept)."""
    if AUTO not in patterns:
        return list(patterns)
    expanded = []
    for pattern in patterns:
        expanded.extend(automatic_targets(model) if pattern == AUTO else [pattern])
    return list(dict.fromkeys(expanded))


def with_resolved_targets(config: RunConfig) -> RunConfig:
    """``config`` with ``emulator.target_modules: [auto]`` replaced by the model's module types
    (:func:`emloc.families.automatic_targets`, from the architecture alone: no weights are read), so that
    fingerprints and the saved config name the layers; the default model resolves to Llama's seven
    projections, as its runs always named them. A model that cannot be found is left to the stage that
    loads it (and its one-line error)."""
    if AUTO not in config.emulator.target_modules:
        return config
    try:
        architecture = AutoConfig.from_pretrained(resolve_model_path(config.model),
                                                  trust_remote_code=config.trust_remote_code)
        skeleton = meta_model(architecture, config.trust_remote_code)
    except (OSError, ValueError, EmlocError):
        return config
    targets = resolve_targets(skeleton, config.emulator.target_modules)
    return dataclasses.replace(config, emulator=dataclasses.replace(config.emulator, target_modules=targets))


def uses_conv1d(model: nn.Module) -> bool:
    """Whether ``model`` has transformers ``Conv1D`` layers (peft's LoRA then needs ``fan_in_fan_out``)."""
    return any(isinstance(module, Conv1D) for module in model.modules())
