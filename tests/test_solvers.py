"""Structured solvers (Kronecker, grouped, Woodbury) equal the dense reference path.

Every quantity REML needs — log-likelihood, gradient (closed form and through autograd, also
to y and X), AI matrix, BLUE and its covariance, P y, BLUPs — to 1e-8 relative in float64 on
random models small enough for dense, plus R reference fits and solver dispatch.
"""

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from covmodules import (AR1Matrix, CompoundSymmetricMatrix, DesignMatrix, DiagonalMatrix,
                        EqualEntryMatrix, Grouped, IdentityMatrix, KroneckerProduct,
                        MixedModel, ScalarMatrix, Sum, UnconstrainedMatrix, fit)
from covmodules.design import fixed_design, positions_within_group
from covmodules.linalg import (SOLVERS, DenseSolver, KroneckerSolver, NotPositiveDefiniteError,
                               applicable_solvers, complete_grid, identify, select_solver)
from covmodules.linalg.dense import NegLogLikFunction, factorize
from covmodules.linalg.woodbury import root
from covmodules.testing import check_solver

from oracle import build

DTYPE = torch.float64
RTOL = 1e-8
ROOT = Path(__file__).resolve().parents[1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def assert_rel(ours, ref, what):
    ours, ref = torch.as_tensor(ours, dtype=DTYPE), torch.as_tensor(ref, dtype=DTYPE)
    err = float((ours - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    assert err <= RTOL * max(scale, 1e-300), f"{what}: relative error {err / scale:.3g}"


def check_equals_dense(model, y, X, name, free=None, method="reml"):
    """Every solver quantity of solver ``name`` equals the dense path at ``free``."""
    check_solver(model, y, X, name, free=free, method=method, rtol=RTOL)


def identified(model):
    """``model`` with one Kronecker scale fixed where both were free (see ``identify``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identify(model)
    return model


def methods(models):
    """REML on every model, ML (the same code less the ``X`` terms) on the first two."""
    keys = list(models)
    return [(k, "reml") for k in keys] + [(k, "ml") for k in keys[:2]]


def data(n, p=3, seed=0):
    g = gen(seed)
    return randn(n, g=g), torch.cat([torch.ones(n, 1, dtype=DTYPE), randn(n, p - 1, g=g)], 1)


# ------------------------------------------------------------------------------ Kronecker
KRONECKER_MODELS = {
    "ar1 x ar1 + nugget": lambda: Sum(field=KroneckerProduct(row=AR1Matrix(5), col=AR1Matrix(4)),
                                      nugget=ScalarMatrix(20)),
    "nugget + cs x identity": lambda: Sum(nugget=ScalarMatrix(20), field=KroneckerProduct(
        row=CompoundSymmetricMatrix(5), col=IdentityMatrix(4))),
    "identity x cs": lambda: KroneckerProduct(IdentityMatrix(5), CompoundSymmetricMatrix(4)),
    "unstructured x ar1": lambda: KroneckerProduct(UnconstrainedMatrix(5), AR1Matrix(4)),
    "ar1 x cs + identity": lambda: Sum(KroneckerProduct(AR1Matrix(5), CompoundSymmetricMatrix(4)),
                                       IdentityMatrix(20)),
    "mixed model residual": lambda: MixedModel(residual=Sum(
        field=KroneckerProduct(row=AR1Matrix(5), col=AR1Matrix(4)), nugget=ScalarMatrix(20))),
}


@pytest.mark.parametrize("key, method", methods(KRONECKER_MODELS))
def test_kronecker_equals_dense(key, method):
    model = identified(KRONECKER_MODELS[key]())
    y, X = data(20)
    check_equals_dense(model, y, X, "kronecker", method=method)


@pytest.mark.parametrize("key", ["ar1 x ar1 + nugget", "identity x cs"])
def test_kronecker_at_default_point_with_repeated_eigenvalues(key):
    model = identified(KRONECKER_MODELS[key]())   # rho = 0: A = I, all eigenvalues repeated
    y, X = data(20)
    check_equals_dense(model, y, X, "kronecker", free=model.free_param_defaults)


def test_kronecker_missing_plots_equal_dense_on_observed_plots():
    g = gen(3)
    m, n = 6, 5
    model = identified(Sum(field=KroneckerProduct(row=AR1Matrix(m),
                                                  col=CompoundSymmetricMatrix(n)),
                           nugget=ScalarMatrix(m * n)))
    cells = torch.randperm(m * n, generator=g)[:m * n - 4]        # 4 missing, shuffled rows
    y_obs, X_obs = data(len(cells), p=3, seed=4)
    grid = complete_grid((cells // n + 1).numpy(), (cells % n + 1).numpy(), y_obs, X_obs,
                         ["a", "b", "c"], shape=(m, n))
    assert torch.equal(grid.cells, cells) and len(grid.missing) == 4
    assert grid.x_names[:3] == ["a", "b", "c"] and grid.x_names[3].startswith("missing[")
    free = 0.5 * randn(model.num_free_params, g=g)
    solver = KroneckerSolver(model)
    state = solver.state(free, grid.y, grid.X, "reml")
    # dense reference on the observed plots only: V_oo
    f = free.clone().requires_grad_(True)
    V = model(f)[cells][:, cells]
    loss = NegLogLikFunction.apply(V, y_obs, X_obs, "reml")
    (grad,) = torch.autograd.grad(loss, f)
    ref = factorize(V.detach(), y_obs, X_obs, "reml")
    assert_rel(state.neg_loglik, ref.neg_loglik, "log-likelihood")
    assert_rel(solver.gradient(free, state), grad, "gradient")
    assert_rel(state.beta[:3], ref.beta, "BLUE")
    assert_rel(state.cov_beta[:3, :3], ref.cov_beta, "cov(BLUE)")
    assert_rel(state.Py[cells], ref.Py, "P y")
    assert float(state.Py[grid.missing].abs().max()) < 1e-12
    J = model.manual_grad(free)[0][:, cells][:, :, cells]
    ai_ref = 0.5 * ref.project((J @ ref.Py).T)
    assert_rel(solver.average_information(free, state), ai_ref, "AI matrix")
    assert state.factor.derivatives is not None          # the gradient reuses the AI's work
    assert_rel(solver.gradient(free, state), grad, "gradient after the AI matrix")


def test_complete_grid_orders_rows_and_checks_cells():
    grid = complete_grid([2, 1, 1], [1, 2, 1], torch.tensor([3.0, 2.0, 1.0], dtype=DTYPE))
    assert grid.y.tolist() == [1.0, 2.0, 3.0, 0.0]
    assert grid.x_names == ["(Intercept)", "missing[2,2]"] and grid.shape == (2, 2)
    with pytest.raises(ValueError, match="share a grid cell"):
        complete_grid([1, 1], [1, 1], torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="x_names must name the 2 columns of X, got 1"):
        complete_grid([1, 2], [1, 1], torch.zeros(2, dtype=DTYPE), torch.ones(2, 2, dtype=DTYPE),
                      ["a"])


def field_trial():
    ref = json.loads((ROOT / "tests/data/scale_reference_iv_a.json").read_text())
    df = pd.read_csv(ROOT / "data/sim_field_40x40.csv")
    for col, levels in ref["levels"].items():
        df[col] = pd.Categorical(df[col], categories=levels)
    design = fixed_design(df, ["block", "genotype"])
    grid = complete_grid(df["row"].to_numpy(), df["col"].to_numpy(),
                         torch.tensor(df["y"].to_numpy(), dtype=DTYPE), design.matrix,
                         design.names)
    return grid, ref


def test_field_trial_kronecker_fit_matches_nlme():
    grid, ref = field_trial()
    model = Sum(field=KroneckerProduct(row=AR1Matrix(40), col=AR1Matrix(40)),
                nugget=ScalarMatrix(1600))
    with pytest.warns(UserWarning, match="field/col/sigma\\^2 fixed at 1"):
        result = fit(model, grid.y, grid.X, x_names=grid.x_names)
    assert result.solver == "kronecker" and result.converged and result.iterations <= 20
    assert abs(result.loglik - ref["logLik_REML"]) < 1e-6
    p, res = result.params, ref["residual"]
    total = p["field/row/sigma^2"] + p["nugget/sigma^2"]
    ours = {"sigma2": total, "rho_row": p["field/row/rho"], "rho_col": p["field/col/rho"],
            "nugget": p["nugget/sigma^2"] / total}
    for key, value in ours.items():
        assert value == pytest.approx(res[key], rel=1e-4), key
    fe = result.fixed_effects["estimate"]
    for name, value in ref["fixed_effects"].items():
        assert fe[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# -------------------------------------------------------------------------------- grouped
def grouped_data(sizes=(3, 5, 3, 4, 5, 2, 3), seed=0):
    """Shuffled rows of unequal groups: codes, positions, a covariate and (y, X)."""
    g = gen(seed)
    codes = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    codes = codes[torch.randperm(len(codes), generator=g)]
    n = len(codes)
    return codes, positions_within_group(codes), randn(n, g=g), *data(n, seed=seed + 1)


def slope_design(codes, t):
    n, L = len(codes), int(codes.max()) + 1
    Z = torch.zeros(n, 2 * L, dtype=DTYPE)
    Z[torch.arange(n), 2 * codes] = 1
    Z[torch.arange(n), 2 * codes + 1] = t
    return Z


def grouped_models():
    codes, pos, t, _, _ = grouped_data()
    n, L = len(codes), int(codes.max()) + 1
    one_hot = torch.nn.functional.one_hot(codes, L).to(DTYPE)
    slope = slope_design(codes, t)
    t_zero = torch.where(pos == 0, 0.0, t)                     # some rows of Z all zero
    return {
        "intercept + slope, iid": lambda: MixedModel(
            random={"s": (slope, KroneckerProduct(IdentityMatrix(L), UnconstrainedMatrix(2)))},
            residual=ScalarMatrix(n)),
        "intercept, grouped ar1": lambda: MixedModel(
            random={"s": (DesignMatrix(codes), ScalarMatrix(L))},
            residual=Grouped(AR1Matrix(6), groups=codes, positions=pos + (pos > 1))),
        "grouped cs": lambda: Grouped(CompoundSymmetricMatrix(5), groups=codes, positions=pos),
        "two terms, diagonal": lambda: MixedModel(
            random={"a": (one_hot, ScalarMatrix(L)), "b": (one_hot * t_zero[:, None],
                                                           ScalarMatrix(L))},
            residual=DiagonalMatrix(n)),
        "nested residual groups": lambda: MixedModel(
            random={"s": (one_hot, ScalarMatrix(L))},
            residual=Grouped(AR1Matrix(3), groups=2 * codes + pos % 2, positions=pos // 2)),
        "grouped ar1 + nugget": lambda: Sum(Grouped(AR1Matrix(5), groups=codes, positions=pos),
                                            ScalarMatrix(n)),
    }


@pytest.mark.parametrize("key, method", methods(grouped_models()))
def test_grouped_equals_dense(key, method):
    _, _, _, y, X = grouped_data()
    model = grouped_models()[key]()
    check_equals_dense(model, y, X, "grouped", method=method)


def test_grouped_recognises_block_structure_from_z():
    codes, _, t, _, _ = grouped_data()
    n, L = len(codes), int(codes.max()) + 1
    other = torch.nn.functional.one_hot((codes + torch.arange(n)) % 3, 3).to(DTYPE)
    crossed = MixedModel(random={"s": (slope_design(codes, t), KroneckerProduct(
        IdentityMatrix(L), UnconstrainedMatrix(2))), "c": (other, ScalarMatrix(3))},
        residual=ScalarMatrix(n))
    assert not grouped_applies(crossed)
    ar1_across = MixedModel(random={"s": (DesignMatrix(codes), AR1Matrix(L))},
                            residual=ScalarMatrix(n))
    assert not grouped_applies(ar1_across)
    assert grouped_applies(grouped_models()["intercept + slope, iid"]())


def grouped_applies(model) -> bool:
    """Whether the one applicability path (``applicable_solvers``) offers the grouped solver."""
    return "grouped" in [s.name for s in applicable_solvers(model)]


# ------------------------------------------------------------------------------- Woodbury
def woodbury_models():
    codes, pos, t, _, _ = grouped_data()
    n, L = len(codes), int(codes.max()) + 1
    crossed = torch.nn.functional.one_hot((codes + pos) % 4, 4).to(DTYPE)
    return {
        "crossed": lambda: MixedModel(
            random={"s": (DesignMatrix(codes), ScalarMatrix(L)), "c": (crossed, ScalarMatrix(4))},
            residual=ScalarMatrix(n)),
        "slope, diagonal residual": lambda: MixedModel(
            random={"s": (slope_design(codes, t),
                          KroneckerProduct(IdentityMatrix(L), UnconstrainedMatrix(2)))},
            residual=DiagonalMatrix(n)),
        "singular G": lambda: MixedModel(
            random={"s": (slope_design(codes, t),
                          KroneckerProduct(IdentityMatrix(L), EqualEntryMatrix(2)))},
            residual=Sum(ScalarMatrix(n), IdentityMatrix(n))),
    }


@pytest.mark.parametrize("key, method", methods(woodbury_models()))
def test_woodbury_equals_dense(key, method):
    _, _, _, y, X = grouped_data()
    model = woodbury_models()[key]()
    check_equals_dense(model, y, X, "woodbury", method=method)


def test_woodbury_near_singular_g():
    _, _, _, y, X = grouped_data()
    model = woodbury_models()["crossed"]()
    free = torch.tensor([-14.0, 0.3, 0.1], dtype=DTYPE)        # sigma^2 = e^-28 ~ 7e-13
    check_equals_dense(model, y, X, "woodbury", free=free)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_woodbury_root_of_semidefinite_g(dtype):
    v = randn(6, 2, g=gen(1))
    G = (v @ v.T).to(dtype)                                    # rank 2: Cholesky fails
    Lam = root(G)
    torch.testing.assert_close(Lam @ Lam.T, G)
    with pytest.raises(NotPositiveDefiniteError, match="not positive semi-definite"):
        root(G - 0.01 * float(G.diagonal().max()) * torch.eye(6, dtype=dtype))


def test_woodbury_fit_matches_lme4():
    model, y, X, names, spec = build("a")
    result = fit(model, y, X, x_names=names, solver="woodbury")
    assert result.solver == "woodbury" and result.converged
    assert abs(result.loglik - spec["logLik_REML"]) < 1e-6
    cov = model._modules["Subject"].terms.covariance()
    torch.testing.assert_close(cov, torch.tensor(spec["random"][0]["cov"], dtype=DTYPE),
                               rtol=1e-4, atol=1e-4 * float(cov.abs().max()))


@pytest.mark.parametrize("name, make", [
    ("kronecker", KRONECKER_MODELS["ar1 x ar1 + nugget"]),
    ("kronecker", KRONECKER_MODELS["unstructured x ar1"]),
    ("grouped", grouped_models()["intercept + slope, iid"]),
    ("woodbury", woodbury_models()["slope, diagonal residual"]),
    ("woodbury", woodbury_models()["crossed"]),
    ("mme", woodbury_models()["crossed"]),
    ("mme", woodbury_models()["slope, diagonal residual"])])
def test_overflowing_parameters_raise_not_positive_definite(name, make):
    """An overflowing variance (an AI step too far) is a NotPositiveDefiniteError, which the
    fitting loop answers by step halving, in every solver (not eigh's own error)."""
    model = identified(make())
    y, X = data(model.shape[0])
    free = model.free_param_defaults.clone()
    free[0] = 1000.0                                           # exp(2000) = inf
    for solver in (name, "dense"):
        with pytest.raises(NotPositiveDefiniteError):
            SOLVERS[solver](model).state(free, y, X, "reml")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name, make", [
    ("kronecker", KRONECKER_MODELS["ar1 x ar1 + nugget"]),
    ("grouped", grouped_models()["intercept, grouped ar1"]),
    ("grouped", grouped_models()["two terms, diagonal"]),
    ("woodbury", woodbury_models()["crossed"])])
def test_solvers_on_cuda_match_cpu(name, make):
    n = make().shape[0]
    y, X = data(n)
    free = 0.5 * randn(identified(make()).num_free_params, g=gen(7))
    results = []
    for device in ("cpu", "cuda"):
        model = identified(make().to(device))
        solver = select_solver(model, name)
        state = solver.state(free.to(device), y.to(device), X.to(device), "reml")
        results.append([state.neg_loglik, solver.gradient(free.to(device), state),
                        solver.average_information(free.to(device), state)])
    for cpu, cuda in zip(*results):
        assert cuda.is_cuda
        assert_rel(cuda.cpu(), cpu, "CUDA against CPU")


# ------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("model_id, expected", [
    ("a", "grouped"), ("b", "grouped"), ("c", "grouped"), ("d", "woodbury"),
    ("f1", "grouped"), ("f2", "grouped"), ("g1", "grouped"), ("g2", "grouped")])
def test_dispatch_on_oracle_models(model_id, expected):
    model, y, X, _, _ = build(model_id)
    assert select_solver(model).name == expected


def test_dispatch_kronecker_and_dense():
    field = Sum(field=KroneckerProduct(row=AR1Matrix(8), col=AR1Matrix(6)), nugget=ScalarMatrix(48))
    with pytest.warns(UserWarning):
        assert select_solver(field).name == "kronecker"
    tiny = KroneckerProduct(AR1Matrix(2), IdentityMatrix(2))
    assert select_solver(tiny).name == "dense"                 # cheaper than two eigh's
    assert select_solver(tiny, "kronecker").name == "kronecker"
    assert select_solver(AR1Matrix(12)).name == "dense"
    assert isinstance(select_solver(field, "dense"), DenseSolver)
    with pytest.raises(ValueError, match="does not apply"):
        select_solver(AR1Matrix(12), "kronecker")
    with pytest.raises(ValueError, match="unknown solver"):
        select_solver(field, "sparse")
    with pytest.raises(TypeError, match="solver must be a name"):
        select_solver(field, DenseSolver)
    with pytest.raises(ValueError, match="built for another model"):
        select_solver(field, DenseSolver(AR1Matrix(48)))


def test_dense_override_gives_the_same_fit():
    model, y, X, names, spec = build("f2")
    structured = fit(model, y, X, x_names=names)
    model, y, X, names, spec = build("f2")
    dense = fit(model, y, X, x_names=names, solver="dense")
    assert (structured.solver, dense.solver) == ("grouped", "dense")
    assert structured.loglik == pytest.approx(dense.loglik, rel=1e-10)
    assert "solver: grouped" in structured.summary()


# -------------------------------------------------------------------------- identifiability
def test_identify_fixes_the_second_factor_scale():
    model = Sum(field=KroneckerProduct(row=AR1Matrix(4), col=AR1Matrix(3)), nugget=ScalarMatrix(12))
    with pytest.warns(UserWarning, match="field/col/sigma\\^2 fixed"):
        assert identify(model) == ["field/col/sigma^2"]
    assert "field/col/sigma^2" in model.fixed_param_names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert identify(model) == []                    # now identified


def test_identify_falls_back_to_the_first_factor_or_refuses():
    model = KroneckerProduct(AR1Matrix(3), UnconstrainedMatrix(2))
    with pytest.warns(UserWarning):
        assert identify(model) == ["0/sigma^2"]
    with pytest.raises(ValueError, match="only their product is identified"):
        identify(KroneckerProduct(UnconstrainedMatrix(2), UnconstrainedMatrix(2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert identify(KroneckerProduct(IdentityMatrix(3), UnconstrainedMatrix(2))) == []


def test_identify_float32_model():
    model = Sum(field=KroneckerProduct(row=AR1Matrix(4), col=AR1Matrix(3)),
                nugget=ScalarMatrix(12)).to(torch.float32)
    with pytest.warns(UserWarning, match="field/col/sigma\\^2 fixed"):
        assert identify(model) == ["field/col/sigma^2"]
    row = AR1Matrix(4)
    row.fix("sigma^2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert identify(KroneckerProduct(row, AR1Matrix(3)).to(torch.float32)) == []
