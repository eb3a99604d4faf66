"""What differs between the kinds of model the stages run on: loading, the data, the calibration forward, the
training objective, the fidelity check and the evaluation. Everything else (the run directory, the emulator,
peft's LoRA, the correction, the manifests) is shared.

A :class:`ModelTask` is chosen from the run's ``model`` by :func:`task_for`: the built-in digits denoisers
(``digits-dit``, ``digits-dit-tiny``) get :class:`DreamBoothTask`, every other model :class:`CausalLMTask`.
Each method takes the :class:`emloc.pipeline.Run` it serves (its config, device and cached inputs), so a new
kind of model (a VLM next) is one more class here and one more case in :func:`task_for`.
"""
from __future__ import annotations

import abc
import dataclasses
import time
from typing import Callable, ContextManager

import torch
from torch import nn

from emloc import denoiser
from emloc.calibration import CalibrationStats, collect_statistics
from emloc.config import DIFFUSION_MODELS, RunConfig
from emloc.data import IGNORE_INDEX, TaskData, load_task_data
from emloc.errors import EmlocError
from emloc.evaluation import evaluate_variants
from emloc.families import automatic_targets, diffusion_transformer, with_resolved_targets
from emloc.fidelity import fidelity_report
from emloc.heap import small_heap_for_budget
from emloc.lora import LossCallback, TrainResult, add_lora, train_lora
from emloc.models import load_model, resolve_dtype
from emloc.targets import AUTO

SAMPLES_KEPT = 8
"""Samples of each digit a denoiser run keeps per variant (8-bit pixels in ``results.json``)."""
VariantModels = dict[str, Callable[[], ContextManager[nn.Module]]]
"""Variant name -> a context manager that yields the variant's model (and frees it after)."""


class ModelTask(abc.ABC):
    """The interface; :class:`CausalLMTask` and :class:`DreamBoothTask` implement it."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    """The per-variant figures ``evaluate`` reports (besides ``n``)."""
    plans_memory: bool = False
    """Whether ``--memory-budget`` can plan its training (the ledger knows Llama-style decoders only)."""

    @abc.abstractmethod
    def resolve_targets(self, config: RunConfig) -> RunConfig:
        """``config`` with ``emulator.target_modules: [auto]`` replaced by the module types found."""

    @abc.abstractmethod
    def load_model(self, run) -> nn.Module:
        """A freshly loaded original model on the run's device and dtype."""

    @abc.abstractmethod
    def data(self, run):
        """The task's data (loaded once by ``run.data``)."""

    @abc.abstractmethod
    def check_data(self, run) -> None:
        """Fail early, before any compute or write, on data or settings the stages cannot use."""

    @abc.abstractmethod
    def data_report(self, run) -> dict:
        """What the calibration manifest records about the data."""

    @abc.abstractmethod
    def calibration_inputs(self, run):
        """What calibration feeds the model, prepared before anything is written (bad data fails here)."""

    @abc.abstractmethod
    def calibration_stats(self, run, inputs) -> CalibrationStats:
        """``C`` per distinct input of the targeted linears, from the original model on ``inputs``."""

    @abc.abstractmethod
    def model_for_training(self, run, which: str) -> nn.Module:
        """The model LoRA trains on: ``'emulator'`` or ``'original'``."""

    @abc.abstractmethod
    def train(self, run, model: nn.Module, on_loss: LossCallback | None) -> TrainResult:
        """LoRA (peft) on ``model`` with the task's objective; ``on_loss(step, loss)`` as it trains."""

    @abc.abstractmethod
    def fidelity(self, run) -> dict:
        """The emulator (no adapter) against the original, end to end."""

    @abc.abstractmethod
    def evaluate(self, run, variants: VariantModels) -> tuple[dict, dict]:
        """``(per-variant metrics, extra results keys)``."""


# ---- causal language models ------------------------------------------------------------------------

class CausalLMTask(ModelTask):
    """A causal language model on prompt/response data: calibration on the calibration prompts, LoRA by the
    response-token loss through transformers' Trainer, exact-match accuracy and response loss."""

    name = "causal language model"
    metrics = ("accuracy", "loss")
    plans_memory = True

    def resolve_targets(self, config: RunConfig) -> RunConfig:
        return with_resolved_targets(config)

    def load_model(self, run) -> nn.Module:
        cfg = run.config
        return load_model(cfg.model, run.device, cfg.dtype, cfg.trust_remote_code)

    def data(self, run) -> TaskData:
        return load_task_data(run.config.data, run.config.seed)

    def check_data(self, run) -> None:
        run.data

    def data_report(self, run) -> dict:
        return run.data_report()

    def calibration_inputs(self, run) -> list[dict]:
        return run.features("calibration")

    def calibration_stats(self, run, inputs: list[dict]) -> CalibrationStats:
        return collect_statistics(run.model, inputs, run.config.emulator.target_modules,
                                  run.tokenizer.pad_token_id, progress=run.progress)

    def model_for_training(self, run, which: str) -> nn.Module:
        features = run.features("train")
        if not any(label != IGNORE_INDEX for feature in features for label in feature["labels"][1:]):
            raise EmlocError(f"no training example keeps a response token within data.max_length = "
                             f"{run.config.data.max_length}: raise data.max_length")
        # the emulator is loaded without ever holding the original model (same weights as run.emulator())
        return run.lean_emulator() if which == "emulator" else run.fresh_model()

    def train(self, run, model: nn.Module, on_loss: LossCallback | None) -> TrainResult:
        cfg = run.config
        return train_lora(model, run.features("train"), cfg.lora, cfg.emulator.target_modules,
                          run.tokenizer.pad_token_id, seed=cfg.seed, on_loss=on_loss, progress=run.progress,
                          small_heap=small_heap_for_budget(cfg.memory_budget))

    def fidelity(self, run) -> dict:
        return fidelity_report(run.model, run.emulator(), run.features("test"), run.tokenizer.pad_token_id,
                               batch_size=run.config.evaluation.batch_size, progress=run.progress)

    def evaluate(self, run, variants: VariantModels) -> tuple[dict, dict]:
        cfg = run.config
        raw = evaluate_variants(variants, run.tokenizer, run.data, cfg.data.max_length,
                                cfg.evaluation.max_new_tokens, cfg.evaluation.batch_size, run.progress)
        metrics = {v: {"accuracy": r["accuracy"], "loss": r["loss"], "n": r["n"]} for v, r in raw.items()}
        return metrics, {"predictions": {v: r["predictions"] for v, r in raw.items()}}


# ---- the digits denoiser, personalised DreamBooth-style ----------------------------------------------

class DreamBoothTask(ModelTask):
    """A built-in digits denoiser (:mod:`emloc.denoiser`) taught the held-out digit from a few images through
    its never-trained class id, with real other digits as prior preservation (``config.dreambooth``)."""

    name = "diffusion transformer (DreamBooth)"
    metrics = ("subject_fidelity", "prior_preservation", "memorisation", "quality")

    def __init__(self, model_name: str):
        self.preset_name = DIFFUSION_MODELS[model_name]
        self.preset = denoiser.DENOISER_PRESETS[self.preset_name]

    def resolve_targets(self, config: RunConfig) -> RunConfig:
        """``auto`` -> the DiT's module types, with the adaLN modulation and timestep layers left dense or not
        (``dreambooth.keep_conditioning_dense``)."""
        targets = config.emulator.target_modules
        if AUTO not in targets:
            return config
        family = diffusion_transformer(config.dreambooth.keep_conditioning_dense)
        found = automatic_targets(denoiser.denoiser_skeleton(self.preset), family)
        resolved = [t for pattern in targets for t in (found if pattern == AUTO else [pattern])]
        emulator = dataclasses.replace(config.emulator, target_modules=list(dict.fromkeys(resolved)))
        return dataclasses.replace(config, emulator=emulator)

    def load_model(self, run) -> nn.Module:
        folder = denoiser.pretrained_denoiser_path(self.preset_name, 0, progress=run.progress)
        model = denoiser.load_denoiser(folder).to(run.device)
        dtype = resolve_dtype(run.config.dtype)
        return model if dtype == torch.float32 else model.to(dtype)

    def data(self, run) -> denoiser.DreamBoothData:
        cfg = run.config.dreambooth
        return denoiser.dreambooth_data(cfg.subject_images, cfg.prior_images, run.config.seed)

    def check_data(self, run) -> None:
        """The DreamBooth images can be drawn, and the settings are ones this task has."""
        emulator = run.config.emulator
        if emulator.calibration == "sequential" or emulator.method in ("layer_drop", "prune"):
            setting = ("calibration 'sequential'" if emulator.calibration == "sequential"
                       else f"method {emulator.method!r}")
            raise EmlocError(f"emulator {setting} is for causal language models: a {self.name} takes "
                             f"method 'activation_aware' or 'plain' with independent calibration")
        run.data

    def data_report(self, run) -> dict:
        data = run.data
        return {"subject_images": len(data.subject), "prior_images": len(data.prior),
                "subject_digit": denoiser.HELD_OUT_DIGIT}

    def calibration_inputs(self, run) -> tuple[torch.Tensor, torch.Tensor]:
        """Every subject image ``calibration_repeats`` times and the first ``calibration_prior`` prior images
        (``images``, ``labels``); calibration noises each once at a timestep drawn as in training."""
        self.check_data(run)
        cfg, data = run.config.dreambooth, run.data
        images = torch.cat([data.subject.repeat(cfg.calibration_repeats, 1, 1, 1),
                            data.prior[:cfg.calibration_prior]])
        subject = torch.full((cfg.calibration_repeats * len(data.subject),), denoiser.HELD_OUT_DIGIT)
        return images, torch.cat([subject, data.prior_labels[:cfg.calibration_prior]])

    def calibration_stats(self, run, inputs: tuple[torch.Tensor, torch.Tensor]) -> CalibrationStats:
        return denoiser.calibration_statistics(run.model, *inputs, self.preset, run.config.seed,
                                               run.config.emulator.target_modules)

    def model_for_training(self, run, which: str) -> nn.Module:
        return run.emulator() if which == "emulator" else run.fresh_model()

    def train(self, run, model: nn.Module, on_loss: LossCallback | None) -> TrainResult:
        cfg, spec = run.config, run.config.lora
        peft_model = add_lora(model, spec, cfg.emulator.target_modules, seed=cfg.seed)
        start = time.perf_counter()
        losses = denoiser.train_dreambooth(peft_model, run.data, self.preset, steps=spec.steps,
                                           learning_rate=spec.learning_rate, batch_size=spec.batch_size,
                                           prior_share=cfg.dreambooth.prior_share,
                                           prior_weight=cfg.dreambooth.prior_weight, seed=cfg.seed,
                                           progress=run.progress, on_loss=on_loss)
        seconds = time.perf_counter() - start
        history = [(step, loss) for step, loss in enumerate(losses, start=1)]
        return TrainResult(peft_model, history, seconds, seconds / max(spec.steps, 1))

    def fidelity(self, run) -> dict:
        return denoiser.noise_prediction_error(run.model, run.emulator(), run.data, self.preset,
                                               seed=run.config.seed)

    def evaluate(self, run, variants: VariantModels) -> tuple[dict, dict]:
        """The metrics of every variant from the same sampling noise, and the first
        :data:`SAMPLES_KEPT` samples of each digit (``results.json``'s ``samples``, for the views)."""
        cfg, data = run.config.dreambooth, run.data
        labels = torch.tensor([c for c in range(denoiser.N_CLASSES) for _ in range(cfg.samples_per_digit)])
        metrics, samples = {}, {}
        for name, variant in variants.items():
            with variant() as model:
                images = denoiser.sample(model, labels, self.preset, seed=1000 + run.config.seed)
            figures = denoiser.sample_metrics(images, labels, data)
            metrics[name] = {key: figures[key] for key in self.metrics} | {"n": figures["samples"]}
            samples[name] = denoiser.sample_record(images, labels, SAMPLES_KEPT)
        return metrics, {"samples": samples}


def task_for(config: RunConfig) -> ModelTask:
    """The :class:`ModelTask` of ``config.model``."""
    if config.model in DIFFUSION_MODELS:
        return DreamBoothTask(config.model)
    return CausalLMTask()


def check_plannable(task: ModelTask) -> None:
    """Refuse ``--memory-budget`` in one line for a task the ledger cannot plan."""
    if not task.plans_memory:
        raise EmlocError(f"--memory-budget plans causal language models only, not a {task.name}: drop "
                         f"--memory-budget and set --batch-size yourself")
