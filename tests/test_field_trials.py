"""Field trials: the Kronecker path with two and three factors, its reuse of eigenvectors,
and missing plots, each equal to the dense path to 1e-8."""

import warnings

import pytest
import torch

from covmodules import (AR1Matrix, CompoundSymmetricMatrix, CovariancePropagation,
                        IdentityMatrix, KroneckerProduct, ScalarMatrix, Sum, UnconstrainedMatrix)
from covmodules.linalg import DenseSolver, KroneckerSolver, identify
from covmodules.linalg.kronecker import kron_matmul, mode_products

from test_solvers import KRONECKER_MODELS, assert_rel, check_equals_dense, data, gen, randn

DTYPE = torch.float64


def identified(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identify(model)
    return model


THREE_FACTORS = {
    "ar1 x (cs x ar1) + nugget": lambda: Sum(field=KroneckerProduct(
        row=AR1Matrix(4), rest=KroneckerProduct(rep=CompoundSymmetricMatrix(3),
                                                col=AR1Matrix(2))), nugget=ScalarMatrix(24)),
    "(ar1 x us) x identity": lambda: KroneckerProduct(
        KroneckerProduct(AR1Matrix(4), UnconstrainedMatrix(3)), IdentityMatrix(2)),
    "ar1 x (ar1 x (ar1 x cs)) + identity": lambda: Sum(KroneckerProduct(
        AR1Matrix(2), KroneckerProduct(AR1Matrix(3), KroneckerProduct(
            AR1Matrix(2), CompoundSymmetricMatrix(2)))), IdentityMatrix(24)),
}


@pytest.mark.parametrize("key", list(THREE_FACTORS))
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_three_or_more_factors_equal_dense(key, method):
    model = identified(THREE_FACTORS[key]())
    assert len(model.kronecker_view().sizes) >= 3
    y, X = data(24)
    check_equals_dense(model, y, X, "kronecker", method=method)


@pytest.mark.parametrize("key", list(THREE_FACTORS) + list(KRONECKER_MODELS))
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_gradient_after_the_ai_matrix_equals_dense(key, method):
    """After the AI matrix the gradient comes from its eigenbasis derivatives
    (``Q_iᵀ ∂A_i Q_i``) instead of the factors' ``_vjp``: both equal the dense path."""
    model = identified({**THREE_FACTORS, **KRONECKER_MODELS}[key]())
    y, X = data(model.shape[0])
    solver, dense = KroneckerSolver(model), DenseSolver(model)
    free = 0.5 * randn(model.num_free_params, g=gen(3))
    s, d = solver.state(free, y, X, method), dense.state(free, y, X, method)
    assert_rel(solver.average_information(free, s), dense.average_information(free, d),
               "AI matrix")
    assert s.factor.derivatives is not None
    assert_rel(solver.gradient(free, s), dense.gradient(free, d), "gradient")


def test_kron_matmul_equals_dense_kronecker_product():
    g = gen(1)
    for sizes in [(3, 4), (2, 3, 4), (5,), (2, 1, 3, 2)]:
        Qs = [randn(n, n, g=g) for n in sizes]
        dense = Qs[0]
        for Q in Qs[1:]:
            dense = torch.kron(dense, Q)
        for k in (1, 3):
            B = randn(dense.shape[0], k, g=g)
            assert_rel(kron_matmul(Qs, B), dense @ B, f"kron_matmul {sizes}, k = {k}")


def test_mode_products_equal_dense_kronecker_products():
    g = gen(4)
    for sizes in [(3, 4), (2, 3, 4), (5,), (2, 1, 3)]:
        T = randn(*sizes, g=g)
        for i, n in enumerate(sizes):
            M = randn(2, n, n, g=g)
            for j in range(2):
                dense = torch.ones(1, 1, dtype=DTYPE)
                for a, size in enumerate(sizes):
                    dense = torch.kron(dense, M[j] if a == i else torch.eye(size, dtype=DTYPE))
                assert_rel(mode_products(M, T, i)[j], dense @ T.reshape(-1),
                           f"mode_products {sizes}, axis {i}")


def test_variance_moves_reuse_eigenvectors_and_equal_dense():
    """A move of variances alone keeps the eigenvectors and the rotated data; every quantity
    still equals a fresh dense evaluation."""
    model = identified(THREE_FACTORS["ar1 x (cs x ar1) + nugget"]())
    y, X = data(24)
    solver, dense = KroneckerSolver(model), DenseSolver(model)
    free = 0.5 * randn(model.num_free_params, g=gen(2))
    first = solver.state(free, y, X, "reml")
    names = model.free_param_names
    for step in (0.7, -1.3):
        moved = free.clone()
        for k, name in enumerate(names):
            if name.endswith("sigma^2"):
                moved[k] += step
        s, d = solver.state(moved, y, X, "reml"), dense.state(moved, y, X, "reml")
        assert all(a is b for a, b in zip(s.factor.Qs, first.factor.Qs))
        assert_rel(s.neg_loglik, d.neg_loglik, "log-likelihood")
        assert_rel(s.beta, d.beta, "BLUE")
        assert_rel(solver.gradient(moved, s), dense.gradient(moved, d), "gradient")
        assert_rel(solver.average_information(moved, s), dense.average_information(moved, d),
                   "AI matrix")
    rho = free.clone()
    rho[names.index("field/row/rho")] += 0.4                    # a correlation: new eigenvectors
    s = solver.state(rho, y, X, "reml")
    assert s.factor.Qs[0] is not first.factor.Qs[0]
    assert_rel(s.neg_loglik, dense.state(rho, y, X, "reml").neg_loglik, "log-likelihood")


def test_three_factor_missing_cells_equal_dense_on_observed_cells():
    """Missing cells of a 4 x 3 x 2 array completed with y = 0 and an indicator column each:
    REML, gradient, BLUE and P y equal the dense fit of the observed cells alone."""
    model = identified(THREE_FACTORS["ar1 x (cs x ar1) + nugget"]())
    g = gen(5)
    N = 24
    cells = torch.sort(torch.randperm(N, generator=g)[:N - 5]).values
    missing = torch.tensor(sorted(set(range(N)) - set(cells.tolist())))
    y_obs, X_obs = data(len(cells), p=2, seed=6)
    y = torch.zeros(N, dtype=DTYPE)
    y[cells] = y_obs
    X = torch.zeros(N, 2 + len(missing), dtype=DTYPE)
    X[cells, :2] = X_obs
    X[missing, 2 + torch.arange(len(missing))] = 1
    free = 0.5 * randn(model.num_free_params, g=g)
    solver = KroneckerSolver(model)
    state = solver.state(free, y, X, "reml")
    observed = DenseSolver(CovariancePropagation(P=torch.eye(N, dtype=DTYPE)[cells], grid=model))
    ref = observed.state(free, y_obs, X_obs, "reml")                # V_oo = P V Pᵀ, dense
    assert_rel(state.neg_loglik, ref.neg_loglik, "log-likelihood")
    assert_rel(solver.gradient(free, state), observed.gradient(free, ref), "gradient")
    assert_rel(state.beta[:2], ref.beta, "BLUE")
    assert_rel(state.Py[cells], ref.Py, "P y")
    assert float(state.Py[missing].abs().max()) < 1e-12
    assert_rel(solver.average_information(free, state), observed.average_information(free, ref),
               "AI matrix")
    assert_rel(solver.gradient(free, state), observed.gradient(free, ref),
               "gradient after the AI matrix")
