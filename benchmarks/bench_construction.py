"""Emulator construction: our implementation vs the official per-linear algorithm, same model and statistics.

Official (per linear, as in the paper's code): eigh of C, SVD of W S, truncate, multiply by S^-1.
Ours: the inverse-free form, eigh of W C W^T (out x out) when out < in, else SVD of W S with S shared
by the linears that read the same input (q/k/v, gate/up). Both in float64 (the default compute dtype).
Three timings: ours "pure" (only the factors), ours "build_factors" (what `emloc build` runs: factors
plus the plain-SVD spectrum and per-layer error report), official (only W').

    python benchmarks/bench_construction.py
"""
import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, prepared_run, threads  # noqa: E402

from emloc.calibration import target_linears  # noqa: E402
from emloc.svd_emulator import _factorise, build_factors  # noqa: E402
from emloc.targets import layer_index  # noqa: E402
from emloc.lowrank import calibration_error, official_whitened_truncation, rank_from_ratio  # noqa: E402


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def ours_pure(linears, stats, ratio):
    cache, out = {}, {}
    for name, linear in linears.items():
        W, C = linear.weight.detach().double(), stats.C(name).double()
        r = rank_from_ratio(ratio, *W.shape)
        u, v, _ = _factorise(W, C, cache, stats.input_of[name], r, "activation_aware")
        out[name] = (u, v)
        if len(cache) > 1:
            cache.pop(next(iter(cache)))
    return out


def official(linears, stats, ratio):
    return {name: official_whitened_truncation(linear.weight.detach().double(), stats.C(name).double(),
                                               rank_from_ratio(ratio, *linear.weight.shape))
            for name, linear in linears.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=10, help="time the linears of the first N decoder layers (0: all)")
    args = parser.parse_args()
    n_threads = threads()
    run = prepared_run(("calibrate",))
    stats, model, ratio = run.stats(), run.model, run.config.emulator.ratio
    linears = target_linears(model, run.config.emulator.target_modules)
    if args.layers:
        linears = {n: m for n, m in linears.items() if layer_index(n) < args.layers}
    config = dataclasses.replace(run.config.emulator, target_modules=[re.escape(n) for n in linears])
    pure, t_pure = timed(lambda: ours_pure(linears, stats, ratio))
    _, t_build = timed(lambda: build_factors(model, stats, config, progress=False))
    reference, t_official = timed(lambda: official(linears, stats, ratio))
    # same objective: relative calibration error ||(W - W') X|| / ||W X|| of both (C is singular with few
    # calibration tokens, so the official S^-1 step differs outside the calibration inputs' span)
    errors = {name: [calibration_error(linears[n].weight.detach().double(), w_prime, stats.C(n).double())
                     for n, w_prime in ((n, f(n)) for n in linears)]
              for name, f in (("ours", lambda n: pure[n][0] @ pure[n][1]), ("official", lambda n: reference[n]))}
    result = {"layers": args.layers or "all", "linears": len(linears), "distinct_inputs": len(stats.covariances), "n_calibration": stats.n_samples,
              "threads": n_threads, "ours_pure_s": t_pure, "ours_build_factors_s": t_build, "official_s": t_official,
              "speedup_pure": t_official / t_pure, "speedup_build_factors": t_official / t_build,
              "mean_calibration_error_ours": sum(errors["ours"]) / len(linears),
              "mean_calibration_error_official": sum(errors["official"]) / len(linears),
              "max_calibration_error_excess_ours": max(a - b for a, b in zip(errors["ours"], errors["official"]))}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "construction.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
