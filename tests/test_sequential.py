"""Sequential calibration (issue 12, part 2): the reduced-rank regression and the layer-by-layer builds."""
import pytest
import torch

from emloc.lowrank import (damped_gram, least_squares_target, sequential_error, sequential_truncation,
                           whitened_truncation)

F64 = torch.float64


def problem(seed, out_features=6, in_features=5, tokens=20, drift=0.3):
    """``W``, the original's inputs ``X`` and the emulator's ``X~ = X + drift * noise`` (columns are tokens)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g, dtype=F64)
    X = torch.randn(in_features, tokens, generator=g, dtype=F64)
    X_tilde = X + drift * torch.randn(in_features, tokens, generator=g, dtype=F64)
    return W, X, X_tilde


def objective(W, W_emulated, X, X_tilde, delta=0.0):
    """``||W X - W' X~||_F^2 + delta ||W' - W||_F^2`` (the damped objective; ``delta = 0``: the plain one)."""
    return float((W @ X - W_emulated @ X_tilde).norm() ** 2 + delta * (W_emulated - W).norm() ** 2)


def brute_force(W, X, X_tilde, r, restarts=8, seed=0, delta=0.0):
    """The smallest ``||W X - G H X~||^2 + delta ||G H - W||^2`` over rank-``r`` products ``G H``
    (``G: out x r``, ``H: r x in``) found by LBFGS from random starts."""
    g = torch.Generator().manual_seed(seed)
    best = float("inf")
    for _ in range(restarts):
        G = torch.randn(W.shape[0], r, generator=g, dtype=F64).requires_grad_()
        H = torch.randn(r, W.shape[1], generator=g, dtype=F64).requires_grad_()
        optimizer = torch.optim.LBFGS([G, H], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = (W @ X - G @ H @ X_tilde).pow(2).sum() + delta * (G @ H - W).pow(2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            optimizer.step(closure)
        with torch.no_grad():
            best = min(best, objective(W, G @ H, X, X_tilde, delta))
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



def augmented_regression_optimum(W, X, X_tilde, delta, r):
    """The damped objective's minimum over rank-``r`` ``W'``, from first principles (float64): it is
    ``||Y_aug - W' X_aug||^2`` with ``X_aug = [X~, sqrt(delta) I]`` (``in x (T + in)``, full row rank) and
    ``Y_aug = [W X, sqrt(delta) W]``; ``W' X_aug`` ranges over the rank-``r`` matrices in ``X_aug``'s row space,
    so the minimum is the residual of projecting ``Y_aug`` onto that row space plus the tail of the projection's
    singular values (Eckart-Young)."""
    eye = torch.eye(W.shape[1], dtype=F64)
    X_aug = torch.cat([X_tilde, delta ** 0.5 * eye], dim=1)
    Y_aug = torch.cat([W @ X, delta ** 0.5 * W], dim=1)
    Q = torch.linalg.qr(X_aug.T).Q                                      # (T + in, in): X_aug's row space
    Y_row = Y_aug @ Q @ Q.T
    tail = torch.linalg.svdvals(Y_row)[r:]
    return float((Y_aug - Y_row).norm() ** 2 + tail.pow(2).sum())


def previous_damped_truncation(W, C_tilde, P, r, damping):
    """The procedure before issue 24: the ridge solution truncated under ``C~`` instead of ``C~ + delta I``."""
    u, v, _ = whitened_truncation(least_squares_target(W, C_tilde, P, damping), C_tilde, r)
    return u @ v


@pytest.mark.parametrize("seed,tokens,damping", [(0, 3, 0.01), (1, 4, 0.5), (2, 4, 0.01), (3, 3, 0.5),
                                                 (4, 8, 0.01), (5, 8, 0.5)])
def test_damped_truncation_is_the_exact_minimiser_of_the_damped_objective(seed, tokens, damping):
    """``||W X - W' X~||^2 + delta ||W' - W||^2`` over rank-2 ``W'`` (out 6, in 5): ``C~`` singular (3-4
    tokens) or not (8). The closed form equals the augmented reduced-rank regression's optimum, LBFGS from
    many random factor pairs never beats it, and the previous truncation (under ``C~``) is strictly worse."""
    W, X, X_tilde = problem(seed, tokens=tokens)
    C_tilde, P, r = X_tilde @ X_tilde.T, X @ X_tilde.T, 2
    delta = damping * float(C_tilde.diagonal().mean())
    u, v, sigma = sequential_truncation(W, C_tilde, P, r, damping=damping)
    assert u.shape == (6, r) and v.shape == (r, 5)
    ours = objective(W, u @ v, X, X_tilde, delta)
    assert ours == pytest.approx(augmented_regression_optimum(W, X, X_tilde, delta, r), rel=1e-10)
    searched = brute_force(W, X, X_tilde, r, restarts=16, seed=seed, delta=delta)
    assert ours <= searched * (1 + 1e-8) + 1e-10
    assert searched == pytest.approx(ours, rel=1e-6)
    previous = objective(W, previous_damped_truncation(W, C_tilde, P, r, damping), X, X_tilde, delta)
    assert previous > ours * (1 + 1e-6)
    # the spectrum is W_ls's whitened by C~ + delta I: its squares sum to ||W_ls X~||^2 + delta ||W_ls||^2
    W_ls = least_squares_target(W, C_tilde, P, damping)
    assert float(sigma.pow(2).sum()) == pytest.approx(float((W_ls @ X_tilde).norm() ** 2
                                                            + delta * W_ls.norm() ** 2), rel=1e-10)


def test_damped_gram_is_the_gram_matrix_of_the_augmented_inputs():
    W, X, X_tilde = problem(9, tokens=3)
    C_tilde = X_tilde @ X_tilde.T
    delta = 0.2 * float(C_tilde.diagonal().mean())
    X_aug = torch.cat([X_tilde, delta ** 0.5 * torch.eye(5, dtype=F64)], dim=1)
    torch.testing.assert_close(damped_gram(C_tilde, 0.2), X_aug @ X_aug.T)
    assert damped_gram(C_tilde, 0.0) is C_tilde


@pytest.mark.parametrize("seed,tokens", [(10, 3), (11, 20)])
def test_undamped_truncation_is_unchanged(seed, tokens):
    """``damping = 0``: bitwise the formula before issue 24, the truncation of ``W_ls`` under ``C~``."""
    W, X, X_tilde = problem(seed, out_features=8, in_features=6, tokens=tokens)
    C_tilde, P = X_tilde @ X_tilde.T, X @ X_tilde.T
    for r in (1, 3):
        reference = whitened_truncation(least_squares_target(W, C_tilde, P), C_tilde, r)
        for damping in (0, 0.0):
            for ours, theirs in zip(sequential_truncation(W, C_tilde, P, r, damping=damping), reference):
                assert torch.equal(ours, theirs)


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


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_one_layer_first_group_equals_independent_and_later_groups_see_the_built_ones(damping):
    """With one decoder layer, q/k/v (the first group) see X~ = X and match the independent build (with
    damping: the exact damped minimiser, W truncated under C + delta I); o_proj, gate/up and down see the
    layer with the groups before them already compressed."""
    model, features = tiny_llama(seed=1, num_layers=1), calibration_features()
    stats = collect_statistics(model, features, LLAMA_PROJECTIONS, pad_token_id=2, batch_size=4, progress=False)
    independent = build_factors(model, stats, EmulatorConfig(ratio=0.4), progress=False)
    config = EmulatorConfig(ratio=0.4, calibration="sequential", sequential_damping=damping)
    factors, paired = sequential.build_sequential(model, features, config, pad_token_id=2, batch_size=4,
                                                  progress=False, keep_statistics=True)
    linears = target_linears(model, LLAMA_PROJECTIONS)
    assert list(factors.u) == list(independent.u)
    for name in factors.u:
        torch.testing.assert_close(paired.C(name), stats.C(name), rtol=1e-5, atol=1e-5)
        first_group = name.endswith(("q_proj", "k_proj", "v_proj"))
        assert torch.allclose(paired.C_tilde(name), stats.C(name), rtol=1e-5, atol=1e-5) == first_group, name
        if first_group:
            torch.testing.assert_close(paired.P(name), stats.C(name), rtol=1e-5, atol=1e-5)
            if damping == 0:
                expected = independent.W_emulated(name)
            else:
                W, C = linears[name].weight.detach().double(), stats.C(name).double()
                C_damped = C + damping * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=F64)
                u, v, _ = whitened_truncation(W, C_damped, factors.u[name].shape[1])
                expected = (u @ v).float()
            torch.testing.assert_close(factors.W_emulated(name), expected, rtol=1e-4, atol=1e-5)


def test_damped_build_minimises_the_damped_objective_of_every_linear():
    """The in-memory build with the default damping: every W' reaches the exact damped minimum on the
    build's own C, C~, P (up to float32 storage), below the previous truncation under C~."""
    model, features = tiny_llama(seed=4, num_layers=3), calibration_features(8)
    factors, paired = sequential.build_sequential(model, features, SEQUENTIAL, pad_token_id=2, progress=False,
                                                  keep_statistics=True)
    linears, damping = target_linears(model, LLAMA_PROJECTIONS), SEQUENTIAL.sequential_damping
    strictly_better = 0
    for name in factors.u:
        W = linears[name].weight.detach().double()
        C, P, C_tilde = (M(name).double() for M in (paired.C, paired.P, paired.C_tilde))
        delta = damping * float(C_tilde.diagonal().mean())

        def damped(W_emulated):      # ||W X - W' X~||^2 + delta ||W' - W||^2 from C, P, C~
            return float(torch.einsum("oi,ij,oj->", W, C, W) - 2 * torch.einsum("oi,ij,oj->", W, P, W_emulated)
                         + torch.einsum("oi,ij,oj->", W_emulated, C_tilde, W_emulated)
                         + delta * (W_emulated - W).pow(2).sum())
        r = factors.u[name].shape[1]
        u, v, _ = sequential_truncation(W, C_tilde, P, r, damping=damping)
        built, exact = damped(factors.W_emulated(name).double()), damped(u @ v)
        previous = damped(previous_damped_truncation(W, C_tilde, P, r, damping))
        assert built == pytest.approx(exact, rel=1e-6), name
        assert exact <= previous * (1 + 1e-10), name
        strictly_better += exact < previous * (1 - 1e-6)
    assert strictly_better == len(factors.u)          # here every linear: the fix changes each of them


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
