"""REML engine: losses, gradients, AI matrix, estimates and bad input, against dense references."""

import math

import numpy as np
import pytest
import torch

from covmodules import (AR1Matrix, Grouped, IdentityMatrix, KroneckerProduct, MixedModel,
                        REMLLoss, ScalarMatrix, UnconstrainedMatrix, fit, ml_loss, reml_loss)
from covmodules.linalg import NotPositiveDefiniteError
from covmodules.linalg.dense import NegLogLikFunction
from covmodules.reml import REML

DT = torch.float64


def small_problem(seed=0, n_groups=6, per=5):
    g = torch.Generator().manual_seed(seed)
    n = n_groups * per
    subject = torch.arange(n) // per
    t = (torch.arange(n) % per).to(DT)
    Z = torch.zeros(n, 2 * n_groups, dtype=DT)
    Z[torch.arange(n), 2 * subject] = 1.0
    Z[torch.arange(n), 2 * subject + 1] = t
    X = torch.stack([torch.ones(n, dtype=DT), t, torch.randn(n, generator=g, dtype=DT)], 1)
    y = X @ torch.tensor([1.0, 0.5, -0.3], dtype=DT) + torch.randn(n, generator=g, dtype=DT)
    model = MixedModel(
        random={"subject": (Z, KroneckerProduct(levels=IdentityMatrix(n_groups),
                                                 terms=UnconstrainedMatrix(2)))},
        residual=Grouped(serial=AR1Matrix(per), groups=subject))
    free = 0.3 * torch.randn(model.num_free_params, generator=g, dtype=DT)
    return model, y, X, free


def dense_neg_loglik(V, y, X, method="reml"):
    """Independent numpy reference of -l on R's scale."""
    V, y, X = (a.detach().numpy() for a in (V, y, X))
    n, p = X.shape
    Vi = np.linalg.inv(V)
    A = X.T @ Vi @ X
    beta = np.linalg.solve(A, X.T @ Vi @ y)
    r = y - X @ beta
    out = np.linalg.slogdet(V)[1] + r @ Vi @ r
    if method == "reml":
        return 0.5 * (out + np.linalg.slogdet(A)[1]) + 0.5 * (n - p) * math.log(2 * math.pi)
    return 0.5 * out + 0.5 * n * math.log(2 * math.pi)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_loss_matches_independent_dense_formula(method):
    model, y, X, free = small_problem()
    loss = REML(model, y, X, method=method).loss(free)
    assert float(loss) == pytest.approx(dense_neg_loglik(model(free), y, X, method), rel=1e-12)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_neg_loglik_function_gradcheck_in_v_y_and_x(method):
    g = torch.Generator().manual_seed(3)
    n, p = 7, 2
    A0 = torch.randn(n, n, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT, requires_grad=True)
    X = torch.randn(n, p, generator=g, dtype=DT, requires_grad=True)
    A = A0.clone().requires_grad_(True)

    def f(A, y, X):      # symmetric positive definite V from an unconstrained A
        return NegLogLikFunction.apply(A @ A.T + n * torch.eye(n, dtype=DT), y, X, method)

    assert torch.autograd.gradcheck(f, (A, y, X))


def test_backward_into_module_equals_plain_autograd():
    model, y, X, free = small_problem(seed=1)
    x = free.clone().requires_grad_(True)
    REML(model, y, X).loss(x).backward()

    x2 = free.clone().requires_grad_(True)
    V = model._evaluate(model._natural(model._full_raw(x2)))     # autograd through construction
    n, p = X.shape
    L = torch.linalg.cholesky(V)
    Xs = torch.linalg.solve_triangular(L, X, upper=False)
    ys = torch.linalg.solve_triangular(L, y[:, None], upper=False)[:, 0]
    A = Xs.T @ Xs
    b = torch.linalg.solve(A, Xs.T @ ys)
    rs = ys - Xs @ b
    ref = 0.5 * (2 * L.diagonal().log().sum() + torch.logdet(A) + rs @ rs)
    ref.backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-10)


def test_registered_parameters_receive_gradients_and_mean_reduction():
    model, y, X, _ = small_problem(seed=2)
    loss = REMLLoss(reduction="mean")(model, y, X)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert loss.item() == pytest.approx(float(reml_loss(model, y, X)) / len(y), rel=1e-12)
    assert float(ml_loss(model, y, X)) == pytest.approx(
        dense_neg_loglik(model(), y, X, "ml"), rel=1e-12)


def test_average_information_matches_dense_formula():
    model, y, X, free = small_problem(seed=4)
    obj = REML(model, y, X)
    state = obj.state(free)
    ai = obj.average_information(free, state)
    V = model(free).detach()
    Vi = torch.linalg.inv(V)
    P = Vi - Vi @ X @ torch.linalg.inv(X.T @ Vi @ X) @ X.T @ Vi
    J, _ = model.manual_grad(free)
    Py = P @ y
    U = torch.stack([Jk @ Py for Jk in J], 1)
    torch.testing.assert_close(ai, 0.5 * U.T @ P @ U, rtol=1e-9, atol=1e-10)
    grad = obj.gradient(free, state)
    ref = 0.5 * torch.stack([torch.trace(P @ Jk) - Py @ Jk @ Py for Jk in J])
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-10)


def test_blue_blup_predictions_match_dense_formulas():
    model, y, X, _ = small_problem(seed=7)
    result = fit(model, y, X, x_names=["a", "b", "c"])
    V = model().detach()
    Vi = torch.linalg.inv(V)
    cov = torch.linalg.inv(X.T @ Vi @ X)
    beta = cov @ X.T @ Vi @ y
    np.testing.assert_allclose(result.fixed_effects["estimate"], beta, rtol=1e-8)
    np.testing.assert_allclose(result.fixed_effects["std_error"], cov.diagonal().sqrt(), rtol=1e-8)
    Z = model.design("subject")
    G = model.subject().detach()
    u = G @ Z.T @ Vi @ (y - X @ beta)
    np.testing.assert_allclose(result.blups()["subject"]["blup"], u, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(result.fitted(conditional=False), X @ beta, rtol=1e-8)
    np.testing.assert_allclose(result.fitted(), X @ beta + Z @ u, rtol=1e-7)
    np.testing.assert_allclose(result.residuals(), y - X @ beta - Z @ u, rtol=1e-6, atol=1e-9)
    assert result.aic == pytest.approx(-2 * result.loglik + 2 * (model.num_free_params + 3))
    assert result.bic == pytest.approx(-2 * result.loglik + math.log(len(y)) * (model.num_free_params + 3))
    text = result.summary()
    for part in ["REML", "logLik", "AIC", "BIC", "subject/terms/L[0,0]", "Fixed effects", "a"]:
        assert part in text


def test_blups_indexed_by_level_with_random_design():
    import pandas as pd

    from covmodules.design import random_design
    df = pd.DataFrame({"g": list("aabbcc"), "t": [0.0, 1, 0, 1, 0, 1],
                       "y": [1.0, 2.1, 3.2, 3.9, 0.5, 1.7]})
    rd = random_design(df, "g")
    model = MixedModel(random={"g": (rd, ScalarMatrix(3))}, residual=ScalarMatrix(6))
    result = fit(model, torch.tensor(df.y.values, dtype=DT))
    blups = result.blups()["g"]
    assert list(blups.index) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- bad input
def test_nan_or_inf_in_y_or_x():
    model, y, X, _ = small_problem()
    y_bad = y.clone(); y_bad[3] = float("nan")
    with pytest.raises(ValueError, match="y contains 1 NaN or inf"):
        fit(model, y_bad, X)
    X_bad = X.clone(); X_bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match="X contains 1 NaN or inf"):
        fit(model, y, X_bad)


def test_size_mismatches():
    model, y, X, _ = small_problem()
    with pytest.raises(ValueError, match="X must have shape"):
        fit(model, y, X[:-1])
    with pytest.raises(ValueError, match="covariance model has shape"):
        fit(model, y[:-1], X[:-1])
    with pytest.raises(ValueError, match="Z of random term 'g' has 5 rows"):
        MixedModel(random={"g": (torch.ones(5, 2, dtype=DT), ScalarMatrix(2))},
                   residual=ScalarMatrix(6))
    with pytest.raises(ValueError, match="G of random term 'g' has shape"):
        MixedModel(random={"g": (torch.ones(6, 2, dtype=DT), ScalarMatrix(3))},
                   residual=ScalarMatrix(6))
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        fit(model, y.tolist(), X)


def test_rank_deficient_x_drops_aliased_columns_with_warning():
    model, y, X, _ = small_problem(seed=5)
    X2 = torch.cat([X, (X[:, 1] + 2 * X[:, 2])[:, None]], 1)
    with pytest.warns(UserWarning, match=r"dropping aliased column\(s\) \['combo'\]"):
        result = fit(model, y, X2, x_names=["a", "b", "c", "combo"])
    model.reset_parameters()
    reference = fit(model, y, X, x_names=["a", "b", "c"])
    assert list(result.fixed_effects.index) == ["a", "b", "c"]
    assert result.loglik == pytest.approx(reference.loglik, abs=1e-8)
    assert "dropped aliased" in result.summary()


def test_start_where_v_is_not_positive_definite():
    from covmodules import SimpleMatrix
    from covmodules.transforms import Identity
    n = 5
    y = torch.arange(n, dtype=DT)

    def build(nat):      # 1 on the diagonal, c elsewhere: not positive definite for c >= 1
        return (1 - nat[0]) * torch.eye(n, dtype=nat.dtype) + nat[0]
    model = SimpleMatrix(build, (n, n), {"c": (1.5, Identity())})
    with pytest.raises(NotPositiveDefiniteError, match="start values"):
        fit(model, y)


def test_variance_that_is_truly_zero_is_a_boundary_fit():
    # every group has the same mean: the between-group variance estimate is 0 (lme4: singular)
    y = torch.tensor([1.0, 2, 3, 2, 1, 3, 3, 2, 1, 2, 3, 1], dtype=DT)
    groups = torch.arange(12) // 3
    Z = torch.nn.functional.one_hot(groups).to(DT)
    model = MixedModel(random={"g": (Z, ScalarMatrix(4))}, residual=ScalarMatrix(12))
    with pytest.warns(UserWarning, match="singular fit"):
        result = fit(model, y)
    assert result.converged and result.boundary == ["g/sigma^2"]
    assert math.isfinite(result.loglik)
    assert result.params["g/sigma^2"] < 1e-8
    assert result.params["residual/sigma^2"] == pytest.approx(float(y.var()), rel=1e-6)
    assert "singular fit" in result.summary()


def test_max_iter_reached_warns_and_reports_not_converged():
    model, y, X, _ = small_problem()
    with pytest.warns(UserWarning, match="max_iter=1"):
        result = fit(model, y, X, max_iter=1)
    assert not result.converged and result.iterations == 1


def test_fit_leaves_model_at_estimates_and_torch_optimisers_agree():
    model, y, X, _ = small_problem(seed=6)
    ai = fit(model, y, X)
    assert REML(model, y, X).loglik() == pytest.approx(ai.loglik, abs=1e-10)
    model.reset_parameters()
    lb = fit(model, y, X, optimizer="lbfgs")
    assert lb.loglik == pytest.approx(ai.loglik, abs=1e-6)


def test_unknown_method_and_bad_model():
    model, y, X, _ = small_problem()
    with pytest.raises(ValueError, match="method must be one of"):
        fit(model, y, X, method="newton")
    with pytest.raises(TypeError, match="model must be a CovarianceModule"):
        fit(torch.eye(3), y, X)


def test_former_fit_keywords_warn_and_fit_the_same():
    model, y, X, _ = small_problem(seed=6)
    new = fit(model, y, X, optimizer="lbfgs", method="ml")
    model.reset_parameters()
    with pytest.warns(DeprecationWarning) as caught:
        old = fit(model, y, X, method="lbfgs", reml=False)
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        "fit(method='lbfgs') is deprecated: method is 'reml' or 'ml' now; pass optimizer='lbfgs'",
        "fit(reml=False) is deprecated: pass method='ml'"]
    assert (old.optimizer, old.method) == (new.optimizer, new.method) == ("lbfgs", "ML")
    assert old.loglik == new.loglik
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit(model, y, X, optimizer="newton")


def test_ai_reml_stepwise_with_saved_state_equals_uninterrupted_run():
    from covmodules.optim import AIREML
    model, y, X, free = small_problem(seed=7)
    objective = REML(model, y, X)
    whole = AIREML(objective).run(free)
    first = AIREML(objective)
    first.start(free)
    for _ in range(3):
        first.step()
    saved = first.state_dict()
    second = AIREML(objective)
    second.load_state_dict(saved)
    while second.step() is not None:
        pass
    resumed = second.result()
    assert resumed.converged and resumed.iterations == whole.iterations
    torch.testing.assert_close(resumed.free, whole.free, rtol=0, atol=1e-12)
    assert [h["loglik"] for h in resumed.history] == [h["loglik"] for h in whole.history]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_equals_cpu():
    model, y, X, _ = small_problem(seed=7)
    cpu = fit(model, y, X)
    model_cuda, _, _, _ = small_problem(seed=7)
    gpu = fit(model_cuda.cuda(), y.cuda(), X.cuda())
    assert gpu.loglik == pytest.approx(cpu.loglik, rel=1e-10)
    assert gpu.params == pytest.approx(cpu.params, rel=1e-8, abs=1e-10)
    np.testing.assert_allclose(gpu.fixed_effects["estimate"], cpu.fixed_effects["estimate"],
                               rtol=1e-8)
    assert "logLik" in gpu.summary() and len(gpu.fitted()) == len(y)
