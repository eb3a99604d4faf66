"""A base denoiser the project makes itself: a class-conditional diffusion transformer pretrained on
scikit-learn's digits with one digit held out, its sampler, and the digits judge.

Why a DiT (``diffusers.DiTTransformer2DModel``): like FLUX, nearly all of its weights (99%) sit in
``nn.Linear`` layers inside repeated transformer blocks, conditioned by adaLN modulation on the timestep and
the class, so EMLoC's emulator applies as it does to a language model. On the 8 x 8 digits (1797 images that
ship inside the scikit-learn wheel: no download) a 6-block DiT with patch size 2 (16 tokens) learns the nine
trained digits within minutes on one CPU thread.

The held-out digit (7) keeps its class id, never trained: in the DreamBooth stages it is the rare token a
few subject images teach. The judge is a logistic regression on raw pixels trained on all ten digits; a
sample counts as the digit asked for when the judge says so.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emloc.calibration import CalibrationStats, recording_inputs, stats_from_accumulator, target_linears
from emloc.errors import EmlocError
from emloc.io import atomic_dir
from emloc.models import cache_dir
from emloc.targets import AUTO

HELD_OUT_DIGIT = 7
N_CLASSES = 10
IMAGE_SIZE = 8
DENOISER_FILE = "pretraining.json"


@dataclass(frozen=True)
class DenoiserPreset:
    """The denoiser's size and its pretraining schedule."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 1e-3
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    """Cosine noise schedule: on 8 x 8 images the linear one leaves too little signal at most timesteps."""
    sample_steps: int = 25
    """DDIM steps when sampling."""
    guidance: float = 2.0
    """Classifier-free guidance scale (the DiT's label embedding drops 10% of labels in training)."""


DENOISER_PRESETS = {
    "standard": DenoiserPreset(),
    "tiny": DenoiserPreset(num_layers=2, num_attention_heads=2, attention_head_dim=8, steps=12, batch_size=32,
                           sample_steps=4),
}
"""``standard``: the denoiser the suite uses (about 2.1 M parameters); ``tiny``: for tests and CI (a few
steps, far from a good denoiser)."""


# ---- data and the judge --------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` floats in ``[-1, 1]`` and their labels ``(N,)``."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


def pretraining_split(held_out: int = HELD_OUT_DIGIT) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits the base denoiser learns: every image but those of ``held_out``."""
    images, labels = digit_images()
    keep = labels != held_out
    return images[keep], labels[keep]


@functools.lru_cache(maxsize=1)
def judge():
    """A logistic regression on raw pixels, fit on all ten digits (deterministic: lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    images, labels = digit_images()
    return LogisticRegression(max_iter=2000).fit(_pixels(images), labels.numpy())


def _pixels(images: torch.Tensor) -> np.ndarray:
    """``(N, 1, 8, 8)`` in ``[-1, 1]`` -> the judge's ``(N, 64)`` in ``[0, 1]``."""
    return ((images.clamp(-1, 1) + 1) / 2).reshape(len(images), -1).numpy()


def judged(images: torch.Tensor) -> np.ndarray:
    """The digit the judge sees in each image."""
    return judge().predict(_pixels(images))


# ---- the model and its noise ---------------------------------------------------------------------

def build_denoiser(preset: DenoiserPreset, seed: int = 0) -> nn.Module:
    """A freshly initialised class-conditional DiT for ``preset`` (weights from ``seed``)."""
    torch.manual_seed(seed)
    return _dit(preset)


def denoiser_skeleton(preset: DenoiserPreset) -> nn.Module:
    """``preset``'s DiT on the meta device (its structure only: no weights, the global RNG untouched)."""
    with torch.device("meta"):
        return _dit(preset)


def _dit(preset: DenoiserPreset) -> nn.Module:
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=preset.num_attention_heads,
                                 attention_head_dim=preset.attention_head_dim, in_channels=1, out_channels=1,
                                 num_layers=preset.num_layers, sample_size=IMAGE_SIZE, patch_size=2,
                                 num_embeds_ada_norm=N_CLASSES)


def noise_scheduler(preset: DenoiserPreset):
    """The DDPM forward process the denoiser is trained for (``epsilon`` prediction)."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=preset.train_timesteps, beta_schedule=preset.beta_schedule)


def noised_batch(images: torch.Tensor, scheduler, generator: torch.Generator,
                 timesteps: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
    """``(x_t, t, epsilon)``: each image noised at a timestep drawn uniformly, as in training (``timesteps``:
    from ``[low, high)`` only)."""
    noise = torch.randn(images.shape, generator=generator)
    low, high = timesteps or (0, scheduler.config.num_train_timesteps)
    t = torch.randint(low, high, (len(images),), generator=generator)
    return scheduler.add_noise(images, noise, t), t, noise


def denoising_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, scheduler,
                   generator: torch.Generator) -> torch.Tensor:
    """``|| epsilon - epsilon_theta(x_t, t, y) ||^2`` averaged over the batch."""
    x_t, t, noise = noised_batch(images, scheduler, generator)
    return nn.functional.mse_loss(model(x_t, timestep=t, class_labels=labels).sample, noise)


def pretrain(preset: DenoiserPreset, seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the base denoiser on every digit but :data:`HELD_OUT_DIGIT`; the same seed gives the same
    weights. Returns the model (eval mode) and a summary (steps, seconds, last losses)."""
    images, labels = pretraining_split()
    model = build_denoiser(preset, seed).train()
    scheduler = noise_scheduler(preset)
    generator = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        batch = torch.randint(0, len(images), (preset.batch_size,), generator=generator)
        return denoising_loss(model, images[batch], labels[batch], scheduler, generator)
    start = time.perf_counter()
    losses = _optimise(model.parameters(), preset.learning_rate, preset.steps, step_loss,
                       "denoiser pretraining", progress)
    summary = {"steps": preset.steps, "seconds": time.perf_counter() - start, "seed": seed,
               "final_loss": float(np.mean(losses[-50:])), "threads": torch.get_num_threads()}
    return model.eval(), summary


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, preset: DenoiserPreset, seed: int = 0) -> torch.Tensor:
    """Images ``(N, 1, 8, 8)`` in ``[-1, 1]`` for ``labels`` by DDIM with classifier-free guidance."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler.from_config(noise_scheduler(preset).config)
    scheduler.set_timesteps(preset.sample_steps)
    x = torch.randn(len(labels), 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    unconditional = torch.full_like(labels, N_CLASSES)  # the label embedding's null class
    for t in scheduler.timesteps:
        both = model(torch.cat([x, x]), timestep=t.expand(2 * len(labels)),
                     class_labels=torch.cat([labels, unconditional])).sample
        conditional, free = both.chunk(2)
        x = scheduler.step(free + preset.guidance * (conditional - free), t, x).prev_sample
    return x.clamp(-1, 1)


def judged_accuracy(model: nn.Module, preset: DenoiserPreset, per_class: int = 20, seed: int = 0,
                    classes: list[int] | None = None) -> pd.DataFrame:
    """Per asked-for digit, the share of ``per_class`` samples the judge reads as that digit (``classes``:
    default every digit but the held-out one)."""
    classes = [c for c in range(N_CLASSES) if c != HELD_OUT_DIGIT] if classes is None else classes
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    seen = judged(sample(model, labels, preset, seed))
    return (pd.DataFrame({"digit": labels.numpy(), "judged_as_asked": seen == labels.numpy()})
            .groupby("digit", as_index=True)["judged_as_asked"].mean().to_frame("share_judged_as_asked"))


# ---- DreamBooth on the held-out digit: data, objective, metrics -----------------------------------

@dataclass(frozen=True)
class DreamBoothData:
    """The few subject images (the held-out digit, taught through its never-trained class id) and the prior
    images (real other digits) that keep the rest of the model in place."""

    subject: torch.Tensor
    """``(K, 1, 8, 8)``: images of :data:`HELD_OUT_DIGIT`."""
    prior: torch.Tensor
    """``(M, 1, 8, 8)``: images of the other digits."""
    prior_labels: torch.Tensor
    """``(M,)``."""


def dreambooth_data(n_subject: int = 10, n_prior: int = 200, seed: int = 0) -> DreamBoothData:
    """``n_subject`` images of the held-out digit and ``n_prior`` of the others, drawn with ``seed``."""
    images, labels = digit_images()
    generator = torch.Generator().manual_seed(seed)
    subject = torch.nonzero(labels == HELD_OUT_DIGIT).flatten()
    prior = torch.nonzero(labels != HELD_OUT_DIGIT).flatten()
    if not 1 <= n_subject <= len(subject) or not 0 <= n_prior <= len(prior):
        raise EmlocError(f"DreamBooth needs 1..{len(subject)} subject and 0..{len(prior)} prior images, got "
                         f"{n_subject} and {n_prior}")
    subject = subject[torch.randperm(len(subject), generator=generator)[:n_subject]]
    prior = prior[torch.randperm(len(prior), generator=generator)[:n_prior]]
    return DreamBoothData(images[subject], images[prior], labels[prior])


def dreambooth_batch(data: DreamBoothData, batch_size: int, prior_share: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(images, labels, is_prior)``: ``round(batch_size * prior_share)`` prior images (none without prior
    data) and subject images for the rest, each drawn with replacement."""
    n_prior = round(batch_size * prior_share) if len(data.prior) else 0
    n_subject = batch_size - n_prior
    pick_subject = torch.randint(0, len(data.subject), (n_subject,), generator=generator)
    pick_prior = torch.randint(0, max(len(data.prior), 1), (n_prior,), generator=generator)
    images = torch.cat([data.subject[pick_subject], data.prior[pick_prior]])
    labels = torch.cat([torch.full((n_subject,), HELD_OUT_DIGIT), data.prior_labels[pick_prior]])
    return images, labels, torch.arange(batch_size) >= n_subject


def dreambooth_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, is_prior: torch.Tensor,
                    scheduler, generator: torch.Generator, prior_weight: float = 1.0) -> torch.Tensor:
    """DreamBooth's objective: the denoising loss on the subject images plus ``prior_weight`` times the
    denoising loss on the prior images (each a mean over its own images)."""
    x_t, t, noise = noised_batch(images, scheduler, generator)
    error = ((model(x_t, timestep=t, class_labels=labels).sample - noise) ** 2).flatten(1).mean(1)
    subject = error[~is_prior].mean()
    return subject + prior_weight * error[is_prior].mean() if is_prior.any() else subject


def train_dreambooth(peft_model: nn.Module, data: DreamBoothData, preset: DenoiserPreset, steps: int = 100,
                     learning_rate: float = 1e-3, batch_size: int = 16, prior_share: float = 0.5,
                     prior_weight: float = 1.0, seed: int = 0, progress: bool = True,
                     on_loss=None) -> list[float]:
    """LoRA on a denoiser (a peft model: only the LoRA weights train) with :func:`dreambooth_loss`, AdamW and
    a constant learning rate; the same seed gives the same batches and noise. Returns the losses;
    ``on_loss(step, loss)`` sees each one as it comes."""
    scheduler = noise_scheduler(preset)
    generator = torch.Generator().manual_seed(seed)

    def step_loss() -> torch.Tensor:
        batch = dreambooth_batch(data, batch_size, prior_share, generator)
        return dreambooth_loss(peft_model, *batch, scheduler, generator, prior_weight)
    peft_model.train()
    losses = _optimise([p for p in peft_model.parameters() if p.requires_grad], learning_rate, steps,
                       step_loss, "DreamBooth LoRA", progress, on_loss)
    peft_model.eval()
    return losses


def _optimise(parameters, learning_rate: float, steps: int, step_loss, desc: str,
              progress: bool, on_loss=None) -> list[float]:
    """``steps`` AdamW steps (constant learning rate, no weight decay) on ``step_loss()``; the losses."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    losses = []
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress):
        loss = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_loss is not None:
            on_loss(step, losses[-1])
    return losses


@torch.no_grad()
def calibration_statistics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           preset: DenoiserPreset, seed: int = 0,
                           target_modules: list[str] | tuple[str, ...] = (AUTO,),
                           timesteps: tuple[int, int] | None = None) -> CalibrationStats:
    """``C`` per distinct input of the targeted linears, from one forward over ``images`` noised at timesteps
    drawn as in training (``timesteps``: from ``[low, high)`` only; every patch token counts)."""
    x_t, t, _ = noised_batch(images, noise_scheduler(preset), torch.Generator().manual_seed(seed), timesteps)
    device = next(model.parameters()).device
    with recording_inputs(target_linears(model, list(target_modules)), device) as accumulator:
        accumulator.begin_batch(None)
        model(x_t.to(device), timestep=t.to(device), class_labels=labels.to(device))
    return stats_from_accumulator(accumulator, len(images))


TIMESTEP_BINS = 4
"""The fidelity check's timestep ranges (equal shares of the training schedule, low noise first)."""


@torch.no_grad()
def noise_prediction_error(original: nn.Module, emulator: nn.Module, data: DreamBoothData,
                           preset: DenoiserPreset, seed: int = 0, draws: int = 4) -> dict:
    """How far the emulator's noise prediction is from the original's on the subject and prior images, each
    noised ``draws`` times at timesteps drawn as in training: ``||eps' - eps|| / ||eps||`` over all of them
    and per timestep range (:data:`TIMESTEP_BINS`), the diffusion counterpart of the language model's KL."""
    images = torch.cat([data.subject, data.prior]).repeat(draws, 1, 1, 1)
    labels = torch.cat([torch.full((len(data.subject),), HELD_OUT_DIGIT), data.prior_labels]).repeat(draws)
    x_t, t, _ = noised_batch(images, noise_scheduler(preset), torch.Generator().manual_seed(seed))
    device = next(original.parameters()).device
    inputs = dict(timestep=t.to(device), class_labels=labels.to(device))
    eps = original(x_t.to(device), **inputs).sample.flatten(1).float()
    eps_emulator = emulator(x_t.to(device), **inputs).sample.flatten(1).float()
    error, norm = (eps_emulator - eps).norm(dim=1) ** 2, eps.norm(dim=1) ** 2
    bins = (t * TIMESTEP_BINS // preset.train_timesteps).clamp(max=TIMESTEP_BINS - 1)
    width = preset.train_timesteps // TIMESTEP_BINS
    per_bin = {f"{b * width}-{(b + 1) * width - 1}": _relative(error[bins == b], norm[bins == b])
               for b in range(TIMESTEP_BINS) if (bins == b).any()}
    return {"relative_error": _relative(error, norm), "relative_error_by_timestep": per_bin,
            "images": int(len(images))}


def _relative(squared_error: torch.Tensor, squared_norm: torch.Tensor) -> float:
    return float((squared_error.sum() / squared_norm.sum()).sqrt())


def nearest_distance(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per sample, the RMS pixel distance (pixels in ``[0, 1]``) to its nearest reference image: near 0 for a
    sample that copies a training image (memorisation)."""
    a, b = ((x.clamp(-1, 1) + 1) / 2 for x in (samples.flatten(1), references.flatten(1)))
    return torch.cdist(a, b).min(dim=1).values / math.sqrt(a.shape[1])


@torch.no_grad()
def dreambooth_metrics(model: nn.Module, preset: DenoiserPreset, data: DreamBoothData, per_class: int = 20,
                       seed: int = 0) -> dict[str, float]:
    """:func:`sample_metrics` of ``per_class`` samples of every digit (seeded by ``seed``)."""
    labels = torch.tensor([c for c in range(N_CLASSES) for _ in range(per_class)])
    return sample_metrics(sample(model, labels, preset, seed), labels, data)


def sample_metrics(images: torch.Tensor, labels: torch.Tensor, data: DreamBoothData) -> dict[str, float]:
    """How a personalised denoiser does, from its samples ``images`` of the digits ``labels``:

    - ``subject_fidelity``: share of held-out-digit samples the judge reads as that digit;
    - ``prior_preservation``: share of the other digits' samples read as the digit asked for;
    - ``memorisation``: mean distance of the subject samples to the nearest subject training image (lower:
      closer to copying the few training images);
    - ``quality``: the judge's mean confidence (its top class probability) over all samples.
    """
    seen, confidence = judged(images), judge().predict_proba(_pixels(images)).max(axis=1)
    subject = (labels == HELD_OUT_DIGIT).numpy()
    asked = seen == labels.numpy()
    return {"subject_fidelity": float(asked[subject].mean()),
            "prior_preservation": float(asked[~subject].mean()),
            "memorisation": float(nearest_distance(images[subject], data.subject).mean()),
            "quality": float(confidence.mean()), "samples": int(len(labels))}


# ---- what a class looks at: stored samples, image grids, calibration error across timesteps ------

def sample_record(images: torch.Tensor, labels: torch.Tensor, keep: int) -> dict:
    """The first ``keep`` samples of every digit as 8-bit pixels (``results.json`` keeps them for the views):
    ``{"digits": [...], "per_digit": keep, "pixels": [[64 ints] per sample, digit by digit]}``."""
    pixels = ((images.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).flatten(1)
    digits = sorted(int(d) for d in labels.unique())
    rows = [pixels[labels == digit][:keep] for digit in digits]
    return {"digits": digits, "per_digit": min(len(r) for r in rows),
            "pixels": [row.tolist() for block in rows for row in block[:min(len(r) for r in rows)]]}


def stored_samples(record: dict) -> np.ndarray:
    """A :func:`sample_record` back as ``(digits, per_digit, 8, 8)`` in ``[0, 1]``."""
    pixels = np.asarray(record["pixels"], dtype=float) / 255
    return pixels.reshape(len(record["digits"]), record["per_digit"], IMAGE_SIZE, IMAGE_SIZE)


def as_unit_images(images: torch.Tensor) -> np.ndarray:
    """``(N, 1, 8, 8)`` in ``[-1, 1]`` -> ``(N, 8, 8)`` in ``[0, 1]`` (for pictures)."""
    return ((images.clamp(-1, 1) + 1) / 2).squeeze(1).numpy()


def mosaic(tiles: np.ndarray, gap: int = 1) -> np.ndarray:
    """``(rows, cols, h, w)`` images as one ``(rows (h + gap) - gap, cols (w + gap) - gap)`` picture, NaN in
    the gaps (a heatmap leaves them blank)."""
    rows, cols, h, w = tiles.shape
    picture = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for i in range(rows):
        for j in range(cols):
            picture[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = tiles[i, j]
    return picture


def calibration_error_by_timestep(model: nn.Module, factors, data: DreamBoothData, preset: DenoiserPreset,
                                  seed: int = 0, bins: int = TIMESTEP_BINS) -> pd.DataFrame:
    """Each emulated linear's calibration error ``||(W - W') X|| / ||W X||`` when ``X`` are its inputs at
    timesteps from one range of the schedule: subject and prior images noised within each of ``bins`` equal
    ranges. Columns: ``module``, ``block``, ``type``, ``timesteps`` (the range), ``low`` (its first step),
    ``error``."""
    from emloc.lowrank import calibration_error
    from emloc.targets import module_types
    images = torch.cat([data.subject, data.prior])
    labels = torch.cat([torch.full((len(data.subject),), HELD_OUT_DIGIT), data.prior_labels])
    width = preset.train_timesteps // bins
    types = module_types(list(factors.u))
    rows = []
    for b in range(bins):
        stats = calibration_statistics(model, images, labels, preset, seed, list(factors.u),
                                       timesteps=(b * width, (b + 1) * width))
        linears = target_linears(model, list(factors.u))
        for name in factors.u:
            W = linears[name].weight.detach().double()
            error = calibration_error(W, factors.W_emulated(name).double(), stats.C(name).double())
            rows.append({"module": name, "block": _block_index(name), "type": types[name],
                         "timesteps": f"{b * width}-{(b + 1) * width - 1}", "low": b * width, "error": error})
    return pd.DataFrame(rows)


def _block_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[parts.index("transformer_blocks") + 1]) if "transformer_blocks" in parts else -1


# ---- the cached base denoiser ------------------------------------------------------------------------

def denoiser_dir(preset: str = "standard", seed: int = 0) -> Path:
    return cache_dir() / f"digits-dit-{preset}-seed{seed}"


def pretrained_denoiser_path(preset: str = "standard", seed: int = 0, progress: bool = True,
                             folder: str | Path | None = None) -> Path:
    """The base denoiser's folder (``save_pretrained`` plus ``pretraining.json``), pretrained once and
    cached like the default language model's conversion (``folder``: somewhere else than the cache)."""
    if preset not in DENOISER_PRESETS:
        raise EmlocError(f"denoiser preset {preset!r} is unknown: use {' or '.join(DENOISER_PRESETS)}")
    target = Path(folder) if folder is not None else denoiser_dir(preset, seed)
    if (target / DENOISER_FILE).exists():
        return target
    settings = DENOISER_PRESETS[preset]
    model, summary = pretrain(settings, seed, progress)
    accuracy = judged_accuracy(model, settings)["share_judged_as_asked"]
    record = summary | {"preset": preset, "settings": dataclasses.asdict(settings),
                        "held_out": HELD_OUT_DIGIT, "judged_as_asked": float(accuracy.mean()),
                        "judged_as_asked_per_digit": {int(d): float(a) for d, a in accuracy.items()}}
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        (Path(tmp) / DENOISER_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return target


def load_denoiser(folder: str | Path) -> nn.Module:
    """A saved denoiser in eval mode."""
    from diffusers import DiTTransformer2DModel
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise EmlocError(f"{folder} is not a saved denoiser (no config.json): run `emloc denoiser` first")
    return DiTTransformer2DModel.from_pretrained(folder).eval()


def pretraining_record(folder: str | Path) -> dict:
    return json.loads((Path(folder) / DENOISER_FILE).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    """``emloc denoiser [--preset standard|tiny] [--seed N] [--out DIR]``: pretrain (or reuse) the base
    denoiser and print where it is and how often the judge reads its samples as the digit asked for."""
    from emloc.arguments import OneLineParser
    from emloc.errors import report_errors
    parser = OneLineParser(prog="emloc denoiser",
                           description="pretrain the base digits denoiser (a DiT) once; later calls reuse it")
    parser.add_argument("--preset", choices=list(DENOISER_PRESETS), default="standard",
                        help="standard (the suite's denoiser, minutes on one thread) or tiny (tests)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the weights and the batches")
    parser.add_argument("--out", default=None, help="a folder instead of the cache")

    def command() -> None:
        args = parser.parse_args(argv)
        folder = pretrained_denoiser_path(args.preset, args.seed, folder=args.out)
        record = pretraining_record(folder)
        print(f"denoiser ({args.preset}, seed {args.seed}) in {folder}: {record['steps']} steps in "
              f"{record['seconds']:.0f} s; {record['judged_as_asked']:.1%} of samples judged the digit asked "
              f"for (digit {HELD_OUT_DIGIT} held out)", flush=True)

    return report_errors(command)
