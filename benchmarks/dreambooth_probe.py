"""A first look at EMLoC on the digits denoiser, DreamBooth-style (issue 22, ahead of its stages): the held-out 7
taught from 10 images through its never-trained class id, with real other digits as prior.

    python benchmarks/dreambooth_probe.py [SEED ...]        # default: seed 0

Per seed: the cached base denoiser (``emloc denoiser``); calibration on noised subject and prior images at
training-distributed timesteps; emulators at ratio 0.5, activation-aware and plain SVD (the official FLUX
recipe); LoRA (r 8, alpha 16, 300 steps, lr 1e-3, batch 16, half prior) on each emulator and on the original;
the emulator's adapter moved to the original as it is and corrected (lambda 3). Metrics from 50 samples of
every digit: subject fidelity, prior preservation, memorisation, quality proxy
(:func:`emloc.denoiser.dreambooth_metrics`). One torch thread. Writes ``benchmarks/results/dreambooth_probe.json``
and ``.md`` with their provenance record. Not yet the stages on the run directory, nor 5 seeds with
intervals: a probe.
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, N_SUBJECT, N_PRIOR, PER_CLASS = 300, 10, 200, 50


def calibration_stats(model, data, preset, seed: int):
    """Each subject image 4 times and 40 prior images, noised once (:func:`emloc.denoiser.calibration_statistics`)."""
    import torch

    from emloc import denoiser
    images = torch.cat([data.subject.repeat(4, 1, 1, 1), data.prior[:40]])
    labels = torch.cat([torch.full((4 * len(data.subject),), denoiser.HELD_OUT_DIGIT), data.prior_labels[:40]])
    return denoiser.calibration_statistics(model, images, labels, preset, seed)


def one_seed(seed: int) -> list[dict]:
    from emloc import denoiser
    from emloc.config import EmulatorConfig, LoraConfigSpec
    from emloc.correction import correct_adapter
    from emloc.lora import add_lora, load_adapter
    from emloc.svd_emulator import build_factors, emulate

    preset = denoiser.DENOISER_PRESETS["standard"]
    base = denoiser.load_denoiser(denoiser.pretrained_denoiser_path("standard", 0, progress=False))
    data = denoiser.dreambooth_data(N_SUBJECT, N_PRIOR, seed)
    spec = LoraConfigSpec(r=8, alpha=16)

    def metrics(variant: str, model) -> dict:
        return {"seed": seed, "variant": variant,
                **denoiser.dreambooth_metrics(model, preset, data, PER_CLASS, seed=1000 + seed)}

    def trained(model):
        peft_model = add_lora(model, spec, ["auto"], seed=seed)
        denoiser.train_dreambooth(peft_model, data, preset, steps=STEPS, seed=seed, progress=False)
        return peft_model

    rows = [metrics("zero_shot", base), metrics("full_lora", trained(copy.deepcopy(base)))]
    stats = calibration_stats(base, data, preset, seed)
    for method in ("activation_aware", "plain"):
        factors = build_factors(base, stats, EmulatorConfig(ratio=0.5, method=method), progress=False)
        emulator_lora = trained(emulate(base, factors))
        rows.append(metrics(f"{method}: emulator_lora", emulator_lora))
        with tempfile.TemporaryDirectory() as folder:
            emulator_lora.save_pretrained(folder)
            moved = load_adapter(copy.deepcopy(base), folder)
            rows.append(metrics(f"{method}: transfer_uncorrected", moved))
            corrected = load_adapter(copy.deepcopy(base), folder)
        correct_adapter(corrected, factors, lam=3.0)
        rows.append(metrics(f"{method}: transfer_corrected", corrected))
    return rows


def main(argv: list[str]) -> int:
    import pandas as pd
    import torch

    from emloc import io, provenance
    torch.set_num_threads(1)
    seeds = [int(seed) for seed in argv] or [0]
    rows = [row for seed in seeds for row in one_seed(seed)]
    table = pd.DataFrame(rows)
    mean = table.groupby("variant", sort=False)[["subject_fidelity", "prior_preservation", "memorisation",
                                                  "quality"]].mean().reset_index()
    text = mean.to_markdown(index=False, floatfmt=".3f")
    print(text)
    target = ROOT / "benchmarks" / "results" / "dreambooth_probe.json"
    io.write_json(target, {"seeds": seeds, "steps": STEPS, "subject_images": N_SUBJECT, "prior_images": N_PRIOR,
                           "samples_per_digit": PER_CLASS, "rows": rows})
    target.with_suffix(".md").write_text(text + f"\n\nMeans over {len(seeds)} seed(s); a probe, no intervals.\n",
                                         encoding="utf-8")
    record = provenance.record({}, command="python benchmarks/dreambooth_probe.py " + " ".join(map(str, seeds)))
    provenance.write([target, target.with_suffix(".md")], record)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
