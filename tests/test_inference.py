"""Inference on fits against lme4 / lmerTest (tests/data/inference_reference.json, written by
scripts/r_reference_inference.R): VarCorr, conditional SDs of the BLUPs, Satterthwaite t tests,
Wald and profile intervals, likelihood-ratio tests; natural-scale output; simulate."""

import functools
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from covmodules import (AR1Matrix, FactorAnalyticMatrix, Grouped, IdentityMatrix,
                        KroneckerProduct, MixedModel, ScalarMatrix, UnconstrainedMatrix, fit)
from covmodules.design import fixed_design, random_design
from covmodules.inference import anova, format_pvalue
from covmodules.natural import covariance_summary, natural_params
from covmodules.profile import Coordinates

from oracle import DATA, load_oracle

REF = json.loads((DATA / "inference_reference.json").read_text())
MODELS = {m["id"]: m for m in REF["models"]}
#: the R models: data set, response, fixed terms, random terms of (Subject)
SPECS = {"sleep_corr": ("a", "Reaction", ["Days"], ["1", "Days"]),
         "sleep_ri": ("a", "Reaction", ["Days"], ["1"]),
         "ortho_corr": ("f1", "distance", ["age", "Sex", "Sex:age"], ["1", "age"]),
         "ortho_ri": ("f1", "distance", ["age", "Sex"], ["1"])}
#: lme4's parameter names -> ours (Subject/terms/...: the Kronecker factor of the term)
LME4_NAMES = {"sd_(Intercept)|Subject": "sd[0]", "sigma": "residual/sd",
              "cor_Days.(Intercept)|Subject": "rho[1,0]", "sd_Days|Subject": "sd[1]",
              "cor_age.(Intercept)|Subject": "rho[1,0]", "sd_age|Subject": "sd[1]",
              "age:SexFemale": "SexFemale:age"}


def build(model_id):
    """``(model, y, X, names)`` of an R model: ``(terms | Subject)`` with an unstructured G
    (a scalar one for a random intercept) and an iid residual, R's level order."""
    data_id, response, fixed, terms = SPECS[model_id]
    df, spec = load_oracle(data_id)
    X = fixed_design(df, fixed, levels=spec["levels"])
    Z = random_design(df, "Subject", terms, levels=spec["levels"]["Subject"])
    G = (KroneckerProduct(levels=IdentityMatrix(Z.num_levels),
                          terms=UnconstrainedMatrix(len(terms)))
         if len(terms) > 1 else ScalarMatrix(Z.num_levels))
    model = MixedModel(random={"Subject": (Z, G)}, residual=ScalarMatrix(len(df)))
    y = torch.tensor(df[response].to_numpy(), dtype=torch.float64)
    return model, y, X.matrix, X.names


@functools.cache
def fitted(model_id, method="reml"):
    model, y, X, names = build(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fit(model, y, X, x_names=names, method=method)


def ours(name: str) -> str:
    name = LME4_NAMES.get(name, name)
    return f"Subject/terms/{name}" if name.startswith(("sd[", "rho[")) else name


def scalar_names(model_id, name):
    """A random-intercept model's G is a ScalarMatrix: its SD is ``Subject/sd``."""
    return "Subject/sd" if name == "Subject/terms/sd[0]" and "_ri" in model_id else name


# --------------------------------------------------------------------------- VarCorr
@pytest.mark.parametrize("model_id", list(SPECS))
def test_varcorr_matches_lme4(model_id):
    r, ref = fitted(model_id), MODELS[model_id]["varcorr"]
    table = r.varcorr()
    assert list(table.columns) == ["group", "name1", "name2", "variance", "std_dev", "corr"]
    assert list(table["group"]) == [g if g == "Residual" else "Subject" for g in ref["grp"]]
    assert list(table["name1"].fillna("NA")) == [v or "NA" for v in ref["var1"]]
    np.testing.assert_allclose(table["variance"], ref["vcov"], rtol=1e-5)
    diag = table["name2"].isna().to_numpy()
    np.testing.assert_allclose(table["std_dev"][diag], np.array(ref["sdcor"])[diag], rtol=1e-5)
    np.testing.assert_allclose(table["corr"][~diag], np.array(ref["sdcor"])[~diag], rtol=1e-4)


def test_summary_random_effects_table_has_the_residual_row():
    r = fitted("sleep_corr")
    random = r.random_effects(residual=True)
    assert list(random["group"]) == ["Subject", "Subject", "Residual"]
    assert random["variance"].iloc[-1] == pytest.approx(r.params["residual/sigma^2"])
    summary = r.summary()
    assert "Residual" in summary
    table = summary[summary.index("Covariance parameters:"):summary.index("as estimated")]
    assert "Subject/terms/rho[1,0]" in table and "L[0,0]" not in table
    assert "Subject/terms/L[1,0]" in summary[summary.index("as estimated"):]


# ---------------------------------------------------------------------- natural scale
def test_params_show_variances_sds_and_correlations_next_to_the_cholesky_entries():
    r = fitted("sleep_corr")
    G = r.model.Subject.terms.covariance()
    p = r.params
    assert p["Subject/terms/L[0,0]"] == pytest.approx(float(G[0, 0]) ** 0.5)      # raw kept
    assert p["Subject/terms/sigma^2[1]"] == pytest.approx(float(G[1, 1]))
    assert p["Subject/terms/sd[1]"] == pytest.approx(float(G[1, 1]) ** 0.5)
    assert p["Subject/terms/rho[1,0]"] == pytest.approx(float(G[1, 0] / (G[0, 0] * G[1, 1]).sqrt()))
    table = r.param_table()
    assert list(table.index) == ["Subject/terms/sigma^2[0]", "Subject/terms/sigma^2[1]",
                                 "Subject/terms/sd[0]", "Subject/terms/sd[1]",
                                 "Subject/terms/rho[1,0]", "residual/sigma^2"]
    raw = r.param_table(raw=True)
    assert list(raw.index)[:3] == ["Subject/terms/L[0,0]", "Subject/terms/L[1,0]",
                                   "Subject/terms/L[1,1]"]
    # delta method: sd[0] = L[0,0], sigma^2[0] = L[0,0]^2
    se = raw["std_error"]["Subject/terms/L[0,0]"]
    assert table["std_error"]["Subject/terms/sd[0]"] == pytest.approx(se, rel=1e-10)
    assert table["std_error"]["Subject/terms/sigma^2[0]"] == pytest.approx(
        2 * p["Subject/terms/L[0,0]"] * se, rel=1e-10)
    assert table["estimate"]["residual/sigma^2"] == raw["estimate"]["residual/sigma^2"]


@pytest.mark.parametrize("structure", [UnconstrainedMatrix(3), FactorAnalyticMatrix(4, 2)],
                         ids=lambda s: type(s).__name__)
def test_natural_scale_of_factor_structures_reads_the_matrix(structure):
    torch.manual_seed(3)
    structure.set_free_params(torch.randn(structure.num_free_params, dtype=torch.float64))
    V = structure().detach()
    values = natural_params(structure)
    sd = V.diagonal().sqrt()
    for i in range(V.shape[0]):
        assert values[f"sigma^2[{i}]"] == pytest.approx(float(V[i, i]), rel=1e-12)
        assert values[f"sd[{i}]"] == pytest.approx(float(sd[i]), rel=1e-12)
        for j in range(i):
            assert values[f"rho[{i},{j}]"] == pytest.approx(float(V[i, j] / (sd[i] * sd[j])),
                                                            rel=1e-12)
    assert set(covariance_summary(V)) <= set(values)


def test_structures_on_the_natural_scale_are_unchanged():
    model = Grouped(AR1Matrix(3), groups=torch.arange(6) // 3)
    assert natural_params(model) == model.params


def test_profile_coordinates_round_trip():
    torch.manual_seed(4)
    model = MixedModel(random={"g": (torch.eye(6).repeat(2, 1)[:, :6],
                                     KroneckerProduct(levels=IdentityMatrix(2),
                                                      terms=UnconstrainedMatrix(3)))},
                       residual=ScalarMatrix(12))
    free = torch.randn(model.num_free_params, dtype=torch.float64)
    coords = Coordinates(model)
    assert coords.names == ["g/terms/sd[0]", "g/terms/rho[1,0]", "g/terms/rho[2,0]",
                            "g/terms/sd[1]", "g/terms/rho[2,1]", "g/terms/sd[2]", "residual/sd"]
    u = coords.from_free(free, model)
    torch.testing.assert_close(coords.to_free(u), free, rtol=1e-10, atol=1e-10)
    G = model.g.terms._evaluate(model.build_params(free)[:6])
    assert math.exp(u[0]) == pytest.approx(float(G[0, 0]) ** 0.5)
    assert math.tanh(u[2]) == pytest.approx(float(G[2, 0] / (G[0, 0] * G[2, 2]).sqrt()))


# ----------------------------------------------------------------------------- ranef
@pytest.mark.parametrize("model_id", list(SPECS))
def test_conditional_sds_match_lme4_condvar(model_id):
    r, ref = fitted(model_id), MODELS[model_id]["ranef"]
    table = r.ranef(condvar=True)
    assert list(table.columns) == ["group", "term", "level", "condval", "condsd"]
    assert list(table["level"]) == ref["grp"] and list(table["term"]) == ref["term"]
    np.testing.assert_allclose(table["condval"], ref["condval"], rtol=1e-4,
                               atol=1e-6 * np.abs(ref["condval"]).max())
    np.testing.assert_allclose(table["condsd"], ref["condsd"], rtol=1e-5)
    assert "condsd" not in r.ranef(condvar=False)


# --------------------------------------------------------------------- Satterthwaite
@pytest.mark.parametrize("model_id", list(SPECS))
def test_satterthwaite_t_tests_match_lmertest(model_id):
    r, ref = fitted(model_id), MODELS[model_id]["satterthwaite"]
    fe = r.fixed_effects
    assert list(fe.columns) == ["estimate", "std_error", "df", "t", "p_value"]
    assert list(fe.index) == [LME4_NAMES.get(n, n) for n in ref["names"]]
    np.testing.assert_allclose(fe["std_error"], ref["std_error"], rtol=1e-5)
    np.testing.assert_allclose(fe["df"], ref["df"], rtol=1e-5)
    np.testing.assert_allclose(fe["t"], ref["t"], rtol=1e-5)
    np.testing.assert_allclose(fe["p_value"], ref["p_value"], rtol=1e-3)


@pytest.mark.parametrize("model_id, solvers", [("a", ["grouped", "woodbury", "mme"]),
                                               ("d", ["woodbury", "mme"])])
def test_satterthwaite_and_conditional_sds_agree_over_solvers(model_id, solvers, one_thread):
    """Every solver gives the dense solver's df (to the central differences of the Hessian)
    and conditional SDs: sleepstudy and Penicillin's crossed ``(1|plate) + (1|sample)``."""
    from oracle import build as build_oracle

    def run(solver):
        model, y, X, names, _ = build_oracle(model_id)
        r = fit(model, y, X, x_names=names, solver=solver)
        assert r.solver == solver
        return r.fixed_effects["df"].to_numpy(), r.ranef()["condsd"].to_numpy()

    df, sd = run("dense")
    for solver in solvers:
        df_s, sd_s = run(solver)
        np.testing.assert_allclose(df_s, df, rtol=1e-7, err_msg=solver)
        np.testing.assert_allclose(sd_s, sd, rtol=1e-9, err_msg=solver)


def test_p_values_print_as_r_does():
    assert format_pvalue(1e-300) == "< 2e-16" and format_pvalue(0.0) == "< 2e-16"
    assert format_pvalue(3.26379e-06) == "3.264e-06" and format_pvalue(0.52366) == "0.5237"
    summary = fitted("sleep_corr").summary()
    assert "< 2e-16" in summary and "e-297" not in summary and "e-17" not in summary


# ------------------------------------------------------------------------- intervals
@pytest.mark.parametrize("model_id", list(SPECS))
def test_wald_intervals_match_lme4(model_id):
    ci, ref = fitted(model_id).confint("wald"), MODELS[model_id]["confint_wald"]
    assert list(ci.columns) == ["2.5 %", "97.5 %"]
    assert list(ci.index) == [LME4_NAMES.get(n, n) for n in ref["names"]]
    np.testing.assert_allclose(ci["2.5 %"], ref["lower"], rtol=1e-7)
    np.testing.assert_allclose(ci["97.5 %"], ref["upper"], rtol=1e-7)


@pytest.mark.parametrize("model_id", ["sleep_corr", "ortho_ri"])
def test_profile_intervals_match_the_ml_profile_of_lme4(model_id, one_thread):
    """Against the exact roots of lme4's ML deviance profile (R: bobyqa / nlminb inside
    uniroot) to 1e-6, and against lme4's spline-interpolated ``confint`` to its own
    accuracy (it interpolates the profile between points, 1e-4 here)."""
    ci = fitted(model_id).confint("profile")
    exact, spline = MODELS[model_id]["confint_profile_exact"], MODELS[model_id]["confint_profile"]
    names = [scalar_names(model_id, ours(n)) for n in exact]
    assert list(ci.index) == names
    np.testing.assert_allclose(ci.to_numpy(), np.array(list(exact.values())), rtol=1e-6)
    np.testing.assert_allclose(ci.to_numpy(), np.column_stack([spline["lower"],
                                                               spline["upper"]]), rtol=1e-4)


def test_profile_of_a_reml_fit_is_that_of_the_ml_refit(one_thread):
    r, ml = fitted("sleep_ri"), fitted("sleep_ri", "ml")
    ci = r.confint(parm=["Subject/sd", "Days"])
    exact = MODELS["sleep_ri"]["confint_profile_exact"]
    np.testing.assert_allclose(ci.to_numpy(), [exact["sd_(Intercept)|Subject"], exact["Days"]],
                               rtol=1e-6)
    pd.testing.assert_frame_equal(ml.confint(parm=["Days"]), ci.loc[["Days"]], rtol=1e-7)
    assert r.model.Subject.get_param("sigma^2") == pytest.approx(
        r.params["Subject/sigma^2"])                 # the fit's model is left as it was


def test_profile_reports_the_limits_it_does_not_cross(one_thread):
    """Orthodont's ``(age | Subject)``: the ML profile of the correlation stays below the
    cut-off on (-1, 1), that of the slope's SD down to 0 (lme4: -1, 1 and 0)."""
    ci = fitted("ortho_corr").confint(parm=["Subject/terms/rho[1,0]", "Subject/terms/sd[1]",
                                            "SexFemale:age"])
    assert ci.loc["Subject/terms/rho[1,0]"].tolist() == [-1.0, 1.0]
    assert ci.loc["Subject/terms/sd[1]", "2.5 %"] == 0.0
    exact = MODELS["ortho_corr"]["confint_profile_exact"]
    assert ci.loc["Subject/terms/sd[1]", "97.5 %"] == pytest.approx(exact["sd_age|Subject"][1],
                                                                    rel=1e-6)
    np.testing.assert_allclose(ci.loc["SexFemale:age"], exact["age:SexFemale"], rtol=1e-6)


def test_profile_ends_of_a_singular_fit_are_where_the_fixed_refit_reaches_the_cut_off(
        one_thread):
    """``(1 | g)`` whose variance estimate is 0: the SD's interval is [0, c] and, refitting
    by ML with the variance fixed at ``c²`` (AI-REML, another optimiser), the deviance is
    the cut-off above the ML minimum (lme4 interpolates linearly here and gives 0.8546)."""
    g = torch.arange(40) // 4
    Z = torch.nn.functional.one_hot(g).double()
    y = torch.tensor([1.0, -1.0, 2.0, -2.0] * 10, dtype=torch.float64) \
        * torch.linspace(1, 2, 40, dtype=torch.float64)

    def model():
        return MixedModel(random={"g": (Z, ScalarMatrix(10))}, residual=ScalarMatrix(40))

    with pytest.warns(UserWarning, match="singular fit"):
        r = fit(model(), y)
        ci = r.confint()
    assert r.boundary == ["g/sigma^2"] and ci.loc["g/sd", "2.5 %"] == 0.0
    dev_ml = -2 * fit(model(), y, method="ml").loglik
    for name, end in [("g/sigma^2", ci.loc["g/sd", "97.5 %"]),
                      ("residual/sigma^2", ci.loc["residual/sd", "2.5 %"]),
                      ("residual/sigma^2", ci.loc["residual/sd", "97.5 %"])]:
        held = model()
        held.fix(name, end ** 2)
        dev = -2 * fit(held, y, method="ml").loglik
        assert dev - dev_ml == pytest.approx(3.841458820694124, abs=1e-7), name
    assert ci.loc["g/sd", "97.5 %"] == pytest.approx(0.8524, abs=1e-4)


def test_confint_refuses_bad_arguments():
    r = fitted("sleep_ri")
    with pytest.raises(ValueError, match="method must be 'profile' or 'wald'"):
        r.confint("boot")
    with pytest.raises(ValueError, match=r"level must be a number in \(0, 1\)"):
        r.confint("wald", level=95)
    with pytest.raises(ValueError, match="parm: unknown parameter"):
        r.confint(parm=["Subject/sigma"])


# ------------------------------------------------------------------------------- LRT
@pytest.mark.parametrize("index, pair", [(0, ("sleep_ri", "sleep_corr")),
                                         (1, ("ortho_ri", "ortho_corr"))])
def test_likelihood_ratio_test_matches_lme4_anova(index, pair, capsys):
    ref = REF["anova"][index]
    table = anova(fitted(pair[1]), fitted(pair[0]), names=["m1", "m0"])
    assert "refitting model(s) with ML (instead of REML)" in capsys.readouterr().err
    assert list(table.index) == ["m0", "m1"]                    # sorted by npar
    assert list(table.columns) == ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df",
                                   "Pr(>Chisq)"]
    assert table["npar"].tolist() == ref["npar"]
    for ours_col, ref_col in [("AIC", "AIC"), ("BIC", "BIC"), ("logLik", "logLik"),
                              ("deviance", "deviance")]:
        np.testing.assert_allclose(table[ours_col], ref[ref_col], rtol=1e-9)
    assert np.isnan(table["Chisq"].iloc[0])
    assert table["Chisq"].iloc[1] == pytest.approx(ref["Chisq"][1], rel=1e-6)
    assert table["Df"].iloc[1] == ref["Df"][1]
    assert table["Pr(>Chisq)"].iloc[1] == pytest.approx(ref["p"][1], rel=1e-5)
    assert fitted(pair[0]).method == "REML"                     # the fits are left as they were


def test_anova_refuses_fits_of_other_data():
    other = build("sleep_ri")
    y = other[1] + torch.linspace(0, 1, len(other[1]), dtype=torch.float64)
    with pytest.raises(ValueError, match="fitted to another response"):
        anova(fitted("sleep_ri"), fit(other[0], y, other[2], x_names=other[3]))
    with pytest.raises(ValueError, match="at least two fits"):
        anova(fitted("sleep_ri"))


# -------------------------------------------------------------------------- simulate
def test_simulate_has_the_fitted_mean_and_covariance():
    r = fitted("sleep_corr")
    sims = r.simulate(4000, seed=11)
    assert sims.shape == (180, 4000) and list(sims.columns[:2]) == ["sim_1", "sim_2"]
    V = r.model(r.free).detach().numpy()
    mean = r.fitted(conditional=False)
    draws = sims.to_numpy()
    np.testing.assert_array_less(np.abs(draws.mean(1) - mean), 5 * np.sqrt(np.diag(V) / 4000))
    block = np.cov(draws[:10])                            # one subject's 10 days
    sd = np.sqrt(np.diag(V)[:10])
    np.testing.assert_array_less(np.abs(block - V[:10, :10]),
                                 5 * np.sqrt(2 / 4000) * np.outer(sd, sd))
    assert abs(np.cov(draws[0], draws[10])[0, 1]) < 5 * V[0, 0] / np.sqrt(4000)  # subjects apart
    pd.testing.assert_frame_equal(r.simulate(3, seed=5), r.simulate(3, seed=5))
    assert not np.allclose(sims["sim_1"], sims["sim_2"])    # new effects every draw


def test_simulate_from_a_model_without_random_terms():
    torch.manual_seed(0)
    model = Grouped(time=AR1Matrix(4), groups=torch.arange(400) // 4)
    model.set_params({"time/sigma^2": 2.0, "time/rho": 0.6})
    y = torch.linalg.cholesky(model().detach()) @ torch.randn(400, dtype=torch.float64)
    r = fit(model, y)
    draws = r.simulate(3000, seed=1).to_numpy()
    V = r.model(r.free).detach().numpy()
    np.testing.assert_array_less(np.abs(np.cov(draws[:4]) - V[:4, :4]),
                                 5 * np.sqrt(2 / 3000) * V[0, 0])
    with pytest.raises(ValueError, match="nsim must be a positive integer"):
        r.simulate(0)


def test_tensorboard_and_checkpoints_show_the_natural_scale(tmp_path, one_thread):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from training import REMLModule

    model, y, X, names = build("sleep_corr")
    module = REMLModule(model, y, X, names)
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    L.Trainer(default_root_dir=tmp_path, max_epochs=50, logger=logger,
              callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
              enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", log_every_n_steps=1).fit(module)
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    params = module.result.params
    for name in ["Subject/terms/sigma^2[0]", "Subject/terms/sd[1]", "Subject/terms/rho[1,0]",
                 "Subject/terms/L[1,0]", "residual/sigma^2"]:
        assert events.Scalars(f"param/{name}")[-1].value == pytest.approx(params[name])
    assert params["Subject/terms/rho[1,0]"] == pytest.approx(
        MODELS["sleep_corr"]["varcorr"]["sdcor"][2], rel=1e-4)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["params"]
    assert saved == pytest.approx(params)
