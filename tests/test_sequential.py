"""Sequential calibration (issue 12, part 2): the reduced-rank regression and the layer-by-layer builds."""
import pytest
import torch

from emloc.lowrank import (least_squares_target, sequential_error, sequential_truncation,
                           whitened_truncation)

F64 = torch.float64


def problem(seed, out_features=6, in_features=5, tokens=20, drift=0.3):
    """``W``, the original's inputs ``X`` and the emulator's ``X~ = X + drift * noise`` (columns are tokens)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g, dtype=F64)
    X = torch.randn(in_features, tokens, generator=g, dtype=F64)
    X_tilde = X + drift * torch.randn(in_features, tokens, generator=g, dtype=F64)
    return W, X, X_tilde


def objective(W, W_emulated, X, X_tilde):
    return float((W @ X - W_emulated @ X_tilde).norm() ** 2)


def brute_force(W, X, X_tilde, r, restarts=8, seed=0):
    """The smallest ``||W X - G H X~||^2`` over rank-``r`` products found by LBFGS from random starts."""
    g = torch.Generator().manual_seed(seed)
    best = float("inf")
    for _ in range(restarts):
        G = torch.randn(W.shape[0], r, generator=g, dtype=F64).requires_grad_()
        H = torch.randn(r, W.shape[1], generator=g, dtype=F64).requires_grad_()
        optimizer = torch.optim.LBFGS([G, H], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (W @ X - G @ H @ X_tilde).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            optimizer.step(closure)
        with torch.no_grad():
            best = min(best, objective(W, G @ H, X, X_tilde))
    return best


@pytest.mark.parametrize("seed,r,tokens", [(0, 1, 20), (1, 2, 20), (2, 3, 20), (3, 2, 4), (4, 1, 3)])
def test_closed_form_is_never_beaten_and_matches_brute_force(seed, r, tokens):
    W, X, X_tilde = problem(seed, tokens=tokens)
    u, v, _ = sequential_truncation(W, X_tilde @ X_tilde.T, X @ X_tilde.T, r)
    closed = objective(W, u @ v, X, X_tilde)
    searched = brute_force(W, X, X_tilde, r)
    assert closed <= searched * (1 + 1e-8) + 1e-10
    assert searched == pytest.approx(closed, rel=1e-6, abs=1e-9)
    assert u.shape == (W.shape[0], r) and v.shape == (r, W.shape[1])


def test_error_splits_into_regression_and_truncation_parts():
    W, X, X_tilde = problem(5, out_features=7, in_features=6, tokens=30)
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    W_ls = least_squares_target(W, C_tilde, P)
    torch.testing.assert_close(W_ls @ C_tilde, W @ P)                    # the normal equations
    u, v, _ = sequential_truncation(W, C_tilde, P, 2)
    total = objective(W, u @ v, X, X_tilde)
    parts = objective(W, W_ls, X, X_tilde) + float(((W_ls - u @ v) @ X_tilde).norm() ** 2)
    assert total == pytest.approx(parts, rel=1e-10)
    relative = sequential_error(W, u @ v, X @ X.T, P, C_tilde)
    assert relative == pytest.approx((total / float((W @ X).norm() ** 2)) ** 0.5, rel=1e-8)


def test_same_inputs_reproduce_the_activation_aware_truncation_exactly():
    W, X, _ = problem(6, out_features=8, in_features=5, tokens=3)     # C singular: 3 tokens, 5 features
    C = X @ X.T
    assert torch.equal(least_squares_target(W, C, C), W)
    for r in (1, 2, 4):
        for ours, reference in zip(sequential_truncation(W, C, C, r), whitened_truncation(W, C, r)):
            assert torch.equal(ours, reference)


def test_rank_deficient_emulator_inputs_keep_W_outside_their_span():
    W, X, X_tilde = problem(7, out_features=6, in_features=8, tokens=4)  # C~ has rank 4 of 8
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    W_ls = least_squares_target(W, C_tilde, P)
    null = torch.linalg.svd(X_tilde.T)[2][4:].T                       # (in, 4): directions X~ never takes
    torch.testing.assert_close((W_ls - W) @ null, torch.zeros(6, 4, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(W_ls @ C_tilde, W @ P)
    u, v, _ = sequential_truncation(W, C_tilde, P, 2)
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    assert objective(W, u @ v, X, X_tilde) <= brute_force(W, X, X_tilde, 2) * (1 + 1e-8) + 1e-10


def test_damping_solves_the_ridge_problem_and_pulls_towards_W():
    W, X, X_tilde = problem(8, out_features=6, in_features=5, tokens=12)
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    delta = 0.1 * float(C_tilde.diagonal().mean())
    W_ridge = least_squares_target(W, C_tilde, P, damping=0.1)
    torch.testing.assert_close(W_ridge @ (C_tilde + delta * torch.eye(5, dtype=F64)), W @ P + delta * W)
    ridge = lambda M: objective(W, M, X, X_tilde) + delta * float((M - W).norm() ** 2)
    W_plain = least_squares_target(W, C_tilde, P)
    assert ridge(W_ridge) < min(ridge(W), ridge(W_plain))                 # the ridge optimum beats both ends
    moves = [float((least_squares_target(W, C_tilde, P, damping=d) - W).norm()) for d in (0.0, 0.01, 0.1, 1.0, 1e6)]
    assert all(a > b for a, b in zip(moves, moves[1:])) and moves[-1] < 1e-4 * float(W.norm())
    assert torch.equal(least_squares_target(W, C_tilde, C_tilde, damping=0.1), W)


# --- the layer-by-layer builds on tiny models ------------------------------------------------------

from emloc import sequential, streaming                                          # noqa: E402
from emloc.calibration import collect_statistics, target_linears                  # noqa: E402
from emloc.config import LLAMA_PROJECTIONS, EmulatorConfig                        # noqa: E402
from emloc.svd_emulator import build_factors, emulate                                 # noqa: E402
from emloc.models import tiny_llama, torch_threads                               # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def calibration_features(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 1000, (int(torch.randint(5, 14, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]


SEQUENTIAL = EmulatorConfig(ratio=0.4, calibration="sequential")


def test_one_layer_first_group_equals_independent_and_later_groups_see_the_built_ones():
    """With one decoder layer, q/k/v (the first group) see X~ = X and match the independent build; o_proj,
    gate/up and down see the layer with the groups before them already compressed."""
    model, features = tiny_llama(seed=1, num_layers=1), calibration_features()
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, pad_token_id=2, batch_size=4, progress=False)
    independent = build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False)
    factors, paired = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, batch_size=4,
                                                  progress=False, keep_statistics=True)
    assert list(factors.u) == list(independent.u)
    for name in factors.u:
        torch.testing.assert_close(paired.C(name), stats.C(name), rtol=1e-5, atol=1e-5)
        first_group = name.endswith(("q_proj", "k_proj", "v_proj"))
        assert torch.allclose(paired.C_tilde(name), stats.C(name), rtol=1e-5, atol=1e-5) == first_group, name
        if first_group:
            torch.testing.assert_close(paired.P(name), stats.C(name), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(factors.W_emulated(name), independent.W_emulated(name), rtol=1e-4, atol=1e-5)


def test_sequential_build_leaves_the_model_alone_and_keeps_the_original_stream():
    model, features = tiny_llama(seed=2, num_layers=3), calibration_features()
    before = {name: p.clone() for name, p in model.named_parameters()}
    factors, paired = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, progress=False,
                                                  keep_statistics=True)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(type(m) is torch.nn.Linear for m in target_linears(model, LLAMA_PROJECTIONS).values())
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    assert paired.input_of == stats.input_of and paired.token_counts == stats.token_counts
    for leader, C in stats.covariances.items():                 # the original's C, as the independent calibration
        torch.testing.assert_close(paired.covariances[leader], C, rtol=1e-5, atol=1e-4)
    # later layers see the emulator's inputs, which differ from the original's
    assert not torch.allclose(paired.emulated["model.layers.2.self_attn.q_proj"],
                              stats.covariances["model.layers.2.self_attn.q_proj"], rtol=1e-3)
    assert "model.layers.2.mlp.down_proj" not in factors.u and len(factors.u) == 3 * 7 - 1


def test_sequential_error_is_at_most_independent_on_the_emulator_inputs():
    """On the inputs the sequential emulator feeds each layer, its W' beats the independent W' for
    ||W X - W' X~||, the objective it minimises."""
    from emloc.lowrank import sequential_error as error
    model, features = tiny_llama(seed=4, num_layers=3), calibration_features(8)
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    independent = build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False)
    factors, paired = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, progress=False,
                                                  keep_statistics=True)
    linears = target_linears(model, LLAMA_PROJECTIONS)
    strictly_better = 0
    for name in factors.u:
        W = linears[name].weight.detach().double()
        C, P, C_tilde = (M(name).double() for M in (paired.C, paired.P, paired.C_tilde))
        ours = error(W, factors.W_emulated(name).double(), C, P, C_tilde)
        theirs = error(W, independent.W_emulated(name).double(), C, P, C_tilde)
        assert ours <= theirs * (1 + 1e-5) + 1e-7, name
        strictly_better += ours < theirs * (1 - 1e-3)
        assert float(factors.report.set_index("module").loc[name, "calibration_error"]) == pytest.approx(ours, rel=1e-4)
    assert strictly_better >= 7            # layers 1 and 2 see different inputs: a real improvement there


def test_sequential_emulator_is_closer_to_the_original_at_the_output():
    model, features = tiny_llama(seed=5, num_layers=3), calibration_features(8)
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, pad_token_id=2, progress=False)
    independent = emulate(model, build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False))
    factors, _ = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, progress=False)
    ids = torch.tensor([f["input_ids"][:5] for f in features])
    with torch.no_grad():
        reference = model.model(input_ids=ids).last_hidden_state
        gap = lambda emulator: float((emulator.model(input_ids=ids).last_hidden_state - reference).norm())
        assert gap(emulate(model, factors)) < gap(independent)


def test_streamed_and_in_memory_sequential_builds_are_equal(tmp_path):
    folder = tmp_path / "tiny"
    model = tiny_llama(seed=3, num_layers=3, hidden_size=64, intermediate_size=160)
    model.save_pretrained(folder, max_shard_size="3MB")
    features = calibration_features(7)
    in_memory, paired = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, batch_size=4,
                                                    progress=False, keep_statistics=True)
    parts = tmp_path / "parts"
    parts.mkdir()
    streamed = streaming.stream_layers(folder, features, SEQUENTIAL, pad_token_id=2, parts_dir=parts, batch_size=4,
                                       keep_statistics=True, progress=False)
    from emloc import io
    tensors = {}
    for path in sorted(parts.glob("layer_*.safetensors")):
        tensors.update(io.read_tensors(path))
    assert sorted(tensors) == sorted(f"{name}.{k}" for name in in_memory.u for k in "uv")
    for name in in_memory.u:
        torch.testing.assert_close(tensors[f"{name}.u"] @ tensors[f"{name}.v"], in_memory.W_emulated(name),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(streamed.spectra[name]["whitened"], in_memory.spectra[name]["whitened"],
                                   rtol=1e-5, atol=1e-6)
    assert list(streamed.report["module"]) == list(in_memory.report["module"])
    torch.testing.assert_close(torch.tensor(streamed.report["calibration_error"].to_numpy()),
                               torch.tensor(in_memory.report["calibration_error"].to_numpy()), rtol=1e-5, atol=1e-7)
    for leader, C in paired.covariances.items():
        torch.testing.assert_close(streamed.stats.covariances[leader], C, rtol=1e-5, atol=1e-5)
