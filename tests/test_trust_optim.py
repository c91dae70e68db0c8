"""Optimisers on data a careless or unlucky user brings: scale-free decisions, bounded loops,
boundaries flagged by every optimiser, singular information reported (issue "Trustworthy
fits", defects 1, 4, 6 (SEs) and 8)."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import (AR1Matrix, Grouped, IdentityMatrix, KroneckerProduct, MixedModel,
                        ParamSpec, ScalarMatrix, SimpleMatrix, UnconstrainedMatrix, fit)
from covmodules.design import fixed_design, random_design
from covmodules.optim import AIREML
from covmodules.scale import ParameterScale, unidentified_params
from covmodules.reml import REML
from covmodules.transforms import Exp, ExpPow2, Identity, correlation

DT = torch.float64


def sleepstudy():
    df = pd.read_csv("tests/data/sleepstudy.csv", dtype={"Subject": str})
    X = fixed_design(df, ["Days"])
    Z = random_design(df, "Subject", ["1", "Days"])
    model = MixedModel(
        random={"Subject": (Z, KroneckerProduct(subjects=IdentityMatrix(Z.num_levels),
                                                 effects=UnconstrainedMatrix(2)))},
        residual=ScalarMatrix(len(df)))
    return model, torch.tensor(df["Reaction"].to_numpy(), dtype=DT), X.matrix


@pytest.mark.parametrize("method", ["ai", "lbfgs"])
@pytest.mark.parametrize("s", [1e-8, 1e8])
def test_unstructured_g_is_scale_equivariant(method, s):
    """Defect 1: y * 1e8 stopped at the start values (0 iterations, logLik 68.5 too low)."""
    model, y, X = sleepstudy()
    ref = fit(model, y, X, optimizer=method)
    G_ref = model.Subject.effects.covariance()
    model, y, X = sleepstudy()
    scaled = fit(model, s * y, X, optimizer=method)
    assert scaled.converged and ref.converged
    assert abs(scaled.iterations - ref.iterations) <= 2
    torch.testing.assert_close(model.Subject.effects.covariance() / s ** 2, G_ref,
                               rtol=1e-6, atol=0)
    assert scaled.params["residual/sigma^2"] / s ** 2 == pytest.approx(
        ref.params["residual/sigma^2"], rel=1e-6)
    np.testing.assert_allclose(scaled.fixed_effects["estimate"] / s,
                               ref.fixed_effects["estimate"], rtol=1e-6)
    assert scaled.loglik == pytest.approx(ref.loglik - (len(y) - 2) * math.log(s), abs=1e-6)
    assert ref.loglik == pytest.approx(-871.8141, abs=1e-4)          # lme4


def test_start_values_follow_the_data_scale_for_loadings():
    """scale_start multiplies sd-like and loading parameters by √c, variances by c."""
    from covmodules.scale import scale_start
    from covmodules import LowerTriangularMatrix
    g = torch.Generator().manual_seed(3)
    groups = torch.arange(60) // 3
    Z = torch.nn.functional.one_hot(groups).to(DT)
    y = 1e6 * (Z @ torch.randn(20, generator=g, dtype=DT) + torch.randn(60, generator=g,
                                                                          dtype=DT))
    model = MixedModel(random={"g": (Z, LowerTriangularMatrix(20, order="col"))},
                       residual=ScalarMatrix(60))
    free = scale_start(REML(model, y))
    nat = model.build_params(free, include_fixed=False)
    diag = nat[[i for i, n in enumerate(model.free_param_names) if n in ("g/L[0,0]",)]]
    assert 1e4 < float(diag[0]) < 1e8                        # ~ 1e6, not the default 1
    assert 1e10 < float(nat[-1]) < 1e14                      # residual variance ~ 1e12


def test_direction_is_bounded_on_a_non_finite_ai_matrix():
    """Defect 4: the damping loop had no exit; a non-finite AI matrix now gives None."""
    model = ScalarMatrix(4)
    y = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=DT)
    runner = AIREML(REML(model, y))
    active = torch.ones(1, dtype=torch.bool)
    bad = torch.tensor([[float("nan")]], dtype=DT)
    assert runner._direction(bad, torch.ones(1, dtype=DT), active) is None
    ok = runner._direction(torch.tensor([[2.0]], dtype=DT), torch.ones(1, dtype=DT), active)
    assert float(ok[0]) == pytest.approx(0.5)


def test_a_non_finite_score_stops_the_run_with_a_warning(monkeypatch):
    model = ScalarMatrix(4)
    y = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=DT)
    objective = REML(model, y)
    monkeypatch.setattr(objective, "gradient",
                        lambda free, state: torch.full_like(free, -float("inf")))
    with pytest.warns(UserWarning, match="score or the AI matrix is not finite"):
        run = AIREML(objective).run()
    assert not run.converged and run.iterations == 0


def zero_variance_data(seed=0):
    """A random intercept whose true variance is zero: every optimiser ends at the boundary."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(80) // 4
    Z = torch.nn.functional.one_hot(groups).to(DT)
    y = torch.randn(80, generator=g, dtype=DT)
    y = y - Z @ (Z.T @ y) / 4 + 0.1 * torch.arange(80, dtype=DT) / 80   # no group effect
    return lambda: MixedModel(random={"g": (Z, ScalarMatrix(20))}, residual=ScalarMatrix(80)), y


@pytest.mark.parametrize("method", ["ai", "lbfgs", "adam"])
def test_every_optimiser_flags_a_zero_variance(method):
    """Defect 8: L-BFGS / Adam / SGD returned 1e-13 with SE 1e-27 and no warning."""
    build, y = zero_variance_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(build(), y, optimizer=method, max_iter=2000 if method == "adam" else None)
    assert any("singular fit" in str(w.message) for w in caught)
    assert result.boundary == ["g/sigma^2"]
    assert math.isnan(result.std_errors["g/sigma^2"])
    assert result.params["g/sigma^2"] < 1e-8 * result.params["residual/sigma^2"]
    assert "singular fit" in result.summary()


def test_singular_ai_matrix_reports_nan_standard_errors():
    """Defect 6's standard errors: two copies of one random term are confounded (only their
    sum is identified); the fit warns and reports NaN, not 1e-32."""
    g = torch.Generator().manual_seed(1)
    groups = torch.arange(60) // 3
    Z = torch.nn.functional.one_hot(groups).to(DT)
    y = Z @ (2 * torch.randn(20, generator=g, dtype=DT)) + torch.randn(60, generator=g,
                                                                        dtype=DT)
    model = MixedModel(random={"a": (Z, ScalarMatrix(20)), "b": (Z, ScalarMatrix(20))},
                       residual=ScalarMatrix(60))
    with pytest.warns(UserWarning, match="AI matrix is singular"):
        result = fit(model, y)
    assert result.unidentified == ["a/sigma^2", "b/sigma^2"]
    se = result.std_errors
    assert math.isnan(se["a/sigma^2"]) and math.isnan(se["b/sigma^2"])
    assert np.isfinite(se["residual/sigma^2"]) and se["residual/sigma^2"] > 0
    assert "not identified" in result.summary()


def test_unidentified_params_reads_the_scaled_null_space():
    ai = torch.tensor([[1e-8, 1e-8, 0.0], [1e-8, 1e-8, 0.0], [0.0, 0.0, 1e6]], dtype=DT)
    assert unidentified_params(ai, ["a", "b", "c"]) == ["a", "b"]
    ai = torch.tensor([[1e-8, 0.0], [0.0, 1e6]], dtype=DT)      # badly scaled, not singular
    assert unidentified_params(ai, ["a", "b"]) == []


def small_random_slope(seed):
    g = torch.Generator().manual_seed(seed)
    n, per = 30, 5
    subject = torch.arange(n) // per
    t = (torch.arange(n) % per).to(DT)
    Z = torch.zeros(n, 12, dtype=DT)
    Z[torch.arange(n), 2 * subject] = 1.0
    Z[torch.arange(n), 2 * subject + 1] = t
    X = torch.stack([torch.ones(n, dtype=DT), t, torch.randn(n, generator=g, dtype=DT)], 1)
    y = X @ torch.tensor([1.0, 0.5, -0.3], dtype=DT) + torch.randn(n, generator=g, dtype=DT)
    model = MixedModel(
        random={"subject": (Z, KroneckerProduct(levels=IdentityMatrix(6),
                                                 terms=UnconstrainedMatrix(2)))},
        residual=Grouped(serial=AR1Matrix(per), groups=subject))
    return model, y, X, 0.3 * torch.randn(model.num_free_params, generator=g, dtype=DT)


@pytest.mark.parametrize("seed", [1, 7])
def test_a_vanished_cholesky_column_is_reflected_not_trapped(seed):
    """A rank-one G reached from a random start: L[0,0] at zero with the likelihood rising
    towards negative values was a trap that "converged" 0.05-0.7 below the optimum. Its
    column is reflected (V unchanged) and the fit reaches L-BFGS's optimum."""
    model, y, X, free = small_random_slope(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = fit(model, y, X, optimizer="lbfgs").loglik
        model.reset_parameters()
        result = fit(model, y, X, start=free)
    assert result.converged
    assert result.loglik == pytest.approx(best, abs=1e-6)


def test_param_roles():
    assert ParamSpec("v", 0.0, ExpPow2()).role == "variance"
    assert ParamSpec("s", 0.0, Exp()).role == "sd"
    assert ParamSpec("r", 0.0, correlation(-1.0)).role == "correlation"
    assert ParamSpec("c", 0.0, Identity()).role == "free"
    assert ParamSpec("c", 0.0, Identity(), role="loading").scale_power == 1
    with pytest.raises(ValueError, match="role of parameter 'c' must be one of"):
        ParamSpec("c", 0.0, Identity(), role="slope")
    assert UnconstrainedMatrix(2).free_param_roles == ["sd", "loading", "sd"]
    op = KroneckerProduct(a=AR1Matrix(2), b=UnconstrainedMatrix(2))
    assert op.free_param_roles == ["variance", "correlation", "sd", "loading", "sd"]
    assert op.sign_reflections() == {2: [3], 4: []}

    def fn(theta):
        return theta[0] * torch.eye(2, dtype=theta.dtype) + theta[1]

    V = SimpleMatrix(fn, (2, 2), {"sigma^2": (0.0, ExpPow2()), "c": (0.0, Identity(), "loading")})
    assert V.free_param_roles == ["variance", "loading"]
    scale = ParameterScale(V, data_variance=100.0)
    torch.testing.assert_close(scale.free_units(), torch.tensor([0.5, 10.0], dtype=DT))


def test_lbfgs_line_search_outside_the_positive_definite_region_stops_clearly():
    """A trial point with V not positive definite made L-BFGS raise from inside the line search
    (or turn every parameter NaN): it now stops at its last good point with a warning."""
    y = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=DT)
    V = SimpleMatrix(lambda t: t[0] * torch.eye(20, dtype=t.dtype), (20, 20),
                     {"c": (0.0, Identity(), "variance")})
    with pytest.warns(UserWarning, match="last point where V is positive definite"):
        result = fit(V, y, start={"c": 100.0}, optimizer="lbfgs")
    assert not result.converged and result.params["c"] == 100.0
    assert fit(V, y, start={"c": 0.05}, optimizer="lbfgs").params["c"] == pytest.approx(
        float(y.var()), rel=1e-6)
