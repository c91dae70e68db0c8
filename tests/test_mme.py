"""The mixed-model-equations solver (crossed and nested random terms) equals the dense path.

Every REML quantity (log-likelihood, gradient, AI matrix, BLUE, BLUP, derivatives in y and X)
to 1e-8 relative on random crossed, nested and crossed-with-slopes models small enough for
dense, at random points, near a zero variance and at a singular G; dense Z tensors become
block designs; R's fit of a crossed model; dispatch.
"""

import pytest
import torch

from covmodules import (BlockDesignMatrix, DesignMatrix, DiagonalMatrix, EqualEntryMatrix,
                        FixedMatrix, Grouped, AR1Matrix, IdentityMatrix, KroneckerProduct,
                        MixedModel, ScalarMatrix, UnconstrainedMatrix, fit)
from covmodules.linalg import SOLVERS, UnsupportedStructure, applicable_solvers, select_solver
from covmodules.structures.block_design import block_pattern
from covmodules.testing import check_solver

from oracle import build

DTYPE = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def data(n, seed=0):
    g = gen(seed)
    x = torch.randn(n, generator=g, dtype=DTYPE)
    return (torch.randn(n, generator=g, dtype=DTYPE),
            torch.stack([torch.ones(n, dtype=DTYPE), x], 1))


def slope_term(codes, t, levels, S=None):
    values = torch.stack([torch.ones_like(t), t], 1)
    G = KroneckerProduct(IdentityMatrix(levels), UnconstrainedMatrix(2) if S is None else S)
    return BlockDesignMatrix(codes, values, levels), G


def intercept_term(codes, levels):
    return DesignMatrix(codes.tolist(), levels=list(range(levels))), ScalarMatrix(levels)


def crossed_model(n=150, residual="scalar", seed=1):
    """``(1 + t | a) + (1 | b) + (1 + t | c)``: three crossed factors of 17, 7 and 3 levels."""
    g = gen(seed)
    a, b, c = (torch.randint(0, m, (n,), generator=g) for m in (17, 7, 3))
    t = torch.randn(n, generator=g, dtype=DTYPE)
    R = ScalarMatrix(n) if residual == "scalar" else DiagonalMatrix(n)
    return MixedModel(random={"a": slope_term(a, t, 17), "b": intercept_term(b, 7),
                              "c": slope_term(c, t, 3)}, residual=R)


def nested_model(n=120, seed=2):
    """``(1 | a / b)``: 6 levels of a, each with 4 levels of b (``a:b``), plus ``(1 | d)``."""
    g = gen(seed)
    a = torch.randint(0, 6, (n,), generator=g)
    ab = a * 4 + torch.randint(0, 4, (n,), generator=g)
    d = torch.randint(0, 5, (n,), generator=g)
    return MixedModel(random={"a:b": intercept_term(ab, 24), "a": intercept_term(a, 6),
                              "d": intercept_term(d, 5)}, residual=ScalarMatrix(n))


MODELS = {
    "crossed, slopes, scalar residual": lambda: crossed_model(),
    "crossed, slopes, diagonal residual": lambda: crossed_model(residual="diagonal"),
    "nested and crossed": lambda: nested_model(),
}


#: the mme solver, and the same equations on sufficient statistics (R = σ² I only)
ON_ROWS_AND_SUMS = pytest.mark.parametrize("solver", ["mme", "sufficient"])


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("key", list(MODELS))
@ON_ROWS_AND_SUMS
def test_mme_equals_dense(key, method, solver):
    if solver == "sufficient" and "diagonal" in key:
        pytest.skip("sufficient statistics need R = σ² I")
    model = MODELS[key]()
    y, X = data(model.shape[0])
    check_solver(model, y, X, solver, method=method)


@pytest.mark.parametrize("seed", [3, 4])
@ON_ROWS_AND_SUMS
def test_mme_equals_dense_at_other_points(seed, solver):
    model = crossed_model()
    y, X = data(model.shape[0], seed=seed)
    free = torch.randn(model.num_free_params, generator=gen(seed), dtype=DTYPE)
    check_solver(model, y, X, solver, free=free)


@ON_ROWS_AND_SUMS
def test_mme_near_a_zero_variance(solver):
    model = crossed_model()
    y, X = data(model.shape[0])
    free = 0.5 * torch.randn(model.num_free_params, generator=gen(7), dtype=DTYPE)
    free[model.free_param_names.index("b/sigma^2")] = -14.0          # e^-28 ~ 7e-13
    check_solver(model, y, X, solver, free=free)


@pytest.mark.parametrize("shift", [1e4, -1e5])
def test_sufficient_statistics_keep_their_digits_for_a_response_far_from_zero(shift):
    """``y`` far from zero: the sums are of the OLS residuals, so ``yᵀy`` cancels nothing."""
    model = crossed_model()
    y, X = data(model.shape[0])
    check_solver(model, y + shift, X, "sufficient")


def test_sufficient_statistics_refuse_a_residual_other_than_sigma2_i():
    with pytest.raises(ValueError, match="σ² I"):
        select_solver(crossed_model(residual="diagonal"), "sufficient")
    assert "sufficient" not in [s.name for s in applicable_solvers(crossed_model())]


@ON_ROWS_AND_SUMS
def test_mme_at_a_singular_g(solver):
    """``S`` of rank one (EqualEntryMatrix): ``L`` is raised to an invertible root below
    rounding and the gradient is still the dense one."""
    g = gen(5)
    n = 90
    a, b = torch.randint(0, 12, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    t = torch.randn(n, generator=g, dtype=DTYPE)
    model = MixedModel(random={"a": slope_term(a, t, 12, EqualEntryMatrix(2)),
                               "b": intercept_term(b, 5)}, residual=ScalarMatrix(n))
    y, X = data(n)
    check_solver(model, y, X, solver)


@ON_ROWS_AND_SUMS
def test_levels_without_rows_and_rows_without_values(solver):
    """A level no row has (its block of M is I) and rows whose term values are zero."""
    g = gen(6)
    n = 80
    a, b = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    t = torch.randn(n, generator=g, dtype=DTYPE) * (torch.arange(n) % 3 != 0)
    values = torch.stack([t, t ** 2], 1)
    model = MixedModel(random={
        "a": (BlockDesignMatrix(a, values, 10),
              KroneckerProduct(IdentityMatrix(10), UnconstrainedMatrix(2))),
        "b": intercept_term(b, 4)}, residual=ScalarMatrix(n))
    y, X = data(n)
    check_solver(model, y, X, solver)


def _pattern_by_rows(Z, k):
    """``block_pattern``'s answer read row by row (the reference)."""
    levels, values = [], []
    for row in Z:
        blocks = {int(j) // k for j in torch.nonzero(row)[:, 0]}
        if len(blocks) > 1:
            return None
        b = blocks.pop() if blocks else -1
        levels.append(b)
        values.append(row[max(b, 0) * k:max(b, 0) * k + k] * (b >= 0))
    return torch.tensor(levels), torch.stack(values)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_block_pattern_equals_a_row_by_row_reading(k, seed):
    """Empty rows, zero values inside a block, tiny and huge values, -0.0, a stray entry."""
    g = gen(seed)
    n, L = 50, 9
    codes = torch.randint(0, L, (n,), generator=g)
    values = torch.randn(n, k, generator=g, dtype=DTYPE) * 10.0 ** torch.randint(
        -300, 300, (n, k), generator=g).to(DTYPE)
    values[torch.rand(n, k, generator=g) < 0.2] = 0.0            # zeros inside blocks
    values[torch.rand(n, generator=g) < 0.15] = 0.0                # empty rows
    values[torch.rand(n, k, generator=g) < 0.1] = -0.0
    Z = torch.zeros(n, L * k, dtype=DTYPE)
    for a in range(k):
        Z[torch.arange(n), codes * k + a] = values[:, a]
    cases = [Z]
    if seed % 2:
        stray = Z.clone()
        stray[int(seed), int((codes[seed] + 1) % L) * k] = 1e-300   # outside its block
        cases.append(stray)
    for case in cases:
        ours, ref = block_pattern(case, k), _pattern_by_rows(case, k)
        if ref is None:
            assert ours is None
            continue
        assert torch.equal(ours[0], ref[0])
        assert torch.equal(ours[1], ref[1])


def test_dense_z_of_block_pattern_becomes_a_block_design():
    g = gen(8)
    n, L = 40, 6
    codes = torch.randint(0, L, (n,), generator=g)
    t = torch.randn(n, generator=g, dtype=DTYPE)
    Z = torch.zeros(n, 2 * L, dtype=DTYPE)
    Z[torch.arange(n), 2 * codes], Z[torch.arange(n), 2 * codes + 1] = 1.0, t
    G = KroneckerProduct(IdentityMatrix(L), UnconstrainedMatrix(2))
    model = MixedModel(random={"g": (Z, G)}, residual=ScalarMatrix(n))
    design = model.designs["g"]
    assert isinstance(design, BlockDesignMatrix) and design.k == 2
    torch.testing.assert_close(model.design("g"), Z, rtol=0, atol=0)
    other = Z.clone()
    other[0, 2 * ((codes[0] + 1) % L)] = 1.0                      # a row in two blocks
    kept = MixedModel(random={"g": (other, KroneckerProduct(IdentityMatrix(L),
                                                            UnconstrainedMatrix(2)))},
                      residual=ScalarMatrix(n))
    assert isinstance(kept.designs["g"], FixedMatrix)
    negated = -Z                                    # -0.0 outside every row's block
    assert torch.equal(block_pattern(negated, 2)[0], codes)
    torch.testing.assert_close(block_pattern(negated, 2)[1], -block_pattern(Z, 2)[1])
    y, X = data(n)
    check_solver(model, y, X, "mme")


def test_mme_fit_of_penicillin_matches_lme4():
    """lme4's ``diameter ~ 1 + (1 | plate) + (1 | sample)`` (crossed), fitted by AI-REML on
    the mixed-model equations."""
    model, y, X, names, spec = build("d")
    result = fit(model, y, X, x_names=names, solver="mme")
    assert result.solver == "mme" and result.converged
    assert abs(result.loglik - spec["logLik_REML"]) < 1e-6


def test_dispatch_picks_mme_for_many_crossed_levels_and_keeps_grouped_for_small_models():
    g = gen(9)
    n = 400
    a, b = torch.randint(0, 120, (n,), generator=g), torch.randint(0, 80, (n,), generator=g)
    model = MixedModel(random={"a": intercept_term(a, 120), "b": intercept_term(b, 80)},
                       residual=ScalarMatrix(n))
    assert select_solver(model).name == "mme"
    sleepstudy, *_ = build("a")
    assert select_solver(sleepstudy).name == "grouped"


def test_mme_refuses_what_it_cannot_factor():
    n = 24
    codes = torch.arange(n) // 4
    grouped_residual = MixedModel(random={"g": intercept_term(codes, 6)},
                                  residual=Grouped(AR1Matrix(4), groups=codes,
                                                   positions=torch.arange(n) % 4))
    with pytest.raises(UnsupportedStructure, match="residual must be diagonal"):
        SOLVERS["mme"](grouped_residual)
    kinship = MixedModel(random={"g": (torch.eye(n, dtype=DTYPE)[:, :6],
                                       FixedMatrix(torch.eye(6, dtype=DTYPE) + 0.5))},
                         residual=ScalarMatrix(n))
    with pytest.raises(UnsupportedStructure, match="not I ⊗ S"):
        SOLVERS["mme"](kinship)


def test_dense_z_with_nan_is_refused_naming_the_term():
    Z = torch.eye(4, dtype=DTYPE)
    Z[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Z of random term 'g' contains NaN"):
        MixedModel(random={"g": (Z, ScalarMatrix(4))}, residual=ScalarMatrix(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mme_on_cuda_matches_cpu():
    results = []
    for device in ("cpu", "cuda"):
        model = crossed_model().to(device)
        y, X = (t.to(device) for t in data(model.shape[0]))
        free = 0.5 * torch.randn(model.num_free_params, generator=gen(7), dtype=DTYPE)
        solver = select_solver(model, "mme")
        state = solver.state(free.to(device), y, X, "reml")
        results.append([state.neg_loglik, solver.gradient(free.to(device), state),
                        solver.average_information(free.to(device), state)])
    for cpu, cuda in zip(*results):
        assert cuda.is_cuda
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-8, atol=1e-10)
