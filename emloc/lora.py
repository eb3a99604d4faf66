"""Stage 2: LoRA through peft, trained with ``transformers.Trainer``, on the emulator or the original
model."""
from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from emloc.config import LoraConfigSpec
from emloc.data import PaddingCollator
from emloc.svd_emulator import LowRankLinear
from emloc.errors import EmlocError
from emloc.families import (family_of, is_linear_like, linear_shape, matches_target, resolve_targets,
                            target_regex, uses_conv1d)
from emloc.io import read_tensors
from emloc.heap import keep_heap_small
from emloc.precision import (DEFAULT_PRECISION, announce, choose_precision, threads_for_training,
                             trainer_arguments)

LossCallback = Callable[[int, float], None]

# Two messages every LoRA run would print, neither a problem here: peft's notice that it wraps a custom
# layer (the emulator's LowRankLinear, registered on purpose) and a deprecation inside transformers that peft
# and the Trainer trigger, not this code.
warnings.filterwarnings("ignore", message="Unsupported layer type .*emloc.svd_emulator.LowRankLinear")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def peft_lora_config(spec: LoraConfigSpec, target_modules: list[str], fan_in_fan_out: bool = False,
                     task_type: str | None = "CAUSAL_LM") -> LoraConfig:
    """A peft ``LoraConfig`` that also wraps :class:`LowRankLinear` (the emulator's layers);
    ``fan_in_fan_out`` for a model whose linears are transformers ``Conv1D`` (GPT-2), so that merging
    transposes the update as peft expects; ``task_type`` None for a model that is not a causal LM."""
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        use_rslora=spec.use_rslora, target_modules=_peft_targets(target_modules),
                        fan_in_fan_out=fan_in_fan_out, bias="none", task_type=task_type)
    config._register_custom_module({LowRankLinear: LoraLinear})
    return config


def _peft_targets(patterns: list[str]) -> list[str] | str:
    """peft matches a list by name suffix (``q_proj``, ``attn.c_proj``); any regex pattern turns the whole
    list into one regex that accepts what :func:`emloc.families.matches_target` accepts."""
    if not any(ch in p for p in patterns for ch in "*+?[]()|^$\\"):
        return list(patterns)
    return "|".join(f"(?:{target_regex(p)})" for p in patterns)


def check_lora_rank(model: nn.Module, spec: LoraConfigSpec, target_modules: list[str]) -> None:
    """``lora.r`` must stay below ``min(in, out)`` of every targeted layer, or LoRA is no longer low-rank."""
    target_modules = resolve_targets(model, target_modules)
    widths = {name: min(linear_shape(m)) for name, m in model.named_modules()
              if (is_linear_like(m) or isinstance(m, LowRankLinear)) and matches_target(name, target_modules)}
    if widths:
        name = min(widths, key=widths.get)
        if spec.r >= widths[name]:
            raise EmlocError(f"lora.r = {spec.r} is not below min(in, out) = {widths[name]} of {name}: "
                             f"choose lora.r < {widths[name]}")


def add_lora(model: nn.Module, spec: LoraConfigSpec, target_modules: list[str], seed: int) -> PeftModel:
    """Wrap ``model`` with fresh LoRA (``A`` from ``seed``, ``B = 0``); only LoRA weights train."""
    target_modules = resolve_targets(model, target_modules)
    check_lora_rank(model, spec, target_modules)
    torch.manual_seed(seed)
    config = peft_lora_config(spec, target_modules, uses_conv1d(model), family_of(model).peft_task_type)
    return get_peft_model(model, config)


def load_adapter(model: nn.Module, folder, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` that also knows the emulator's :class:`LowRankLinear` layers."""
    from pathlib import Path
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").exists() or not weights.exists():
        raise EmlocError(f"{folder} is not a peft adapter folder (needs adapter_config.json and "
                         f"adapter_model.safetensors): run the stage that writes it")
    saved = read_tensors(weights)  # safetensors only: a pickled adapter_model.bin is never loaded
    config = LoraConfig.from_pretrained(str(folder))
    config._register_custom_module({LowRankLinear: LoraLinear})
    config.fan_in_fan_out = uses_conv1d(model)  # an emulator's adapter (low-rank layers) on the original
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, config=config,
                                               is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise EmlocError(f"adapter {folder} does not fit this model ({str(exc).splitlines()[0][:160]}): "
                         f"it was trained for another model or emulator") from None
    _check_loaded(peft_model, saved, folder, adapter_name)
    return peft_model


def _check_loaded(peft_model: PeftModel, saved: dict[str, torch.Tensor], folder, adapter_name: str) -> None:
    """Every LoRA weight of the model came from the file (peft only warns about missing ones), all finite."""
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise EmlocError(f"adapter {folder} has no weights for {missing[0]} ({len(missing)} missing): "
                         f"it was trained for another model or emulator")
    for key, tensor in saved.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise EmlocError(f"adapter {folder} has NaN or Inf in {key}: re-train it")


class TrainingProgress(TrainerCallback):
    """A compact tqdm bar with the latest loss (instead of the Trainer's per-step log dicts)."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="LoRA training")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class StreamLoss(TrainerCallback):
    """Forwards each logged training loss to ``on_loss(step, loss)`` (widgets draw live curves)."""

    def __init__(self, on_loss: LossCallback, history: list):
        self.on_loss = on_loss
        self.history = history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            point = (int(state.global_step), float(logs["loss"]))
            self.history.append(point)
            if self.on_loss is not None:
                self.on_loss(*point)


@dataclass
class TrainResult:
    model: PeftModel
    history: list = field(default_factory=list)
    """``[(step, loss), ...]``."""
    seconds: float = 0.0
    seconds_per_step: float = 0.0
    precision: str = DEFAULT_PRECISION
    """The precision training computed in (``lora.precision`` with ``auto`` resolved)."""


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict:
        return self.features[index]


def micro_batch_size(spec: LoraConfigSpec) -> int:
    """Examples per forward/backward pass; ``spec.batch_size / micro`` passes make one optimizer step."""
    micro = spec.micro_batch_size or spec.batch_size
    if micro <= 0 or spec.batch_size % micro:
        raise EmlocError(f"lora.micro_batch_size = {micro} does not divide "
                         f"lora.batch_size = {spec.batch_size}: choose a divisor of it")
    return micro


def checkpointing_arguments(model: nn.Module, enabled: bool) -> dict:
    """``TrainingArguments`` for activation checkpointing of ``model``'s decoder layers (the Trainer
    switches it on).

    Non-reentrant checkpointing (``use_reentrant=False``) needs no input that requires grad, so the frozen
    embeddings need no ``enable_input_require_grads`` hook, and it replays the RNG state, so dropout matches.
    A model that cannot checkpoint trains without it.
    """
    if not enabled or not getattr(model, "supports_gradient_checkpointing", False):
        return {}
    return {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}


def train_lora(model: nn.Module, features: list[dict], spec: LoraConfigSpec, target_modules: list[str],
               pad_token_id: int, seed: int = 0, on_loss: LossCallback | None = None, progress: bool = True,
               collator: Callable[[list[dict]], dict] | None = None,
               callbacks: list[TrainerCallback] | None = None, small_heap: bool = False) -> TrainResult:
    """Train LoRA on ``model`` (emulator or original) for ``spec.steps`` optimizer steps.

    ``collator`` batches the features (default: padded token ids); a vision-language model adds images.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. adapter snapshots at given steps).
    Memory: ``spec.gradient_checkpointing`` recomputes each decoder layer in backward, and
    ``spec.micro_batch_size`` splits each batch into accumulated passes (the loss is normalised by the
    batch's labelled tokens, so the update is the full batch's up to float rounding). ``small_heap``: freed
    activations go back to the OS instead of growing the heap (:func:`emloc.heap.keep_heap_small`; lower
    peak, more page faults), for runs under a memory budget. ``spec.precision``: ``bf16-mixed`` runs forward
    and backward under bfloat16 autocast (:mod:`emloc.precision`); the returned model computes plainly again.
    """
    if small_heap:
        keep_heap_small()
    device = next(model.parameters()).device
    choice = choose_precision(spec.precision, device)
    announce(choice)
    peft_model = add_lora(model, spec, target_modules, seed)
    history: list = []
    micro = micro_batch_size(spec)
    with tempfile.TemporaryDirectory(prefix="emloc-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=spec.steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=spec.batch_size // micro, learning_rate=spec.learning_rate,
            warmup_steps=spec.warmup_steps, weight_decay=spec.weight_decay,
            lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to=[], seed=seed,
            data_seed=seed, use_cpu=device.type == "cpu", disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False,
            **checkpointing_arguments(peft_model, spec.gradient_checkpointing),
            **trainer_arguments(choice, device),
        )
        trainer = Trainer(model=peft_model, args=args, train_dataset=_ListDataset(features),
                          data_collator=collator or PaddingCollator(pad_token_id),
                          callbacks=[StreamLoss(on_loss, history)])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        for callback in callbacks or []:
            trainer.add_callback(callback)
        if progress:
            trainer.add_callback(TrainingProgress())
        with threads_for_training():
            output = trainer.train()
    # inference afterwards runs plainly: without accelerate's autocast wrapper of forward ...
    if choice.precision != DEFAULT_PRECISION:
        trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
    # ... and without checkpointing
    if getattr(peft_model.get_base_model(), "is_activation_checkpointing", False):
        peft_model.get_base_model().activation_checkpointing_disable()
    peft_model.eval()
    seconds = float(output.metrics.get("train_runtime", 0.0))
    return TrainResult(peft_model, history, seconds, seconds / max(spec.steps, 1), choice.precision)
