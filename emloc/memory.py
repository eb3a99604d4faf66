"""An analytic memory ledger (weights, gradients, optimizer states, activations) for any model config.

Nothing is loaded: the model is instantiated on ``torch.device('meta')`` from its config, so an 8B or
38B ledger costs milliseconds. The numbers are estimates, with the assumptions in each function:
they show *where* memory goes in inference, LoRA on the original model and LoRA on the emulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from emloc.calibration import target_linears
from emloc.config import LLAMA_PROJECTIONS
from emloc.lowrank import rank_from_ratio

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Llama-architecture stand-ins for the paper's models. The 26B/38B entries are the *language model*
# parts of InternVL2-26B (InternLM2-20B-like) and InternVL2-38B (Yi-34B-like), approximated as Llama
# blocks; their ~5.9B-parameter vision encoder is added as frozen, uncompressed weights.
PAPER_CONFIGS: dict[str, dict] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "internvl2-26b-llm": {"hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 48,
                          "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": 92553,
                          "tie_word_embeddings": False},
    "internvl2-38b-llm": {"hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
                          "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000,
                          "tie_word_embeddings": False},
}
VISION_PARAMS = {"internvl2-26b-llm": 5.9e9, "internvl2-38b-llm": 5.9e9}
"""Frozen vision-encoder parameters (InternViT-6B, approximate) counted in every stage's weights."""


@dataclass
class LedgerSettings:
    batch_size: int = 1
    seq_len: int = 512
    dtype: str = "bfloat16"
    """Weights and activations; LoRA weights, their gradients and AdamW states are float32."""
    lora_r: int = 8
    ratio: float = 0.5
    target_modules: tuple = tuple(LLAMA_PROJECTIONS)
    extra_frozen_params: float = 0.0


def meta_model(config):
    """The model for ``config`` (a transformers config) with every tensor on the meta device."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_config(name: str):
    """A paper-like config by name, or the config of a local/hub model ('default' = the suite's model)."""
    if name in PAPER_CONFIGS:
        return LlamaConfig(**PAPER_CONFIGS[name])
    from emloc.models import resolve_model_path
    return AutoConfig.from_pretrained(resolve_model_path(name))


def linear_shapes(model, target_modules) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in target_linears(model, list(target_modules)).values()]


def parameter_counts(model, settings: LedgerSettings) -> dict[str, float]:
    """Original, emulator (each targeted linear at rank ``r(rho)``), and LoRA parameter counts."""
    total = sum(p.numel() for p in model.parameters()) + settings.extra_frozen_params
    shapes = linear_shapes(model, settings.target_modules)
    saved = sum(o * i - rank_from_ratio(settings.ratio, o, i) * (o + i) for o, i in shapes)
    lora = sum(settings.lora_r * (o + i) for o, i in shapes)
    return {"original": total, "emulator": total - saved, "lora": lora,
            "emulator_rank_sum": sum(rank_from_ratio(settings.ratio, o, i) for o, i in shapes)}


def activation_bytes(config, settings: LedgerSettings, low_rank_sum: int = 0) -> float:
    """Values kept for backward through every layer, plus the logits and their gradient.

    Per token and layer (bf16): about ``10 h + 4 m`` values (norm outputs, q/k/v, attention output and
    its projection input, residuals; gate, up, activation, down input); attention probabilities are not
    stored (fused SDPA). ``low_rank_sum``: the emulator's extra ``r``-sized intermediates summed over
    its low-rank layers. Logits and their gradient are float32, ``2 V`` per token.
    """
    tokens = settings.batch_size * settings.seq_len
    per_layer = 10 * config.hidden_size + 4 * config.intermediate_size
    stored = tokens * (per_layer * config.num_hidden_layers + low_rank_sum) * DTYPE_BYTES[settings.dtype]
    return stored + tokens * 2 * config.vocab_size * 4


def inference_working_bytes(config, settings: LedgerSettings) -> float:
    """KV cache for the sequence plus one layer's transient activations and the last logits."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * settings.seq_len * settings.batch_size
    transient = settings.batch_size * settings.seq_len * (4 * config.hidden_size + 2 * config.intermediate_size)
    return (kv + transient) * DTYPE_BYTES[settings.dtype] + settings.batch_size * config.vocab_size * 4


def ledger(config, settings: LedgerSettings | None = None) -> pd.DataFrame:
    """Rows: inference (original), LoRA (original), LoRA (emulator); columns in GiB."""
    settings = settings or LedgerSettings()
    counts = parameter_counts(meta_model(config), settings)
    weight_bytes = DTYPE_BYTES[settings.dtype]
    lora_bytes = counts["lora"] * 4
    rows = [
        {"stage": "inference (original)", "weights": counts["original"] * weight_bytes, "lora": 0.0,
         "gradients": 0.0, "optimizer": 0.0, "activations": inference_working_bytes(config, settings)},
        {"stage": "LoRA (original)", "weights": counts["original"] * weight_bytes, "lora": lora_bytes,
         "gradients": lora_bytes, "optimizer": 2 * lora_bytes, "activations": activation_bytes(config, settings)},
        {"stage": "LoRA (emulator)", "weights": counts["emulator"] * weight_bytes, "lora": lora_bytes,
         "gradients": lora_bytes, "optimizer": 2 * lora_bytes,
         "activations": activation_bytes(config, settings, counts["emulator_rank_sum"])},
    ]
    table = pd.DataFrame(rows).set_index("stage") / GIB
    table["total"] = table.sum(axis=1)
    return table


def ledgers(names: list[str], settings_by_name: dict[str, LedgerSettings]) -> pd.DataFrame:
    """Ledgers of several models stacked, with a ``model`` column first."""
    frames = [ledger(model_config(n), settings_by_name[n]).reset_index().assign(model=n) for n in names]
    table = pd.concat(frames, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def load_emulator_lean(model: str, factors, dtype: str = "float32", trust_remote_code: bool = False):
    """The emulator built without ever holding the original model's targeted weights in memory.

    The architecture is made on the meta device, each factored linear becomes a ``LowRankLinear``
    from ``factors``, and only the remaining tensors are read from the safetensors files. This is how
    LoRA on the emulator stays within the inference memory budget (the usual ``emulate(load_model())``
    holds the original first).
    """
    from pathlib import Path

    from safetensors import safe_open

    from emloc.emulator import LowRankLinear
    from emloc.errors import EmlocError
    from emloc.models import resolve_dtype, resolve_model_path
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
        shaped = lambda t: torch.empty(t.shape, dtype=torch_dtype, device="meta")
        low_rank = LowRankLinear(shaped(u), shaped(v), shaped(u[:, 0]) if has_bias else None)
        # use the factor tensors themselves: a copy would hold the emulator twice at the peak
        low_rank.up.weight, low_rank.down.weight = nn.Parameter(u), nn.Parameter(v)
        setattr(parent, child, low_rank)
    skip = {f"{name}.weight" for name in factors.u}
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            state.update({key: handle.get_tensor(key).to(torch_dtype) for key in handle.keys() if key not in skip})
    state = {(k[: -len(".bias")] + ".up.bias" if k[: -len(".bias")] in factors.u else k): t for k, t in state.items()}
    emulator.load_state_dict(state, strict=False, assign=True)
    emulator.tie_weights()
    for module_name, module in list(emulator.named_modules()):  # non-persistent buffers (rotary) were made on meta
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = module_name.rpartition(".")
            setattr(emulator.get_submodule(parent_name) if parent_name else emulator, child, type(module)(config=config))
    left = [n for n, t in [*emulator.named_parameters(), *emulator.named_buffers()] if t.is_meta]
    if left:
        raise EmlocError(f"the lean emulator loader found no weights for {left[0]}: use Run.emulator() for this model")
    return emulator.eval()
