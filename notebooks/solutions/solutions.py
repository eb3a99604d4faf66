# Solutions of the notebooks' exercises, one block per exercise id (never imported).
#
# An exercise cell in notebooks 01-04 and 08 is a code cell whose first line is `# EXERCISE <id>`.
# `python -m emloc.exercises solve notebooks/0*.ipynb --out DIR` copies the notebooks and replaces the rest of
# each exercise cell with the block `# SOLUTION <id>` below (the header line stays). The check call lives in the
# *next* cell, which is never replaced. Each block may use what the notebook defined before the exercise
# (`run`, `factors`, `report`, `tensors`, ...) and must define the names its check cell reads (noted on the
# block's first comment line). See docs/teaching.md, "Writing an exercise".

# SOLUTION rank_from_ratio
# notebook 01 - defines my_rank; check: check_rank_from_ratio(my_rank)
import math


def my_rank(rho, out_features, in_features):
    return max(1, math.floor(rho * out_features * in_features / (out_features + in_features)))

# SOLUTION break_even
# notebook 01 - defines break_even for one module; check: check_break_even(break_even, row.out_features, row.in_features)
row = factors.report.iloc[0]
break_even = row.out_features * row.in_features / (row.out_features + row.in_features)

# SOLUTION error_curve
# notebook 01 - defines my_error; check: check_error_curve(my_error, factors.spectra[explorer.module]["whitened"])
def my_error(sigma, k):
    energy = sigma ** 2
    return float((energy[k:].sum() / energy.sum()).sqrt())

# SOLUTION smallest_rank
# notebook 01 - defines module, target, r_needed; check: check_smallest_rank(r_needed, factors, module, target)
import numpy as np
from emloc.reports import spectrum_curves

module, target = explorer.module, 0.1
error = spectrum_curves(factors.spectra[module]["whitened"])["error"]
r_needed = int(np.argmax(error <= target))

# SOLUTION whitened_truncation
# notebook 02 - defines name, r, W_prime; check: check_whitened_truncation(W_prime, run, name, r)
import torch
from emloc.exercises import calibration_C

name = report["module"].iloc[0]
r = int(report["rank"].iloc[0])
W = run.model.get_submodule(name).weight.detach().double()
C = calibration_C(run, name)                       # C = sum_t x_t x_t^T of this module's input
eigenvalues, E = torch.linalg.eigh(C)
S = E * eigenvalues.clamp_min(0).sqrt()            # C = S S^T
U, sigma, _ = torch.linalg.svd(W @ S, full_matrices=False)
W_prime = U[:, :r] @ (U[:, :r].T @ W)              # W' = U_r U_r^T W

# SOLUTION compressed_parameters
# notebook 02 - defines n_params for a 576 x 1536 weight at rho = 0.3; check: check_compressed_parameters(n_params, 576, 1536, 0.3)
import math

r = max(1, math.floor(0.3 * 576 * 1536 / (576 + 1536)))
n_params = r * (576 + 1536)                       # u: 576 x r, v: r x 1536

# SOLUTION prediction
# notebook 02 - defines prediction (a module type) at rho = 0.3; check: check_prediction(prediction, factors, 0.3)
from emloc.reports import error_curves, errors_at_ratio

at_03 = errors_at_ratio(report, error_curves(factors.spectra, "whitened"), 0.3)
prediction = at_03.groupby("type")["error"].mean().idxmax()

# SOLUTION lora_scaling
# notebook 03 - defines s; check: check_lora_scaling(s, run.config.lora.alpha, run.config.lora.r, run.config.lora.use_rslora)
import math

lora = run.config.lora
s = lora.alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)

# SOLUTION lora_parameters
# notebook 03 - defines linears, n_lora; check: check_lora_parameters(n_lora, run)
from torch import nn
from emloc.calibration import matches_target

# LoRA wraps every targeted linear, also the one the emulator keeps dense (not in the emulator's report)
linears = {name: m for name, m in run.model.named_modules()
           if isinstance(m, nn.Linear) and matches_target(name, run.config.emulator.target_modules)}
n_lora = run.config.lora.r * sum(m.in_features + m.out_features for m in linears.values())

# SOLUTION B_tilde_and_D
# notebook 04 - defines name, B_tilde, D, Q; check: check_B_tilde_and_D(B_tilde, D, run, name, Q=Q)
import torch
from safetensors.torch import load_file
from emloc.lora import lora_scaling

name = report["module"].iloc[0]
adapter = load_file(run.adapter_dir("emulator") / "adapter_model.safetensors")
A = next(t for k, t in adapter.items() if f"{name}.lora_A" in k).double()   # r x in
B = next(t for k, t in adapter.items() if f"{name}.lora_B" in k).double()   # out x r
s = lora_scaling(run.config.lora.alpha, run.config.lora.r, run.config.lora.use_rslora)
Q = torch.linalg.svd(A.T, full_matrices=False)[0] # in x r, orthonormal basis of A's rows (the official basis)
B_tilde = B @ A @ Q                                # B A = B~ Q^T
W = run.model.get_submodule(name).weight.detach().double()
W_emulated = run.factors().W_emulated(name).double()
D = (W - W_emulated) @ Q / s

# SOLUTION clamp
# notebook 04 - defines lam, D, B_tilde, D_clamped for one module; check: check_clamp(D_clamped, D, B_tilde, lam)
import torch

lam = 3.0
module = report["module"].iloc[0]
D, B_tilde = tensors[f"{module}.D"].double(), tensors[f"{module}.B_tilde"].double()
ratio = D.abs().mean(0) / B_tilde.abs().mean(0)    # one ratio per LoRA column
D_clamped = torch.where(ratio > lam, D * lam / ratio, D)

# SOLUTION subject_share
# notebook 08 - defines share; check: check_subject_share(share, results, "transfer_corrected")
import torch
from emloc.denoiser import HELD_OUT_DIGIT, judged, stored_samples

images = stored_samples(results["samples"]["transfer_corrected"])[HELD_OUT_DIGIT]   # (k, 8, 8) in [0, 1]
seen = judged(torch.tensor(images * 2 - 1, dtype=torch.float32).unsqueeze(1))         # the digit the judge sees
share = float((seen == HELD_OUT_DIGIT).mean())
