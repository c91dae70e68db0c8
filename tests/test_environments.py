"""Multi-environment trials: random genotype x environment effects (FA, US, diagonal Σ)
over per-trial spatial residuals, and random row / column effects over one trial's field,
each equal to the dense path to 1e-8 (missing plots included)."""

import warnings

import pytest
import torch

from covmodules import (AR1Matrix, BlockDesignMatrix, BlockDiagonal, DiagonalMatrix,
                        FactorAnalyticMatrix, IdentityMatrix, KroneckerProduct, MixedModel,
                        ScalarMatrix, Sum, UnconstrainedMatrix)
from covmodules.linalg import MultiEnvironmentSolver, identify, select_solver

from test_solvers import check_equals_dense, gen, randn

DTYPE = torch.float64
GRIDS = [(3, 4), (4, 3), (2, 5)]          # trials of different sizes
L = 4                                     # genotypes


def spatial(m, n):
    return Sum(field=KroneckerProduct(row=AR1Matrix(m), col=AR1Matrix(n)),
               nugget=ScalarMatrix(m * n))


def trials(seed=0, missing=2):
    """Plots of the trials in grid order; ``missing`` cells per trial have no genotype
    (``y = 0``, their own indicator column, a zero row of ``Z``)."""
    g = gen(seed)
    env, geno, lost = [], [], []
    for e, (m, n) in enumerate(GRIDS):
        env += [e] * (m * n)
        geno += torch.randint(0, L, (m * n,), generator=g).tolist()
        offset = len(env) - m * n
        lost += (offset + torch.randperm(m * n, generator=g)[:missing]).tolist()
    N, E = len(env), len(GRIDS)
    env, geno = torch.tensor(env), torch.tensor(geno)
    values = torch.nn.functional.one_hot(env, E).to(DTYPE)
    values[lost] = 0
    Z = BlockDesignMatrix(geno, values, L)                    # column j E + e
    X = torch.cat([torch.nn.functional.one_hot(env, E).to(DTYPE),
                   torch.zeros(N, len(lost), dtype=DTYPE)], 1)
    X[lost] = 0
    X[lost, E + torch.arange(len(lost))] = 1
    y = randn(N, g=g)
    y[lost] = 0
    return Z, y, X


def identified(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identify(model)
    return model


SIGMAS = {"fa1": lambda: FactorAnalyticMatrix(3, 1), "us": lambda: UnconstrainedMatrix(3),
          "diag": lambda: DiagonalMatrix(3)}


@pytest.mark.parametrize("sigma", list(SIGMAS))
def test_met_spatial_equals_dense(sigma):
    Z, y, X = trials()
    model = identified(MixedModel(
        random={"gxe": (Z, KroneckerProduct(IdentityMatrix(L), SIGMAS[sigma]()))},
        residual=BlockDiagonal(*[spatial(m, n) for m, n in GRIDS])))
    solver = select_solver(model)
    assert solver.name == "met" and solver.env is not None
    assert [b.envs for b in solver.blocks] == [[0], [1], [2]]
    check_equals_dense(model, y, X, "met")


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_met_diagonal_residuals_equal_dense(method):
    """Without spatial structure: one residual variance per trial, or one in all."""
    Z, y, X = trials(seed=1, missing=0)
    n = [m * k for m, k in GRIDS]
    for residual in (BlockDiagonal(*[ScalarMatrix(k) for k in n]), ScalarMatrix(sum(n))):
        model = MixedModel(random={"gxe": (Z, KroneckerProduct(IdentityMatrix(L),
                                                               FactorAnalyticMatrix(3, 1)))},
                           residual=residual)
        solver = MultiEnvironmentSolver(model)
        assert len(solver.blocks) == 3
        check_equals_dense(model, y, X, "met", method=method)


def test_row_and_column_effects_beside_the_field_equal_dense():
    """One trial: random row and column effects plus AR1 ⊗ AR1 + nugget, and a linear trend
    along the rows as a fixed effect."""
    m, n = 5, 4
    N = m * n
    rows, cols = torch.arange(N) // n, torch.arange(N) % n
    model = identified(MixedModel(
        random={"row": (BlockDesignMatrix(rows, torch.ones(N, 1), m), ScalarMatrix(m)),
                "col": (BlockDesignMatrix(cols, torch.ones(N, 1), n), ScalarMatrix(n))},
        residual=spatial(m, n)))
    g = gen(2)
    y = randn(N, g=g)
    X = torch.stack([torch.ones(N, dtype=DTYPE), rows.to(DTYPE)], 1)
    assert [t for t, *_ in MultiEnvironmentSolver(model).others] == ["col"]   # row: level 1
    check_equals_dense(model, y, X, "met")


def test_environment_split_across_blocks_falls_back_to_a_general_term():
    """Trials interleaved in the rows: still exact, through the level-2 update."""
    Z, y, X = trials(seed=3, missing=0)
    perm = torch.randperm(len(y), generator=gen(4))
    Zp = BlockDesignMatrix(Z.codes[perm], Z.values[perm], L)
    model = MixedModel(random={"gxe": (Zp, KroneckerProduct(IdentityMatrix(L),
                                                            UnconstrainedMatrix(3)))},
                       residual=ScalarMatrix(len(y)))
    solver = MultiEnvironmentSolver(model)
    assert len(solver.blocks) == 1
    check_equals_dense(model, y[perm], X[perm], "met")


# ---------------------------------------------------------------- glmmTMB reference
def met_small():
    import pandas as pd
    from pathlib import Path
    data = Path(__file__).resolve().parent / "data"
    df = pd.read_csv(data / "met_small.csv")
    ref = __import__("json").loads((data / "met_glmmtmb.json").read_text())
    env = torch.tensor(pd.Categorical(df["env"]).codes.astype("int64"))
    geno = torch.tensor(pd.Categorical(df["genotype"]).codes.astype("int64"))
    E, L = int(env.max()) + 1, int(geno.max()) + 1
    Z = BlockDesignMatrix(geno, torch.nn.functional.one_hot(env, E).to(DTYPE), L)
    X = torch.nn.functional.one_hot(env, E).to(DTYPE)
    return Z, torch.tensor(df["y"].to_numpy()), X, E, L, ref


@pytest.mark.parametrize("key", ["us", "fa1"])
def test_met_equals_glmmtmb(key):
    """glmmTMB us(0 + env | genotype), and rr(d = 1) + diag(0 + env | genotype) (= FA(1)),
    REML, a common residual variance: scripts/met_glmmtmb.R."""
    from covmodules import fit
    Z, y, X, E, L, ref = met_small()
    sigma = UnconstrainedMatrix(E) if key == "us" else FactorAnalyticMatrix(E, 1)
    model = MixedModel(random={"gxe": (Z, KroneckerProduct(IdentityMatrix(L), sigma))},
                       residual=ScalarMatrix(len(y)))
    result = fit(model, y, X, solver="met")
    r = ref[key]
    assert result.converged and result.solver == "met"
    assert abs(result.loglik - r["logLik_REML"]) < 1e-6
    with torch.no_grad():
        S = sigma()
    torch.testing.assert_close(S, torch.tensor(r["Sigma"], dtype=DTYPE), rtol=0, atol=1e-4)
    assert abs(result.params["residual/sigma^2"] - r["sigma2"]) < 1e-4 * r["sigma2"]
    torch.testing.assert_close(result.state.beta, torch.tensor(r["beta"], dtype=DTYPE),
                               rtol=1e-6, atol=0)


# ---------------------------------------------------------- the plot-data front end
def test_multi_environment_model_blups_and_pev_equal_dense():
    """multi_environment: trials of two sizes with missing plots, a row trend and random row
    effects; genotype BLUPs and their prediction error variances equal the dense formulas
    ``G Zᵀ P y`` and ``diag(G - G Zᵀ P Z G)``."""
    from covmodules.reml import REML
    from covmodules.results import FitResult
    from covmodules.trials import genotype_blups, multi_environment, simulate_trials

    df, _ = simulate_trials([(4, 5), (5, 4)], genotypes=6, k=1, missing=0.1, seed=2)
    trial = multi_environment(df, sigma="us", trend="row", row_effects=True)
    model = identified(trial.model)
    assert len(trial.x_names) > 4 and trial.x_names[2] == "row_trend[E01]"
    check_equals_dense(model, trial.y, trial.X, "met")
    free = 0.3 * randn(model.num_free_params, g=gen(8))
    objective = REML(model, trial.y, trial.X, solver="met")
    result = FitResult(objective, free, objective.state(free), None, True, 0, "ai")
    model.set_free_params(free)
    table = genotype_blups(result, trial)
    with torch.no_grad():
        V, X, y = model(free), trial.X, trial.y
        Vi = torch.linalg.inv(V)
        P = Vi - Vi @ X @ torch.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
        G = model._modules["gxe"]()
        Z = model.design("gxe")
        blup = G @ Z.T @ P @ y
        pev = (G - G @ Z.T @ P @ Z @ G).diagonal()
    torch.testing.assert_close(torch.tensor(table["blup"].to_numpy()), blup, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.tensor(table["pev"].to_numpy()), pev, rtol=1e-8, atol=1e-12)
    assert list(table.index[0]) == [0, "E01"]
