"""Capability views: structures defined outside the package declare what they are (diagonal,
constant diagonal) and the structured solvers fit them, equal to the dense solver, with no
edit of any solver.
"""

import warnings

import pytest
import torch

from covmodules import (AR1Matrix, DesignMatrix, DiagonalMatrix, IdentityMatrix,
                        KroneckerProduct, MixedModel, ScalarMatrix, Structure, Sum,
                        UnconstrainedMatrix, fit)
from covmodules.capabilities import DiagonalView, is_identity
from covmodules.linalg import SOLVERS, DenseSolver, identify, select_solver
from covmodules.testing import check_gradients
from covmodules.transforms import Exp, ExpPow2

DTYPE = torch.float64
RTOL = 1e-8


class Weighted(Structure):
    """Heteroscedastic residuals ``σ² diag(w)`` with known weights ``w > 0``."""

    def __init__(self, weights):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(weights, dtype=DTYPE))
        self.add_param("sigma^2", 0.0, ExpPow2())

    @property
    def shape(self):
        return (self.w.numel(), self.w.numel())

    def _evaluate(self, nat):
        return torch.diag(nat[0] * self.w.to(nat))

    def _jacobian(self, nat):
        return torch.diag(self.w.to(nat))[None]

    def diagonal_view(self):
        return DiagonalView(lambda nat: nat[0] * self.w.to(nat),
                            lambda nat, d: (d * self.w.to(d)).sum()[None])


class SdIdentity(Structure):
    """``s² I`` parameterised by the standard deviation ``s``: a constant diagonal."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.add_param("sd", 0.0, Exp())

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return nat[0] ** 2 * torch.eye(self.n, dtype=nat.dtype, device=nat.device)

    def _jacobian(self, nat):
        return 2 * nat[0] * torch.eye(self.n, dtype=nat.dtype, device=nat.device)[None]

    def diagonal_view(self):
        return DiagonalView(lambda nat: (nat[0] ** 2).expand(self.n),
                            lambda nat, d: (2 * nat[0] * d.sum())[None], constant=True)


class Unviewed(Weighted):
    """``σ² diag(w)`` that does not say it is diagonal."""

    def diagonal_view(self):
        return None


def assert_rel(ours, ref, what):
    ours, ref = torch.as_tensor(ours, dtype=DTYPE), torch.as_tensor(ref, dtype=DTYPE)
    err, scale = float((ours - ref).abs().max()), float(ref.abs().max())
    assert err <= RTOL * max(scale, 1e-300), f"{what}: relative error {err / scale:.3g}"


def grouped_data(seed=0):
    """8 groups of 4-10 rows, an intercept and a slope, weights 0.5-2."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 11, (8,), generator=g)
    codes = torch.repeat_interleave(torch.arange(8), sizes)
    n = codes.numel()
    w = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=DTYPE)
    X = torch.stack([torch.ones(n, dtype=DTYPE), torch.randn(n, generator=g, dtype=DTYPE)], 1)
    u = 1.5 * torch.randn(8, generator=g, dtype=DTYPE)
    y = X @ torch.tensor([2.0, -1.0], dtype=DTYPE) + u[codes] \
        + w.sqrt() * torch.randn(n, generator=g, dtype=DTYPE)
    return codes, w, y, X


def intercept_model(codes, residual):
    L = int(codes.max()) + 1
    return MixedModel(random={"g": (DesignMatrix(codes), ScalarMatrix(L))}, residual=residual)


def assert_equal_to_dense(model, y, X, name):
    """The solver's -l, gradient and AI equal the dense solver's at a random point."""
    structured, dense = SOLVERS[name](model), DenseSolver(model)
    free = 0.3 * torch.randn(model.num_free_params, generator=torch.Generator().manual_seed(3),
                             dtype=DTYPE)
    s, d = structured.state(free, y, X, "reml"), dense.state(free, y, X, "reml")
    assert_rel(s.neg_loglik, d.neg_loglik, "log-likelihood")
    assert_rel(structured.gradient(free, s), dense.gradient(free, d), "gradient")
    assert_rel(structured.average_information(free, s), dense.average_information(free, d),
               "AI matrix")


def assert_same_fit(fits):
    (_, ref), *others = fits
    for solver, result in others:
        assert result.converged and result.solver == solver
        assert result.loglik == pytest.approx(ref.loglik, rel=RTOL), solver
        assert_rel(list(result.params.values()), list(ref.params.values()), f"{solver} params")


@pytest.mark.parametrize("module", [Weighted(torch.linspace(0.5, 2.0, 5)), SdIdentity(4),
                                    ScalarMatrix(3), IdentityMatrix(3), DiagonalMatrix(4)],
                         ids=lambda m: type(m).__name__)
def test_diagonal_views_agree_with_the_matrix(module):
    if module.num_params:
        check_gradients(module)
    view = module.diagonal_view()
    g = torch.Generator().manual_seed(1)
    nat = module.build_params(torch.randn(module.num_free_params, generator=g, dtype=DTYPE))
    V = module._evaluate(nat)
    d = torch.randn(V.shape[0], generator=g, dtype=DTYPE)
    torch.testing.assert_close(torch.diag(view.values(nat)), V)
    torch.testing.assert_close(view.vjp(nat, d), module._vjp(nat, torch.diag(d)))
    assert view.constant == bool((V.diagonal() == V[0, 0]).all())
    if view.constant:
        torch.testing.assert_close(view.trace_vjp(nat, d.sum(), d.numel()), view.vjp(nat, d))


def test_repeated_block_and_identity_views():
    S = UnconstrainedMatrix(2)
    assert KroneckerProduct(IdentityMatrix(5), S).repeated_block_view().block is S
    assert KroneckerProduct(AR1Matrix(5), S).repeated_block_view() is None
    view = ScalarMatrix(6).repeated_block_view()
    assert view.count == 6
    assert view.block._evaluate(torch.tensor([2.5], dtype=DTYPE)).tolist() == [[2.5]]
    assert is_identity(IdentityMatrix(3)) and not is_identity(ScalarMatrix(3))
    assert not is_identity(SdIdentity(3))


@pytest.mark.parametrize("solver", ["woodbury", "grouped"])
def test_new_diagonal_residual_equals_dense(solver):
    codes, w, y, X = grouped_data()
    assert_equal_to_dense(intercept_model(codes, Weighted(w)), y, X, solver)


def test_new_diagonal_residual_fits_as_dense():
    codes, w, y, X = grouped_data()
    automatic = fit(intercept_model(codes, Weighted(w)), y, X)
    assert automatic.solver in ("grouped", "woodbury")              # a structured solver
    fits = [(solver, fit(intercept_model(codes, Weighted(w)), y, X, solver=solver))
            for solver in ("dense", "woodbury", "grouped")]
    assert_same_fit(fits + [(automatic.solver, automatic)])


def test_new_constant_diagonal_is_a_kronecker_nugget():
    def model():
        return Sum(field=KroneckerProduct(row=AR1Matrix(6), col=AR1Matrix(5)),
                   nugget=SdIdentity(30))

    truth = model()
    truth.set_params({"field/row/sigma^2": 2.0, "field/row/rho": 0.6, "field/col/rho": 0.5,
                      "nugget/sd": 0.7})
    z = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    y = torch.linalg.cholesky(truth().detach()) @ z            # nugget sd 0.92 at the optimum
    X = torch.ones(30, 1, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # identify fixes field/col/sigma^2
        fits = [(solver, fit(model(), y, X, solver=solver)) for solver in ("dense", "kronecker")]
        identified = model()
        identify(identified)
    assert select_solver(identified).name == "kronecker"
    assert_equal_to_dense(identified, y, X, "kronecker")
    assert_same_fit(fits)


def test_a_structure_without_a_view_is_not_diagonal_to_the_solvers():
    codes, w, y, X = grouped_data()
    model = intercept_model(codes, Unviewed(w))
    with pytest.raises(ValueError, match="does not apply.*must be diagonal"):
        select_solver(model, "woodbury")
    with pytest.raises(ValueError, match="does not apply.*not block diagonal"):
        select_solver(model, "grouped")
    assert select_solver(model).name == "dense"
