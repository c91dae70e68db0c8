"""The formula front end (covmodules.lmm) against R: every oracle fit from its R call, model
matrices, contrasts and fits of tests/data/formula_reference.json (scripts/r_reference_formula.R)."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import lmm, lmm_model
from covmodules.config import SpecError
from covmodules.formula import compile_formula
from covmodules.specs import ModelSpec
from covmodules.terms import FormulaDesign

from oracle import load_oracle, model_ids
from test_oracle import r_comparable

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "formula_reference.json").read_text())
FITS = {f["id"]: f for f in REF["fits"]}
NLME = {"corAR1": "ar1", "corCompSymm": "cs", "corCAR1": "car1", "corSymm": "us"}


def from_r_call(call: str) -> tuple[str, str | None]:
    """``(formula, correlation)`` of an lmer / lme / gls call, as lmm takes them."""
    formula = re.match(r"^\w+\((.+?~.+?),\s*(random|data)\b", call).group(1).strip()
    random = re.search(r"random = ~\s*(.+?),\s*(data|correlation)\b", call)
    if random:
        formula += f" + ({random.group(1).strip()})"
    corr = re.search(r"correlation = (\w+)\(form = ~\s*(.+?)\)", call)
    return formula, (f"{NLME[corr.group(1)]}({corr.group(2).strip()})" if corr else None)


def cake() -> pd.DataFrame:
    df = pd.read_csv(DATA / "cake.csv", dtype={"replicate": str, "recipe": str})
    df["temperature"] = pd.Categorical(df.temperature.astype(str), ordered=True,
                                       categories=["175", "185", "195", "205", "215", "225"])
    return df


def orthodont() -> pd.DataFrame:
    return load_oracle("f1")[0]


def test_r_calls_translate():
    assert from_r_call("lme(y ~ x, random = ~ 1 | g, data = d, correlation = "
                       "corAR1(form = ~ 1 | g), method = \"REML\")") == ("y ~ x + (1 | g)",
                                                                        "ar1(1 | g)")


@pytest.mark.parametrize("model_id", model_ids())
def test_every_oracle_fit_from_its_r_formula(model_id):
    """The R call's formula through lmm equals R as test_oracle requires of the hand-built model."""
    df, spec = load_oracle(model_id)
    formula, correlation = from_r_call(spec["call"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = lmm(formula, df, correlation=correlation)
    assert result.converged and result.iterations <= 20
    assert abs(result.loglik - spec["logLik_REML"]) < 1e-6
    fe = result.fixed_effects["estimate"]
    assert list(fe.index) == list(spec["fixed_effects"])
    for name, value in spec["fixed_effects"].items():
        assert fe[name] == pytest.approx(value, rel=1e-6, abs=1e-9)
    for key, (ours, ref) in r_comparable(result.model, spec).items():
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("case", REF["model_matrix"], ids=lambda c: c["rhs"])
def test_model_matrix_matches_r(case):
    df = cake() if "recipe" in case["rhs"] or "temperature" in case["rhs"] else orthodont()
    design = FormulaDesign(case["rhs"], df)
    assert design.names == case["names"]
    np.testing.assert_allclose(design.matrix.numpy(), np.array(case["matrix"]), atol=1e-12)
    np.testing.assert_allclose(design.evaluate(df.iloc[::-1]).numpy(),
                               np.array(case["matrix"])[::-1], atol=1e-12)


def _check_fit(result, ref, tol=1e-6):
    assert abs(result.loglik - ref["logLik"]) < tol
    fe = result.fixed_effects["estimate"]
    assert list(fe.index) == list(ref["fixed_effects"])
    for name, value in ref["fixed_effects"].items():
        assert fe[name] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_cake_ordered_temperature_gets_polynomial_contrasts():
    ref = FITS["cake"]
    _check_fit(lmm("angle ~ recipe * temperature + (1 | recipe:replicate)", cake()), ref)
    treatment = cake().assign(temperature=lambda d: d.temperature.astype(str))
    other = lmm("angle ~ recipe * temperature + (1 | recipe:replicate)", treatment)
    assert abs(other.loglik - ref["logLik"]) > 1.0      # treatment coding: another REML


def test_nested_grouping_expands_as_lme4():
    result = lmm("angle ~ recipe + temperature + (1 | replicate/recipe)", cake())
    assert result.model.term_names == ["recipe:replicate", "replicate"]
    _check_fit(result, FITS["cake_nested"])
    sd = {(v["grp"]): v["vcov"] for v in FITS["cake_nested"]["varcorr"]}
    assert result.params["recipe:replicate/sigma^2"] == pytest.approx(sd["recipe:replicate"],
                                                                      rel=1e-4)


@pytest.mark.parametrize("fit_id, formula, kwargs", [
    ("orthodont_slope", "distance ~ age * Sex + (age | Subject)", {}),
    ("orthodont_poly", "distance ~ poly(age, 2) + scale(age^2) + Sex + (1 | Subject)", {}),
    ("sleep_indep", "Reaction ~ Days + (Days || Subject)", {}),
    ("sleep_ml", "Reaction ~ Days + (1 | Subject)", {"reml": False}),
    ("sleep_weights", "Reaction ~ Days + (Days | Subject)", {"weights": "w"}),
])
def test_lme4_fits(fit_id, formula, kwargs):
    df = orthodont() if "distance" in formula else load_oracle("a")[0]
    df = df.assign(w=np.tile([1.0, 2.0, 0.5], len(df) // 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # orthodont_poly: lme4's aliased column
        _check_fit(lmm(formula, df, **kwargs), FITS[fit_id])


@pytest.mark.parametrize("fit_id, formula, correlation", [
    ("ovary_car1", "follicles ~ sin(2 * pi * Time) + cos(2 * pi * Time)", "car1(Time | Mare)"),
])
def test_nlme_residual_correlations(fit_id, formula, correlation):
    _check_fit(lmm(formula, load_oracle("g1")[0], correlation=correlation), FITS[fit_id])


def test_unstructured_residual_is_corsymm_with_varident():
    _check_fit(lmm("distance ~ age * Sex", orthodont(), correlation="us(age | Subject)"),
               FITS["orthodont_us"])


@pytest.mark.parametrize("structure", ["us", "diag", "cs", "toep", "ar1", "rr"])
def test_glmmtmb_structured_terms(structure):
    ref = FITS[f"tmb_{structure}"]
    sim = pd.read_csv(DATA / "sim_structured.csv")
    result = lmm(ref["formula"], sim)
    assert result.converged
    assert abs(result.loglik - ref["logLik"]) < 1e-6
    fe = result.fixed_effects["estimate"]
    for name, value in ref["fixed_effects"].items():
        assert fe[name] == pytest.approx(value, rel=1e-4, abs=1e-5)
    name = result.model.term_names[0]
    G = result.model._modules[name].terms().detach()
    torch.testing.assert_close(G, torch.tensor(ref["cov"], dtype=torch.float64),
                               rtol=1e-3, atol=1e-3)


def test_yaml_spec_takes_a_formula_and_overrides_one_key():
    df = load_oracle("a")[0]
    spec = ModelSpec.from_dict({"formula": "Reaction ~ Days + (Days | Subject)",
                                "random": {"Subject": {"structure": "diag"}}})
    assert spec.random["Subject"].structure == "diag"
    assert spec.random["Subject"].formula == "Days"
    problem = spec.build(df)
    assert problem.model.free_param_names == ["Subject/terms/sigma^2[0]",
                                              "Subject/terms/sigma^2[1]", "residual/sigma^2"]


@pytest.mark.parametrize("formula, correlation, message", [
    ("y ~ x + foo(1 | g)", None, "unknown covariance structure 'foo' in term 'foo(1 | g)'"),
    ("y ~ x + (1 | g", None, "unbalanced parentheses"),
    ("y ~ x + 1 | g", None, "cannot read term '1 | g'"),
    ("y ~ x + rr(x | g, k = 2)", None, "unexpected argument 'k = 2' in term 'rr(x | g, k = 2)'"),
    ("y ~ x + (x ||| g)", None, "cannot read term '(x ||| g)'"),
    ("y ~ x", "ar2(1 | g)", "correlation: unknown correlation 'ar2(1 | g)'"),
    ("y ~ x", "car1(1 | g)", "car1 needs a time column"),
    ("x", None, "expected a formula"),
])
def test_unknown_syntax_points_at_the_term(formula, correlation, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        compile_formula(formula, correlation)


def test_bad_columns_name_the_key():
    df = load_oracle("a")[0]
    with pytest.raises(SpecError, match=r"formula: cannot build the terms 'Dayz'.*Dayz"):
        lmm_model("Reaction ~ Dayz + (1 | Subject)", df)
    with pytest.raises(SpecError, match=r"random.Subject: cannot build the terms 'Dayz'"):
        lmm_model("Reaction ~ Days + (Dayz | Subject)", df)
    with pytest.raises(SpecError, match=r"random.Subjekt.group: unknown column 'Subjekt'"):
        lmm_model("Reaction ~ Days + (1 | Subjekt)", df)


def test_modular_path_equals_lmm():
    df = load_oracle("a")[0]
    m = lmm_model("Reaction ~ Days + (Days | Subject)", df)
    objective = m.objective()
    assert objective.loglik() == pytest.approx(m.objective(reml=True).loglik())
    from covmodules.optim import AIREML
    run = AIREML(objective).run()
    assert -float(run.state.neg_loglik) == pytest.approx(lmm(
        "Reaction ~ Days + (Days | Subject)", df).loglik, abs=1e-8)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_heterogeneous_structures_gradients(n):
    from covmodules import HeterogeneousCSMatrix, HeterogeneousToeplitzMatrix
    from covmodules.testing import check_gradients
    for module in (HeterogeneousCSMatrix(n), HeterogeneousToeplitzMatrix(n)):
        check_gradients(module)


def test_separable_spatial_correlation_with_nugget_matches_nlme():
    ref = json.loads((DATA / "scale_reference_iv_a.json").read_text())
    df = pd.read_csv(DATA.parent.parent / "data/sim_field_40x40.csv")
    for col, levels in ref["levels"].items():
        df[col] = pd.Categorical(df[col], categories=levels)
    result = lmm("y ~ block + genotype", df, correlation="ar1(row):ar1(col)")
    assert result.solver == "kronecker"
    assert abs(result.loglik - ref["logLik_REML"]) < 1e-6
    assert result.params["residual/field/row/rho"] == pytest.approx(ref["residual"]["rho_row"],
                                                                    rel=1e-4)
