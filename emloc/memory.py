"""An analytic memory ledger (weights, gradients, optimizer states, activations) for any model config.

Nothing is loaded: the model is instantiated on ``torch.device('meta')`` from its config, so an 8B or
38B ledger costs milliseconds. The numbers are estimates, with the assumptions in each function:
they show *where* memory goes in inference, LoRA on the original model and LoRA on the emulator.
:func:`plan_for_budget` searches the ledger for training settings that fit a memory budget.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import pandas as pd
from transformers import AutoConfig, LlamaConfig

from emloc.calibration import target_linears
from emloc.config import LLAMA_PROJECTIONS, RunConfig, parse_memory_budget
from emloc.data import longest_lengths
from emloc.errors import EmlocError
from emloc.families import automatic_targets, linear_shape
from emloc.heap import compact_heap_active
from emloc.lowrank import rank_from_ratio
from emloc.models import meta_model
from emloc.targets import module_types

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Llama-architecture stand-ins for the paper's models. The 26B/38B entries are the *language model*
# parts of InternVL2-26B (InternLM2-20B-like) and InternVL2-38B (Yi-34B-like), approximated as Llama
# blocks; their ~5.9B-parameter vision encoder is added as frozen, uncompressed weights.
PAPER_CONFIGS: dict[str, dict] = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False},
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
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input for backward and recompute one layer at a time."""
    micro_batch_size: Optional[int] = None
    """Sequences per forward/backward pass (gradient accumulation); None: ``batch_size``."""
    loss_tokens: Optional[int] = None
    """Positions per sequence whose logits are computed (the suite's response window); None: ``seq_len``."""
    runtime_bytes: float = 0.0
    """Process memory outside the tensors counted here (framework code, allocator; about 0.4 GB for torch +
    transformers on a CPU), added to every stage's total so that totals compare with measured peaks."""
    allocator_slack: float = 0.0
    """Freed memory the allocator still holds at a training step's peak, as a share of one micro batch's
    activations without checkpointing (:func:`allocator_slack_bytes`); 0 when freed blocks go back to the OS
    at once (glibc's small heap)."""


def model_config(name: str):
    """A paper-like config by name, or the config of a local/hub model ('default' = the suite's model)."""
    if name in PAPER_CONFIGS:
        return LlamaConfig(**PAPER_CONFIGS[name])
    from emloc.models import resolve_model_path
    return AutoConfig.from_pretrained(resolve_model_path(name))


def linear_shapes(model, target_modules) -> list[tuple[int, int]]:
    return [linear_shape(m) for m in target_linears(model, list(target_modules)).values()]


def parameter_counts(model, settings: LedgerSettings) -> dict[str, float]:
    """Original, emulator (each targeted linear at rank ``r(rho)``), and LoRA parameter counts."""
    total = sum(p.numel() for p in model.parameters()) + settings.extra_frozen_params
    shapes = linear_shapes(model, settings.target_modules)
    saved = sum(o * i - rank_from_ratio(settings.ratio, o, i) * (o + i) for o, i in shapes)
    lora = sum(settings.lora_r * (o + i) for o, i in shapes)
    return {"original": total, "emulator": total - saved, "lora": lora,
            "emulator_rank_sum": sum(rank_from_ratio(settings.ratio, o, i) for o, i in shapes)}


def layer_values_per_token(config) -> int:
    """Values one decoder layer keeps for backward per token: ``10 h + 4 m`` (:func:`activation_bytes`)."""
    return 10 * config.hidden_size + 4 * config.intermediate_size


def activation_bytes(config, settings: LedgerSettings) -> float:
    """Values kept for backward through every layer, plus the logits and their gradient, for one micro batch.

    Per token and layer (model dtype): about ``10 h + 4 m`` values (norm outputs, q/k/v, attention output and
    its projection input, residuals; gate, up, activation, down input); attention probabilities are not
    stored (fused SDPA). The emulator keeps exactly the same: its ``r``-sized intermediate ``v x`` is not
    saved, because ``u`` is frozen and autograd keeps a matmul input only when the other operand needs a
    gradient (measured: byte-identical saved tensors for the default model and its emulator).
    With checkpointing, each layer keeps only its input (``h``) and one layer is recomputed at a time.
    Logits and their gradient are float32, ``2 V`` per position of the loss window.
    """
    sequences = settings.micro_batch_size or settings.batch_size
    tokens = sequences * settings.seq_len
    per_layer = layer_values_per_token(config)
    if settings.gradient_checkpointing:
        per_token = config.hidden_size * (config.num_hidden_layers + 1) + per_layer
    else:
        per_token = per_layer * config.num_hidden_layers
    logits = sequences * (settings.loss_tokens or settings.seq_len) * 2 * config.vocab_size * 4
    return tokens * per_token * DTYPE_BYTES[settings.dtype] + logits


COMPACT_HEAP_SLACK = 0.3
""":attr:`LedgerSettings.allocator_slack` under the compact heap ``emloc`` commands start with
(:mod:`emloc.heap`). Fitted on the default model (LoRA on the emulator, checkpointing, micro batches 1-8 of
62 tokens): peaks measured from outside grow by about 26 MB per sequence against the slack-free ledger's
9 MB, 0.29 of a sequence's un-checkpointed activations; with it the ledger is within 2% of every measured
peak (benchmarks/results/plan_accuracy.md)."""


def allocator_slack_bytes(config, settings: LedgerSettings) -> float:
    """Training's allocator slack: ``settings.allocator_slack`` times one micro batch's activations without
    checkpointing. Checkpointing recomputes every layer in turn, and the holes those transient blocks leave
    are not all merged and reused by the time of the peak."""
    tokens = (settings.micro_batch_size or settings.batch_size) * settings.seq_len
    layers = tokens * layer_values_per_token(config) * config.num_hidden_layers
    return settings.allocator_slack * layers * DTYPE_BYTES[settings.dtype]


def inference_working_bytes(config, settings: LedgerSettings) -> float:
    """KV cache for the sequence plus one layer's transient activations and the last logits."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * settings.seq_len
          * settings.batch_size)
    transient = (settings.batch_size * settings.seq_len
                 * (4 * config.hidden_size + 2 * config.intermediate_size))
    return (kv + transient) * DTYPE_BYTES[settings.dtype] + settings.batch_size * config.vocab_size * 4


def ledger(config, settings: LedgerSettings | None = None, model=None) -> pd.DataFrame:
    """Rows: inference (original), LoRA (original), LoRA (emulator); columns in GiB.

    ``model``: the meta model of ``config`` when the caller already has it (the planner asks many times).
    """
    settings = settings or LedgerSettings()
    counts = parameter_counts(model if model is not None else meta_model(config), settings)
    weight_bytes = DTYPE_BYTES[settings.dtype]
    lora_bytes = counts["lora"] * 4
    training = {"lora": lora_bytes, "gradients": lora_bytes, "optimizer": 2 * lora_bytes,
                "activations": activation_bytes(config, settings),
                "runtime": settings.runtime_bytes + allocator_slack_bytes(config, settings)}
    rows = [
        {"stage": "inference (original)", "weights": counts["original"] * weight_bytes, "lora": 0.0,
         "gradients": 0.0, "optimizer": 0.0, "activations": inference_working_bytes(config, settings),
         "runtime": settings.runtime_bytes},
        {"stage": "LoRA (original)", "weights": counts["original"] * weight_bytes, **training},
        {"stage": "LoRA (emulator)", "weights": counts["emulator"] * weight_bytes, **training},
    ]
    table = pd.DataFrame(rows).set_index("stage") / GIB
    table["total"] = table.sum(axis=1)
    return table


def ledgers(names: list[str], settings_by_name: dict[str, LedgerSettings]) -> pd.DataFrame:
    """Ledgers of several models stacked, with a ``model`` column first."""
    frames = [ledger(model_config(n), settings_by_name[n]).reset_index().assign(model=n) for n in names]
    table = pd.concat(frames, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


# ---- the memory budget planner -----------------------------------------------------------------

RATIO_STEPS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)
"""Ratios the planner tries, from the configured one downwards."""


@dataclass
class MemoryPlan:
    """Training settings chosen so that the ledger's LoRA-on-the-emulator peak fits the budget."""

    ratio: float
    micro_batch_size: int
    gradient_checkpointing: bool
    ranks: dict
    """Module type (e.g. 'q_proj') -> emulator rank ``r = floor(rho out in / (out + in))``."""
    predicted_peak_bytes: float
    budget_bytes: float
    budget: str
    batch_size: int

    def __str__(self) -> str:
        ranks = ", ".join(f"{name} {rank}" for name, rank in self.ranks.items())
        steps = self.batch_size // self.micro_batch_size
        return (f"memory plan for budget {self.budget!r}: ratio {self.ratio:g} (ranks: {ranks}); "
                f"micro batch {self.micro_batch_size} x {steps} accumulated = batch {self.batch_size}; "
                f"checkpointing {'on' if self.gradient_checkpointing else 'off'}; predicted peak "
                f"{self.predicted_peak_bytes / 2**20:.0f} MB <= budget {self.budget_bytes / 2**20:.0f} MB")

    def apply(self, config: RunConfig) -> RunConfig:
        """A copy of ``config`` with the plan's ratio, micro batch and checkpointing (nothing else
        changes)."""
        emulator = dataclasses.replace(config.emulator, ratio=self.ratio)
        lora = dataclasses.replace(config.lora, micro_batch_size=self.micro_batch_size,
                                   gradient_checkpointing=self.gradient_checkpointing)
        return dataclasses.replace(config, emulator=emulator, lora=lora)


def budget_bytes(budget: str, config, settings: LedgerSettings, model=None) -> float:
    """``'inference'``: the ledger's inference peak of the original model; else the amount in bytes."""
    amount = parse_memory_budget(budget)
    if amount is None:
        return float(ledger(config, settings, model).loc["inference (original)", "total"] * GIB)
    return amount


def ranks_by_type(model, settings: LedgerSettings, ratio: float) -> dict[str, int]:
    """The emulator rank of each targeted module type (the first layer's; Llama layers are alike)."""
    ranks: dict[str, int] = {}
    linears = target_linears(model, list(settings.target_modules))
    for name, kind in module_types(list(linears)).items():
        ranks.setdefault(kind, rank_from_ratio(ratio, *linear_shape(linears[name])))
    return ranks


LEDGER_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")
"""The config fields the ledger's activation and KV-cache terms read (Llama-style models have them all)."""


def check_llama_style(config, model) -> None:
    """The ledger models Llama-style decoders (separate q/k/v/o, gate/up/down, the fields above): any other
    family is refused in one line instead of planned from a wrong formula."""
    missing = [field for field in LEDGER_FIELDS if getattr(config, field, None) is None]
    types = automatic_targets(model)
    if missing or not set(types) <= set(LLAMA_PROJECTIONS):
        found = f"no {missing[0]} in its config" if missing else f"its layers are {', '.join(types)}"
        family = getattr(config, "model_type", "this model")
        raise EmlocError(f"--memory-budget plans Llama-style models only (the ledger knows q/k/v/o and "
                         f"gate/up/down projections) and {family} is not one ({found}): drop "
                         f"--memory-budget and set --micro-batch-size yourself")


def plan_for_budget(config, settings: LedgerSettings, budget: str) -> MemoryPlan:
    """The training settings whose predicted LoRA-on-the-emulator peak fits ``budget``.

    Preference: the configured ratio (accuracy first), then the largest micro batch (speed), then no
    checkpointing (speed); the ratio is lowered along :data:`RATIO_STEPS` only when nothing else fits.
    ``settings`` describes the run (batch, sequence length, dtype, LoRA rank, targets, ratio).
    """
    model = meta_model(config)
    check_llama_style(config, model)
    limit = budget_bytes(budget, config, settings, model)
    ratios = [settings.ratio, *[r for r in RATIO_STEPS if r < settings.ratio]]
    micro_batches = [m for m in range(settings.batch_size, 0, -1) if settings.batch_size % m == 0]
    for ratio in ratios:
        for micro in micro_batches:
            for checkpointing in (False, True):
                trial = dataclasses.replace(settings, ratio=ratio, micro_batch_size=micro,
                                            gradient_checkpointing=checkpointing)
                peak = float(ledger(config, trial, model).loc["LoRA (emulator)", "total"] * GIB)
                if peak <= limit:
                    return MemoryPlan(ratio, micro, checkpointing, ranks_by_type(model, settings, ratio),
                                      peak, limit, budget, settings.batch_size)
    leanest = dataclasses.replace(settings, ratio=ratios[-1], micro_batch_size=1, gradient_checkpointing=True)
    need = float(ledger(config, leanest, model).loc["LoRA (emulator)", "total"] * GIB)
    raise EmlocError(f"no training setting fits memory budget {budget!r} ({limit / 2**20:.0f} MB): "
                     f"even ratio {ratios[-1]:g}, micro batch 1 and checkpointing need "
                     f"{need / 2**20:.0f} MB; raise the budget or lower data.max_length")


def process_rss_bytes(peak: bool = False) -> float:
    """This process's resident memory now, or with ``peak`` its high-water mark (Linux ``/proc``; 0
    elsewhere).

    The peak is ``VmHWM``, not ``ru_maxrss``: after a vfork + exec ``ru_maxrss`` starts from the parent's
    peak."""
    field = "VmHWM" if peak else "VmRSS"
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024.0
    except (OSError, StopIteration):
        return 0.0


def run_ledger_settings(config: RunConfig, features: list[dict] | None = None,
                        runtime_bytes: float = 0.0) -> LedgerSettings:
    """The ledger's view of a run: its batch, LoRA rank, targets, ratio and dtype. With the run's training
    ``features``, the sequence length and loss window are the longest a batch of them can have (what training
    computes: batches padded to their longest, logits on the response window only); without, the worst case
    (``data.max_length``, logits at every position)."""
    seq_len, loss_tokens = longest_lengths(features) if features else (config.data.max_length, None)
    return LedgerSettings(batch_size=config.lora.batch_size, seq_len=seq_len, loss_tokens=loss_tokens,
                          dtype=config.dtype, lora_r=config.lora.r, ratio=config.emulator.ratio,
                          target_modules=tuple(config.emulator.target_modules),
                          gradient_checkpointing=config.lora.gradient_checkpointing,
                          micro_batch_size=config.lora.micro_batch_size, runtime_bytes=runtime_bytes)


def plan_for_run(config: RunConfig, features: list[dict] | None = None) -> MemoryPlan:
    """:func:`plan_for_budget` for a run's config and ``config.memory_budget``, sized by its training
    ``features`` when given (see :func:`run_ledger_settings`).

    A budget in MB/GB is real memory, so the memory this process already holds (torch, transformers, the
    tokenizer) counts towards it; for ``'inference'`` that share is on both sides.
    """
    if config.memory_budget is None:
        raise EmlocError("memory_budget is not set: give --memory-budget inference (or an amount like 2GB)")
    settings = planning_settings(config, features)
    return plan_for_budget(model_config(config.model), settings, config.memory_budget)


def planning_settings(config: RunConfig, features: list[dict] | None = None) -> LedgerSettings:
    """The settings the planner predicts this process's training with: the run's (see
    :func:`run_ledger_settings`), the memory the process holds now as runtime, and the compact heap's slack
    when it is active (else training keeps the small heap, which has none)."""
    return dataclasses.replace(run_ledger_settings(config, features, process_rss_bytes()),
                               allocator_slack=COMPACT_HEAP_SLACK if compact_heap_active() else 0.0)
