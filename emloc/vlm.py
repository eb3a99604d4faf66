"""The EMLoC stages on a Hugging Face vision-language model (Llava-style: vision tower -> projector -> LM).

The paper's main results are on InternVL; the same stages apply to any model whose parts are
``nn.Linear`` layers: calibration statistics come from image + text inputs
(:func:`emloc.calibration.collect_statistics` with a collate that adds ``pixel_values``), the
emulator factors every targeted linear of the vision tower, the projector and the language model,
each part with its own ratio (:func:`part_ratio_patterns`), LoRA is the same peft path
(:func:`emloc.lora.train_lora` with an image collator) and the correction is
:func:`emloc.correction.correct_adapter` unchanged.

For tests and teaching, :func:`tiny_llava` builds a random Llava from a config (a tiny CLIP vision
tower and a tiny Llama) and :func:`make_shape_data` draws seeded synthetic images of coloured shapes
with a question about each ("What colour is the shape?").
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
import copy
import tempfile

import pandas as pd
import torch
from peft import PeftModel
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from emloc.calibration import CalibrationStats, collect_statistics
from emloc.config import EmulatorConfig, LoraConfigSpec
from emloc.correction import correct_adapter
from emloc.data import IGNORE_INDEX, pad_batch
from emloc.svd_emulator import EmulatorFactors, build_factors, emulate
from emloc.errors import EmlocError
from emloc.lora import load_adapter, train_lora

VISION_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
"""CLIP-style vision encoder linears (q/k/v share an input, so they share one ``C``)."""
PROJECTOR_LINEARS = ["linear_1", "linear_2"]
LANGUAGE_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VLM_TARGETS = sorted(set(VISION_PROJECTIONS + PROJECTOR_LINEARS + LANGUAGE_PROJECTIONS))

PARTS = {"vision": r".*vision_tower\..*", "projector": r".*multi_modal_projector\..*",
         "language": r".*language_model\..*"}
"""Regexes naming the three parts of a Llava model by qualified module name."""

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.2), "blue": (0.1, 0.2, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
SHAPES = ["square", "disc", "cross"]


def part_ratio_patterns(vision: float, projector: float, language: float) -> dict[str, float]:
    """``emulator.ratio_patterns`` giving each part of the model its own retention ratio ``rho``."""
    return {PARTS["vision"]: vision, PARTS["projector"]: projector, PARTS["language"]: language}


def part_of(name: str) -> str:
    """'vision', 'projector', 'language' or 'other' for a qualified module name."""
    return next((part for part, pattern in PARTS.items() if re.fullmatch(pattern, name)), "other")


def tiny_llava(vocab_size: int, seed: int = 0, image_size: int = 32, patch_size: int = 8,
               vision_hidden: int = 32, text_hidden: int = 64,
               layers: int = 2) -> LlavaForConditionalGeneration:
    """A random Llava (tiny CLIP vision tower + tiny Llama) built from a config; the image token is the
    id ``vocab_size`` (one past the tokenizer's vocabulary), so no tokenizer change is needed."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab_size + 1, hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(config).eval()


def image_token_count(model: LlavaForConditionalGeneration) -> int:
    """How many image tokens one image takes in the text (patches; the CLS token is dropped by 'default')."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if model.config.vision_feature_select_strategy == "default" else patches + 1


# ---- synthetic image + text data ---------------------------------------------------------------

@dataclass(frozen=True)
class ImageExample:
    pixel_values: torch.Tensor
    """``(3, H, W)`` in [-1, 1]."""
    prompt: str
    response: str


def draw_shape(shape: str, colour: tuple[float, float, float], size: int, rng: random.Random) -> torch.Tensor:
    """A ``(3, size, size)`` image in [-1, 1]: a coloured shape at a random place on a noisy grey ground."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    image = 0.4 + 0.1 * torch.rand(3, size, size, generator=generator)
    radius = rng.randint(size // 6, size // 3)
    cy, cx = rng.randint(radius, size - radius - 1), rng.randint(radius, size - radius - 1)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    dy, dx = (y - cy).abs(), (x - cx).abs()
    if shape == "square":
        inside = (dy <= radius) & (dx <= radius)
    elif shape == "disc":
        inside = dy**2 + dx**2 <= radius**2
    else:
        inside = ((dy <= radius // 3) & (dx <= radius)) | ((dx <= radius // 3) & (dy <= radius))
    image[:, inside] = torch.tensor(colour).unsqueeze(1)
    return image * 2 - 1


def make_shape_data(n: int, seed: int = 0, size: int = 32, question: str = "colour") -> list[ImageExample]:
    """``n`` seeded images of a coloured shape with the question "What colour is the shape?" (or which
    shape)."""
    if question not in ("colour", "shape"):
        raise EmlocError(f"question {question!r} is unknown: use 'colour' or 'shape'")
    rng = random.Random(f"shapes-{seed}")
    examples = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        prompt = "What colour is the shape?" if question == "colour" else "Which shape is in the picture?"
        answer = colour if question == "colour" else shape
        examples.append(ImageExample(draw_shape(shape, COLOURS[colour], size, rng), prompt, answer))
    return examples


def encode_image_examples(tokenizer, examples: list[ImageExample], image_token_id: int,
                          n_image_tokens: int) -> list[dict]:
    """Features: ``input_ids`` = image tokens + "Question: ... Answer:" + response + eos; the loss is on the
    response only; ``pixel_values`` rides along."""
    features = []
    for example in examples:
        prompt = tokenizer(f"Question: {example.prompt}\nAnswer:", add_special_tokens=False)["input_ids"]
        answer = (tokenizer(f" {example.response}", add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])
        prompt = [image_token_id] * n_image_tokens + prompt
        features.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                         "pixel_values": example.pixel_values})
    return features


class ImageTextCollator:
    """Pads token ids (right), stacks ``pixel_values``: the batch a Llava-style model takes."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch([{k: v for k, v in f.items() if k != "pixel_values"} for f in features],
                          self.pad_token_id)
        batch["pixel_values"] = torch.stack([f["pixel_values"] for f in features])
        return batch


def check_vlm(model: nn.Module) -> None:
    """A clear error when the model is not a Llava-style vision-language model."""
    names = {name for name, _ in model.named_modules()}
    if (not any(part_of(name) == "vision" for name in names)
            or not any(part_of(name) == "language" for name in names)):
        raise EmlocError(f"{type(model).__name__} has no vision_tower / language_model: the VLM path needs a "
                         f"Llava-style model (e.g. LlavaForConditionalGeneration)")


# ---- the stages on a VLM ----------------------------------------------------------------------

@dataclass
class VlmStages:
    """Every stage's result on a vision-language model (in memory; the models are not saved)."""

    stats: CalibrationStats
    factors: EmulatorFactors
    emulator_lora: PeftModel
    """LoRA trained on the emulator."""
    corrected: PeftModel
    """The original model with the corrected adapter."""
    correction_report: pd.DataFrame
    history: list


def run_vlm_stages(model: nn.Module, tokenizer, train: list[ImageExample], calibration: list[ImageExample],
                   emulator_config: EmulatorConfig, lora_spec: LoraConfigSpec, clamp: float | None = 3.0,
                   seed: int = 0, progress: bool = False) -> VlmStages:
    """Calibrate on image + text, build the emulator, train LoRA on it, correct the adapter for ``model``.

    ``model`` is not changed: the emulator is a copy, and the corrected adapter wraps another copy.
    """
    check_vlm(model)
    image_token_id, n_image_tokens = model.config.image_token_id, image_token_count(model)
    collator = ImageTextCollator(tokenizer.pad_token_id)

    def encode(examples):
        return encode_image_examples(tokenizer, examples, image_token_id, n_image_tokens)

    stats = collect_statistics(model, encode(calibration), emulator_config.target_modules,
                               tokenizer.pad_token_id, progress=progress, collate=collator)
    factors = build_factors(model, stats, emulator_config, progress=progress)
    result = train_lora(emulate(model, factors), encode(train), lora_spec, emulator_config.target_modules,
                        tokenizer.pad_token_id, seed=seed, progress=progress, collator=collator)
    with tempfile.TemporaryDirectory(prefix="emloc-vlm-adapter-") as folder:
        result.model.save_pretrained(folder)
        corrected = load_adapter(copy.deepcopy(model), folder)
    report, _ = correct_adapter(corrected, factors, clamp)
    report["part"] = report["module"].map(part_of)
    return VlmStages(stats, factors, result.model, corrected, report, result.history)


@torch.no_grad()
def response_loss(model: nn.Module, tokenizer, examples: list[ImageExample], batch_size: int = 16) -> float:
    """Mean cross-entropy over response tokens of ``examples`` (images included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    features = encode_image_examples(tokenizer, examples, base.config.image_token_id, image_token_count(base))
    collator = ImageTextCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collator(features[start:start + batch_size])
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        targets = labels[:, 1:]
        total += float(nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)
