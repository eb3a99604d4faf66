"""The layer-walk toolkit: calibration batches carried through a Llama-style decoder one layer at a time.

The sequential build (:mod:`emloc.sequential`, model in memory) and the layer-streamed build
(:mod:`emloc.streaming`, one layer's weights at a time) walk the decoder the same way: embed every
calibration batch once (:func:`first_inputs`), then hand each decoder layer the hidden states with the
batch's masks and rotary position embeddings (:func:`through_layer`), merging the layer's calibration
statistics into the whole model's (:func:`merge_stats`). Both find the decoder with :func:`llama_decoder`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from emloc.calibration import CalibrationStats, PairedStats
from emloc.data import pad_batch
from emloc.errors import EmlocError
from emloc.models import DecoderLayers, find_decoder_layers

LLAMA_PARTS = ("embed_tokens", "rotary_emb")
"""What the walk needs of the decoder besides its layers: the token embeddings and the rotary embeddings."""


@dataclass
class LayerBatch:
    """One calibration batch at a decoder layer's input."""

    hidden: torch.Tensor
    """``(batch, tokens, hidden)``: the original model's input of the next decoder layer."""
    token_mask: torch.Tensor
    """``(batch, tokens)`` bool: the real (non-pad) tokens."""
    causal_mask: torch.Tensor | None
    """The attention mask the decoder layers take (``None`` when the attention needs none)."""
    position_ids: torch.Tensor
    """``(1, tokens)``: ``0 .. tokens - 1``."""
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    """``(cos, sin)``, each ``(1, tokens, head_dim)``: the rotary position embeddings."""


def llama_decoder(model: nn.Module, remedy: str) -> DecoderLayers:
    """The decoder layers of a Llama-style model (:func:`emloc.models.find_decoder_layers`) whose decoder
    also has ``embed_tokens`` and ``rotary_emb``; else a one-line error ending with ``remedy`` (what to use
    instead)."""
    found = find_decoder_layers(model)
    if found is None or not all(hasattr(found.decoder, part) for part in LLAMA_PARTS):
        raise EmlocError(f"{type(model).__name__} is not a Llama-style decoder "
                         f"(embed_tokens, layers, rotary_emb): {remedy}")
    return found


def qualified_name(model: nn.Module, module: nn.Module) -> str:
    """The name of ``module`` inside ``model`` (``model.embed_tokens``)."""
    return next(name for name, candidate in model.named_modules() if candidate is module)


def first_inputs(model: nn.Module, features: list[dict], pad_token_id: int, batch_size: int,
                 device: torch.device, embed: Callable[[torch.Tensor], torch.Tensor],
                 rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> list[LayerBatch]:
    """The first decoder layer's inputs for each calibration batch (same batches and padding as
    :func:`emloc.calibration.collect_statistics`).

    ``embed``: token ids ``(batch, tokens)`` -> hidden states ``(batch, tokens, hidden)`` (the decoder's
    ``embed_tokens``); ``rotary(hidden, position_ids=...)`` -> ``(cos, sin)`` (its ``rotary_emb``).
    """
    batches = []
    for start in range(0, len(features), batch_size):
        batch = pad_batch(features[start:start + batch_size], pad_token_id)
        mask = batch["attention_mask"].to(device)
        hidden = embed(batch["input_ids"].to(device))
        position_ids = torch.arange(hidden.shape[1], device=device).unsqueeze(0)
        # no cache; passed by position: its keyword was renamed (past_key_values -> cache) across
        # transformers 5.x
        causal_mask = create_causal_mask(model.config, hidden, mask, None, position_ids=position_ids)
        batches.append(LayerBatch(hidden, mask.bool(), causal_mask, position_ids,
                                  rotary(hidden, position_ids=position_ids)))
    return batches


def through_layer(layer: nn.Module, hidden: torch.Tensor, batch: LayerBatch) -> torch.Tensor:
    """``hidden`` ``(batch, tokens, hidden)`` through one decoder layer with ``batch``'s masks and rotary
    embeddings: the layer's output hidden states, same shape."""
    out = layer(hidden, attention_mask=batch.causal_mask, position_ids=batch.position_ids,
                position_embeddings=batch.position_embeddings, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def merge_stats(into: CalibrationStats, stats: CalibrationStats) -> None:
    """Add one layer's statistics to ``into``: ``C`` (``in x in`` per leader), ``input_of`` and token counts,
    and, when ``into`` is a :class:`~emloc.calibration.PairedStats`, ``C~`` and ``P`` too."""
    parts = ["covariances", "input_of", "token_counts"]
    if isinstance(into, PairedStats):
        parts += ["emulated", "cross"]
    for part in parts:
        getattr(into, part).update(getattr(stats, part))
