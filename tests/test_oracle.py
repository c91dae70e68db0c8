"""REML fits of the 8 shared oracle models match lme4 / nlme (tests/data/reference.json)."""

import warnings

import pytest
import torch

from covmodules import KroneckerProduct, fit

from oracle import build, term_name


def r_comparable(model, spec):
    """Variance components on R's natural scale, keyed like reference.json."""
    out = {}
    for ref in spec["random"]:
        G = model._modules[term_name(ref)]
        cov = (G.terms.covariance() if isinstance(G, KroneckerProduct)
               else torch.tensor([[G.get_param("sigma^2")]], dtype=torch.float64))
        out[ref["label"]] = (cov, torch.tensor(ref["cov"], dtype=torch.float64))
    res = spec["residual"]
    prefix = "residual/" if res["type"] == "iid" else "residual/within/"
    out["sigma2"] = (torch.tensor(model.get_param(prefix + "sigma^2"), dtype=torch.float64),
                     torch.tensor(res["sigma2"], dtype=torch.float64))
    if "rho" in res:
        out["rho"] = (torch.tensor(model.get_param(prefix + "rho"), dtype=torch.float64),
                      torch.tensor(res["rho"], dtype=torch.float64))
    return out


@pytest.mark.parametrize("model_id", ["a", "b", "c", "d", "f1", "f2", "g1", "g2"])
def test_ai_reml_matches_r(model_id):
    model, y, X, names, spec = build(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fit(model, y, X, x_names=names)
    print(f"{spec['id']}: {result.iterations} AI-REML iterations, logLik {result.loglik:.10f} "
          f"(R {spec['logLik_REML']:.10f})")
    assert result.converged and result.iterations <= 20
    assert abs(result.loglik - spec["logLik_REML"]) < 1e-6
    fe = result.fixed_effects["estimate"]
    for name, value in spec["fixed_effects"].items():
        assert fe[name] == pytest.approx(value, rel=1e-6, abs=1e-9)
    for key, (ours, ref) in r_comparable(model, spec).items():
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()),
                                   msg=f"{key}: {ours} vs R {ref}")


@pytest.mark.parametrize("model_id", ["a", "g2"])
def test_lbfgs_reaches_the_same_optimum(model_id):
    model, y, X, names, spec = build(model_id)
    result = fit(model, y, X, x_names=names, optimizer="lbfgs")
    assert result.converged
    assert abs(result.loglik - spec["logLik_REML"]) < 1e-6
    for key, (ours, ref) in r_comparable(model, spec).items():
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_random_effects_table_matches_lme4_for_sleepstudy():
    model, y, X, names, spec = build("a")
    table = fit(model, y, X, x_names=names).random_effects()
    ref = spec["random"][0]
    assert list(table["name"]) == ["(Intercept)", "Days"]
    assert table["variance"].tolist() == pytest.approx(ref["variances"], rel=1e-4)
    assert table["corr (Intercept)"].iloc[1] == pytest.approx(ref["cor"][0][1], rel=1e-3)
