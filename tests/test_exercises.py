"""Exercise checks: each passes a correct answer, fails a wrong one with a hint, and never raises on garbage."""
import math

import nbformat
import numpy as np
import pytest
import torch

from emloc import exercises as ex
from emloc import pipeline
from emloc.correction import clamp_columns, orthonormal_row_basis
from emloc.lowrank import break_even_rank, plain_truncation, rank_from_ratio, relative_error_curve, whitening_factor
from conftest import tiny_run_config

GARBAGE = [None, ..., "seven", [[1, 2], [3]], float("nan"), object(), {"a": 1}]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    run = pipeline.Run(tmp_path_factory.mktemp("exercise-run"), tiny_run_config(tiny_model_dir), progress=False)
    for stage in (pipeline.calibrate, pipeline.build, lambda r: pipeline.train(r, "emulator"), pipeline.correct):
        stage(run)
    return run


def passes(result, capsys=None):
    assert isinstance(result, ex.CheckResult)
    assert result.passed, result.message
    assert result.message.startswith("✅ correct: ") and "\n" not in result.message
    return result


def fails(result, *words):
    """A one-line ❌ with a hint (and the given words somewhere in it)."""
    assert isinstance(result, ex.CheckResult)
    assert not result.passed and not bool(result)
    assert result.message.startswith("❌ ") and "\n" not in result.message, result.message
    assert " - hint: " in result.message or result.message.startswith("❌ cannot check yet"), result.message
    for word in words:
        assert word in result.message, result.message
    return result


def test_check_prints_exactly_its_line(capsys):
    result = ex.check_lora_scaling(2.0, 16, 8)
    assert capsys.readouterr().out == result.message + "\n"


# ---- notebook 01 ----

def test_rank_from_ratio():
    passes(ex.check_rank_from_ratio(lambda rho, o, i: max(1, math.floor(rho * o * i / (o + i)))))
    fails(ex.check_rank_from_ratio(lambda rho, o, i: round(rho * o * i / (o + i))), "round down")
    fails(ex.check_rank_from_ratio(lambda rho, o, i: math.floor(rho * o * i / (o + i))), "at least one direction")
    fails(ex.check_rank_from_ratio(lambda rho, o, i: max(1, math.floor(rho * min(o, i)))), "break-even")
    fails(ex.check_rank_from_ratio(lambda rho, o, i: 1 / 0), "ZeroDivisionError")
    fails(ex.check_rank_from_ratio(lambda rho, o, i: None), "None")
    fails(ex.check_rank_from_ratio(lambda rho, o, i: 144.5), "whole number")
    for garbage in GARBAGE:
        fails(ex.check_rank_from_ratio(garbage))


def test_break_even():
    passes(ex.check_break_even(576 * 1536 / (576 + 1536), 576, 1536))
    passes(ex.check_break_even(math.floor(break_even_rank(576, 1536)), 576, 1536))
    fails(ex.check_break_even(576, 576, 1536), "largest possible rank")
    fails(ex.check_break_even(500, 576, 1536))
    for garbage in GARBAGE:
        fails(ex.check_break_even(garbage, 576, 1536))


def test_error_curve():
    def right(sigma, k):
        energy = sigma ** 2
        return float((energy[k:].sum() / energy.sum()).sqrt())

    passes(ex.check_error_curve(right))
    sigma = torch.rand(40, dtype=torch.float64).sort(descending=True).values
    passes(ex.check_error_curve(right, sigma))
    fails(ex.check_error_curve(lambda s, k: float(s[k:].sum() / s.sum())), "sigma_i^2")
    fails(ex.check_error_curve(lambda s, k: right(s, k) ** 2), "square root")
    fails(ex.check_error_curve(lambda s, k: right(s, k + 1) if k < len(s) else 0.0), "not k+1")
    fails(ex.check_error_curve(lambda s, k: 1 - right(s, k) ** 2), "kept energy")
    fails(ex.check_error_curve(lambda s, k: s[100]), "IndexError")
    for garbage in GARBAGE:
        fails(ex.check_error_curve(garbage))


def test_smallest_rank(tiny_run):
    factors = tiny_run.factors()
    module = factors.report["module"].iloc[0]
    error = relative_error_curve(factors.spectra[module]["whitened"]).numpy()
    target = float(error[3]) + 1e-9
    expected = int(np.argmax(error <= target))
    passes(ex.check_smallest_rank(expected, factors, module, target))
    passes(ex.check_smallest_rank(expected, tiny_run, module, target))  # a Run works too (spectra read from disk)
    fails(ex.check_smallest_rank(expected - 1, factors, module, target), "above")
    fails(ex.check_smallest_rank(expected + 1, factors, module, target), "smaller rank")
    fails(ex.check_smallest_rank(expected, factors, "q_proj", target), "full module name")
    for garbage in GARBAGE:
        fails(ex.check_smallest_rank(garbage, factors, module, target))


# ---- notebook 02 ----

def _weight_and_C(run, name):
    W = run.model.get_submodule(name).weight.detach().double()
    return W, run.stats().C(name).double()


def test_whitened_truncation(tiny_run):
    name = "model.layers.0.mlp.down_proj"
    W, C = _weight_and_C(tiny_run, name)
    r = 8
    U, _, _ = torch.linalg.svd(W @ whitening_factor(C), full_matrices=False)
    student = U[:, :r] @ U[:, :r].T @ W  # the student's own whitening, no library truncation call
    passes(ex.check_whitened_truncation(student, tiny_run, name, r))
    passes(ex.check_whitened_truncation(student.float().numpy(), tiny_run, name, r))
    u, v, _ = plain_truncation(W, r)
    fails(ex.check_whitened_truncation(u @ v, tiny_run, name, r), "plain SVD", "W S")
    fails(ex.check_whitened_truncation(U[:, :r + 4] @ U[:, :r + 4].T @ W, tiny_run, name, r), "rank")
    fails(ex.check_whitened_truncation(student.T, tiny_run, name, r), "transpose")
    fails(ex.check_whitened_truncation(student[:, :5], tiny_run, name, r), "shape")
    fails(ex.check_whitened_truncation(student, tiny_run, "model.layers.0.mlp.nope", r), "not a linear layer")
    for garbage in GARBAGE:
        fails(ex.check_whitened_truncation(garbage, tiny_run, name, r))


def test_compressed_parameters():
    r = rank_from_ratio(0.5, 576, 1536)
    passes(ex.check_compressed_parameters(r * (576 + 1536), 576, 1536, 0.5))
    fails(ex.check_compressed_parameters(576 * 1536, 576, 1536, 0.5), "W's own count")
    fails(ex.check_compressed_parameters(round(0.5 * 576 * 1536), 576, 1536, 0.5), "whole rank")
    for garbage in GARBAGE:
        fails(ex.check_compressed_parameters(garbage, 576, 1536, 0.5))


def test_prediction(tiny_run):
    from emloc.reports import error_curves, errors_at_ratio
    factors = tiny_run.factors()
    table = errors_at_ratio(factors.report, error_curves(factors.spectra), 0.3)
    per_type = table.groupby("type")["error"].mean().sort_values()
    passes(ex.check_prediction(per_type.index[-1], factors, 0.3))
    fails(ex.check_prediction(per_type.index[0], factors, 0.3), "another type loses more")
    fails(ex.check_prediction("attention", factors, 0.3), "one of")
    for garbage in GARBAGE:
        fails(ex.check_prediction(garbage, factors, 0.3))


# ---- notebook 03 ----

def test_lora_scaling():
    passes(ex.check_lora_scaling(2.0, 16, 8))
    passes(ex.check_lora_scaling(torch.tensor(16 / math.sqrt(8)), 16, 8, use_rslora=True))
    fails(ex.check_lora_scaling(0.5, 16, 8), "upside down")
    fails(ex.check_lora_scaling(16 / math.sqrt(8), 16, 8), "rsLoRA")
    for garbage in GARBAGE:
        fails(ex.check_lora_scaling(garbage, 16, 8))


def test_lora_parameters(tiny_run):
    from emloc.calibration import target_linears
    r = tiny_run.config.lora.r
    adapted = target_linears(tiny_run.model, tiny_run.config.emulator.target_modules)  # compressed or left dense
    count = sum(r * (linear.in_features + linear.out_features) for linear in adapted.values())
    passes(ex.check_lora_parameters(count, tiny_run))
    fails(ex.check_lora_parameters(count // r, tiny_run), "rank r")
    fails(ex.check_lora_parameters(count + 1, tiny_run))
    for garbage in GARBAGE:
        fails(ex.check_lora_parameters(garbage, tiny_run))


# ---- notebook 04 ----

def _student_B_tilde_and_D(run, name):
    """B~ and D from the raw adapter and factors, as a student would, with Q from an SVD (another basis)."""
    from safetensors.torch import load_file
    adapter = load_file(run.adapter_dir("emulator") / "adapter_model.safetensors")
    A = next(v for k, v in adapter.items() if name in k and "lora_A" in k).double()
    B = next(v for k, v in adapter.items() if name in k and "lora_B" in k).double()
    factors = run.factors()
    W = run.model.get_submodule(name).weight.detach().double()
    s = run.config.lora.alpha / run.config.lora.r
    _, _, Vh = torch.linalg.svd(A, full_matrices=False)
    Q = Vh.T
    return B @ A @ Q, (W - factors.W_emulated(name).double()) @ Q / s, Q, s


def test_B_tilde_and_D(tiny_run):
    name = "model.layers.1.self_attn.q_proj"
    B_tilde, D, Q, s = _student_B_tilde_and_D(tiny_run, name)
    passes(ex.check_B_tilde_and_D(B_tilde, D, tiny_run, name, Q=Q))
    saved = tiny_run.correction_tensors()
    passes(ex.check_B_tilde_and_D(saved[f"{name}.B_tilde"], saved[f"{name}.D"], tiny_run, name))
    fails(ex.check_B_tilde_and_D(B_tilde, -D, tiny_run, name, Q=Q), "wrong sign")
    fails(ex.check_B_tilde_and_D(B_tilde, D * s, tiny_run, name, Q=Q), "divide by")
    fails(ex.check_B_tilde_and_D(B_tilde, D, tiny_run, name), "pass it as Q")  # their own Q, not passed
    fails(ex.check_B_tilde_and_D(B_tilde.T, D, tiny_run, name, Q=Q), "transpose")
    fails(ex.check_B_tilde_and_D(B_tilde, D, tiny_run, "q_proj", Q=Q), "full module name")
    for garbage in GARBAGE:
        fails(ex.check_B_tilde_and_D(garbage, D, tiny_run, name, Q=Q))
        fails(ex.check_B_tilde_and_D(B_tilde, garbage, tiny_run, name, Q=Q))


def test_clamp():
    generator = torch.Generator().manual_seed(0)
    B_tilde = torch.randn(12, 6, generator=generator, dtype=torch.float64)
    D = torch.randn(12, 6, generator=generator, dtype=torch.float64) * torch.tensor([0.1, 5, 0.5, 9, 1, 20])
    lam = 3.0
    ratio = D.abs().mean(0) / B_tilde.abs().mean(0)
    student = torch.where(ratio > lam, D * lam / ratio, D)
    passes(ex.check_clamp(student, D, B_tilde, lam))
    expected, clamped = clamp_columns(D, B_tilde, lam)
    assert 0 < int(clamped.sum()) < 6  # the case has clamped and untouched columns
    fails(ex.check_clamp(D * lam / ratio, D, B_tilde, lam), "only the columns")
    fails(ex.check_clamp(D, D, B_tilde, lam), "left unscaled")
    for garbage in GARBAGE:
        fails(ex.check_clamp(garbage, D, B_tilde, lam))


def test_every_check_is_listed():
    assert len(ex.CHECKS) >= 10
    assert all(name.startswith("check_") for name in (f.__name__ for f in ex.CHECKS.values()))


# ---- solutions ----

def _exercise_notebook(path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# EXERCISE lora_scaling (in markdown: not an exercise cell)"),
                      nbformat.v4.new_code_cell("# EXERCISE lora_scaling\ns = ...  # your code here"),
                      nbformat.v4.new_code_cell("from emloc.exercises import check_lora_scaling\n"
                                                "assert not check_lora_scaling(..., 16, 8) or True\ncheck_lora_scaling(s, 16, 8)")]
    notebook.cells[1].outputs = [nbformat.v4.new_output("stream", text="old output")]
    nbformat.write(notebook, path)
    return path


def test_solve_notebook_replaces_only_exercise_cells(tmp_path):
    solutions = tmp_path / "solutions.py"
    solutions.write_text("# SOLUTION lora_scaling\ns = 16 / 8\n\n# SOLUTION other\nx = 1\n")
    source = _exercise_notebook(tmp_path / "nb.ipynb")
    (solved_path,) = ex.solve_files([source], tmp_path / "solved", solutions)
    solved = nbformat.read(solved_path, as_version=4)
    original = nbformat.read(source, as_version=4)
    assert ex.exercise_ids(solved) == ["lora_scaling"]
    assert solved.cells[1].source == "# EXERCISE lora_scaling\ns = 16 / 8"
    assert solved.cells[1].outputs == []
    assert solved.cells[0].source == original.cells[0].source and solved.cells[2].source == original.cells[2].source
    namespace = {}
    exec(solved.cells[1].source, namespace)
    assert ex.check_lora_scaling(namespace["s"], 16, 8)
    exec(original.cells[1].source, namespace)
    assert not ex.check_lora_scaling(namespace["s"], 16, 8)  # the placeholder fails its check


def test_solve_refuses_missing_and_duplicate_solutions(tmp_path):
    source = _exercise_notebook(tmp_path / "nb.ipynb")
    other = tmp_path / "other.py"
    other.write_text("# SOLUTION other\nx = 1\n")
    with pytest.raises(ex.EmlocError, match="has no solution"):
        ex.solve_files([source], tmp_path / "solved", other)
    twice = tmp_path / "twice.py"
    twice.write_text("# SOLUTION a\nx = 1\n# SOLUTION a\nx = 2\n")
    with pytest.raises(ex.EmlocError, match="two solutions"):
        ex.read_solutions(twice)
    assert ex.main(["solve", str(source), "--out", str(tmp_path / "x"), "--solutions", str(other)]) == 2


def test_shipped_solutions_cover_every_check():
    solutions = ex.read_solutions()
    assert set(ex.CHECKS) <= set(solutions)


def _notebook_namespace(run, notebook: str) -> dict:
    """What notebooks 01-04 define before their exercises (the names the solutions may use)."""
    import widgets
    factors = run.factors()
    namespace = {"run": run, "factors": factors, "report": factors.report}
    if notebook == "01":
        namespace["explorer"] = widgets.spectrum_explorer(factors)
    if notebook == "04":
        namespace.update(report=run.correction_report(), tensors=run.correction_tensors())
    return namespace


@pytest.fixture(scope="module")
def tiny_denoiser_run(tmp_path_factory):
    """A finished DreamBooth run on the tiny denoiser (notebook 08's exercises read its results)."""
    from emloc import pipeline
    from emloc.config import RunConfig
    run = pipeline.Run(tmp_path_factory.mktemp("dreambooth"), RunConfig.from_dict({"model": "digits-dit-tiny"}),
                       progress=False)
    pipeline.run_pipeline(run)
    return run


@pytest.mark.parametrize("exercise_id", sorted(ex.read_solutions()))
def test_shipped_solution_passes_its_check_on_a_tiny_run(exercise_id, tiny_run, capsys, request):
    """Each solution block, run where its notebook would run it, passes the check call its header names."""
    code = ex.read_solutions()[exercise_id]
    header = code.lstrip().splitlines()[0]
    notebook, call = header.split("notebook ")[1][:2], header.split("check: ")[1]
    if notebook == "08":  # the diffusion notebook: a denoiser run's results
        run = request.getfixturevalue("tiny_denoiser_run")
        namespace = {"run": run, "results": run.results()}
    else:
        namespace = _notebook_namespace(tiny_run, notebook)
    exec(code, namespace)
    exec(f"from emloc.exercises import *\nresult = {call}", namespace)
    passes(namespace["result"])
