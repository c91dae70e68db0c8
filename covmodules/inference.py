"""Inference on a fit, as lme4 / lmerTest report it: VarCorr, conditional variances of the
BLUPs, Satterthwaite t tests, Wald intervals, likelihood-ratio tests and simulation.

Each function takes a :class:`~covmodules.results.FitResult` (its methods call them):

- :func:`varcorr`: variances, SDs and correlations of every random term and the residual
  (lme4's ``as.data.frame(VarCorr(fit))``);
- :func:`ranef`: BLUPs with their conditional SDs (lme4's ``ranef(fit, condVar = TRUE)``:
  ``Var(u | y)`` at ``θ̂`` with ``β`` at ``β̂``, i.e. ``G - G Zᵀ V⁻¹ Z G``);
- :func:`satterthwaite`: degrees of freedom of each fixed effect's t test (lmerTest):
  ``df = 2 Var(β̂_j)² / (gᵀ A g)``, ``g = ∂Var(β̂_j)/∂θ`` by autograd through the solver's
  factorisation, ``A`` the inverse Hessian of ``-l`` (central differences of its closed-form
  gradient);
- :func:`wald_confint`, :func:`anova` (refits REML fits by ML first), :func:`simulate`;
- :func:`format_pvalue`: R's ``format.pval`` (``< 2e-16``).

Example::

    >>> from covmodules.inference import format_pvalue
    >>> format_pvalue(4.5e-297), format_pvalue(0.0123456)
    ('< 2e-16', '0.01235')
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import numpy as np
import pandas as pd
import torch
from scipy import stats

__all__ = ["varcorr", "ranef", "satterthwaite", "wald_confint", "anova", "simulate",
           "format_pvalue", "residual_variance"]

EPS = np.finfo(float).eps


def format_pvalue(p: float, digits: int = 4) -> str:
    """A p-value as R prints it: ``< 2e-16`` below machine epsilon, else ``digits``
    significant digits (``format.pval``)."""
    if p is None or not np.isfinite(p):
        return "NaN"
    if p < EPS:
        return "< 2e-16"
    return f"{p:.{digits}g}"


# ----------------------------------------------------------------------------- VarCorr
def residual_variance(model, free=None) -> float:
    """The variance of one residual: ``R[0, 0]`` of a :class:`~covmodules.MixedModel`'s
    residual (``σ²`` of a scalar, AR(1) or compound-symmetric residual), ``V[0, 0]`` of any
    other model, at free-scale ``free`` (default: the registered parameters); read from the
    structure's leading block, so ``R`` is not formed."""
    from .model import MixedModel
    from .results import leading_block
    with torch.no_grad():
        nat = model.build_params(free)
        if isinstance(model, MixedModel):
            return float(leading_block(model.residual, model._split(nat)[-1], 1)[0, 0])
        return float(leading_block(model, nat, 1)[0, 0])


def varcorr(result) -> pd.DataFrame:
    """Per random term the variances (``name2`` empty) and covariances with correlations
    of the effects of one level (``name1`` the earlier term), then the ``Residual`` row:
    columns ``group``, ``name1``, ``name2``, ``variance`` (a covariance on off-diagonal
    rows), ``std_dev``, ``corr``."""
    from .model import MixedModel
    from .results import term_covariances, term_labels
    model, rows = result.model, []
    if isinstance(model, MixedModel):
        for name, G in term_covariances(model, result.free).items():
            G, labels = G.to(torch.float64).cpu(), term_labels(model, name)
            sd = G.diagonal().clamp(min=0).sqrt()
            rows += [(name, labels[i], None, float(G[i, i]), float(sd[i]), np.nan)
                     for i in range(len(labels))]
            rows += [(name, labels[j], labels[i], float(G[i, j]), np.nan,
                      float(G[i, j] / max(float(sd[i] * sd[j]), 1e-300)))
                     for j in range(len(labels)) for i in range(j + 1, len(labels))]
    var = residual_variance(model, result.free)
    rows.append(("Residual", None, None, var, math.sqrt(max(var, 0.0)), np.nan))
    return pd.DataFrame(rows, columns=["group", "name1", "name2", "variance", "std_dev",
                                       "corr"])


# ------------------------------------------------------------------- conditional BLUPs
def _factor(result):
    factor = getattr(result.state, "factor", None)
    if factor is None or not hasattr(result.objective, "X"):
        raise ValueError("this needs a fit of one data set (a sharded fit has no single "
                         "factorisation of V)")
    return factor


def ranef(result, condvar: bool = True) -> pd.DataFrame:
    """The BLUPs in lme4's long layout (``as.data.frame(ranef(fit, condVar = TRUE))``):
    columns ``group``, ``term``, ``level``, ``condval`` and, with ``condvar``, ``condsd``,
    the square root of the diagonal of ``Var(u | y) = G - G Zᵀ V⁻¹ Z G`` (lme4's
    ``condVar``: at the estimates, ``β`` taken as known). Rows run over terms, then levels."""
    from .results import term_labels
    model, frames = result.model, []
    blups = result.blups()
    for name, frame in blups.items():
        labels = term_labels(model, name)
        k = frame.shape[1]
        sd = _condsd(result, name, k) if condvar else None
        for t, term in enumerate(frame.columns if k == len(labels) else range(k)):
            part = {"group": name, "term": str(term), "level": [str(v) for v in frame.index],
                    "condval": frame.iloc[:, t].to_numpy()}
            if condvar:
                part["condsd"] = sd[:, t]
            frames.append(pd.DataFrame(part))
    if not frames:
        return pd.DataFrame(columns=["group", "term", "level", "condval"]
                            + (["condsd"] if condvar else []))
    return pd.concat(frames, ignore_index=True)


def _condsd(result, name: str, k: int, max_entries: int = 4_000_000) -> np.ndarray:
    """``(levels, k)`` conditional SDs of term ``name``: the diagonal blocks of
    ``G - (Z G)ᵀ V⁻¹ (Z G)``, a chunk of levels at a time (no ``q × q`` matrix)."""
    factor, model = _factor(result), result.model
    with torch.no_grad():
        nat = model.build_params(result.free)
        G, part = next((g, p) for n, g, p in model._terms(nat) if n == name)
        q, n = G.shape[0], model.shape[0]
        levels = q // k
        per = max(1, max_entries // (n * k))
        out = []
        for start in range(0, levels, per):
            cols = torch.arange(start * k, min(levels, start + per) * k, device=nat.device)
            E = torch.zeros(q, len(cols), dtype=nat.dtype, device=nat.device)
            E[cols, torch.arange(len(cols))] = 1
            GE = G._matmul(part, E)                                   # G columns
            W = factor.whiten(result.objective.solver.term_columns(name, GE.to(nat)))
            cond = GE[cols] - factor.inner(W, W)
            out.append(cond.diagonal().clamp(min=0).sqrt().reshape(-1, k))
        return torch.cat(out).cpu().numpy()


# -------------------------------------------------------------------- Satterthwaite df
def _free_cov_beta(result, free: torch.Tensor, solver) -> torch.Tensor:
    """``(XᵀV⁻¹X)⁻¹`` at free-scale ``free``, differentiable (``solver``'s factorisation)."""
    objective = result.objective
    nat = objective.model.build_params(free)
    factor = solver.factorize(nat)
    Xw = factor.whiten(solver.columns(objective.X.to(nat)))
    return torch.linalg.inv(factor.inner(Xw, Xw))


def _var_beta_jacobian(result, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``Var(β̂_j)`` and its derivatives in the active free parameters, by autograd through
    the fit's solver, or through the next cheapest applicable one (the dense one at last)
    where the fit's solver works in place in a way autograd cannot differentiate."""
    from .linalg import applicable_solvers
    objective = result.objective
    own = objective.solver
    others = sorted((s for s in applicable_solvers(objective.model) if s.name != own.name),
                    key=lambda s: s.cost)
    for solver in [own, *others]:
        free = result.free.detach().to(torch.float64).clone().requires_grad_(True)
        try:
            with warnings.catch_warnings():      # a solver may read a float off a parameter
                warnings.filterwarnings("ignore", "Converting a tensor with requires_grad")
                var = _free_cov_beta(result, free, solver).diagonal()
            return var.detach().cpu(), _jacobian(var, free)[:, active]
        except RuntimeError:
            if solver is (others or [own])[-1]:
                raise


def _hessian(result, active: list[int]) -> torch.Tensor:
    """Hessian of ``-l`` in the active free parameters: central differences of the
    closed-form gradient, steps of 1e-4 of each parameter's unit on the data's scale."""
    from .fitting import free_units
    objective, free = result.objective, result.free.detach().to(torch.float64)
    units = free_units(objective)
    H = torch.zeros(len(active), len(active), dtype=torch.float64)
    for a, k in enumerate(active):
        h = 1e-4 * units[k]
        grads = []
        for sign in (1, -1):
            f = free.clone()
            f[k] += sign * h
            grads.append(objective.gradient(f, objective.state(f)).to(torch.float64).cpu())
        H[:, a] = ((grads[0] - grads[1]) / (2 * h))[active]
    return 0.5 * (H + H.T)


def satterthwaite(result) -> np.ndarray:
    """Satterthwaite degrees of freedom of each fixed effect's t test (lmerTest's
    ``summary``): ``inf`` with no estimated covariance parameter, NaN for a sharded fit."""
    objective = result.objective
    p = objective.p
    if not hasattr(objective, "X"):
        return np.full(p, np.nan)
    excluded = set(result.boundary) | set(result.unidentified)
    active = [i for i, n in enumerate(objective.model.free_param_names) if n not in excluded]
    if not active or p == 0:
        return np.full(p, np.inf)
    var, g = _var_beta_jacobian(result, active)
    A = torch.linalg.inv(_hessian(result, active))
    return (2 * var ** 2 / torch.einsum("jk,kl,jl->j", g, A, g)).numpy()


def _jacobian(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """``∂out/∂inp`` by reverse-mode autograd, one backward pass per output."""
    rows = [torch.autograd.grad(o, inp, retain_graph=i < out.numel() - 1)[0]
            for i, o in enumerate(out)]
    return torch.stack(rows).detach().to(torch.float64).cpu()


def t_tests(result) -> pd.DataFrame:
    """lmerTest's table: estimate, std_error, df (Satterthwaite), t and p_value."""
    beta = result.state.beta.detach().cpu().numpy()
    se = np.sqrt(np.diag(result.state.cov_beta.detach().cpu().numpy()))
    df = satterthwaite(result)
    t = beta / se
    p = 2 * stats.t.sf(np.abs(t), df)
    return pd.DataFrame({"estimate": beta, "std_error": se, "df": df, "t": t, "p_value": p},
                        index=pd.Index(result.objective.x_names, name="term"))


# ------------------------------------------------------------------------------- Wald
def _columns(level: float) -> list[str]:
    tail = 100 * (1 - level) / 2
    return [f"{tail:g} %", f"{100 - tail:g} %"]


def wald_confint(result, level: float = 0.95) -> pd.DataFrame:
    """Wald intervals ``β̂ ± z SE`` of the fixed effects (lme4's ``method = "Wald"``, which
    gives none for the covariance parameters: use the profile)."""
    fe = result.fixed_effects
    z = stats.norm.ppf(0.5 + level / 2)
    lower, upper = fe["estimate"] - z * fe["std_error"], fe["estimate"] + z * fe["std_error"]
    return pd.DataFrame(np.column_stack([lower, upper]), index=fe.index,
                        columns=_columns(level))


def check_level(level) -> float:
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1), got {level!r}")
    return float(level)


# ------------------------------------------------------------------------------ LRT
def ml_refit(result):
    """``result`` itself for an ML fit; else the ML fit of a copy of its model from the
    REML estimates (the original model keeps its parameters)."""
    from .fitting import fit
    if result.method == "ML":
        return result
    objective = result.objective
    if not hasattr(objective, "X"):
        raise ValueError("a sharded fit cannot be refitted here: fit it with method='ml'")
    return fit(objective.refit(copy.deepcopy(objective.model), "ml"),
               start=result.free.detach().clone())


def anova(*results, names=None) -> pd.DataFrame:
    """Likelihood-ratio tests of nested models fitted to the same ``y`` (lme4's
    ``anova(fit0, fit1)``): REML fits are refitted by ML first (saying so on stderr, as
    lme4 does); rows sorted by ``npar``, each tested against the row above."""
    if len(results) < 2:
        raise ValueError("anova needs at least two fits to compare")
    names = [f"model{i}" for i in range(len(results))] if names is None else list(names)
    if len(names) != len(results):
        raise ValueError(f"names has {len(names)} entries for {len(results)} fits")
    y = results[0].objective.y
    for name, r in zip(names, results):
        if r.objective.y.shape != y.shape or not torch.equal(r.objective.y.cpu(), y.cpu()):
            raise ValueError(f"fit {name!r} was fitted to another response (anova compares "
                             f"models of the same data)")
    if any(r.method == "REML" for r in results):
        print("refitting model(s) with ML (instead of REML)", file=sys.stderr)
    fits = sorted(zip(names, (ml_refit(r) for r in results)), key=lambda f: f[1].num_params)
    rows, previous = [], None
    for name, r in fits:
        dev = -2 * r.loglik
        row = [r.num_params, r.aic, r.bic, r.loglik, dev, np.nan, np.nan, np.nan]
        if previous is not None:
            chisq, df = previous[4] - dev, r.num_params - previous[0]
            row[5:] = [chisq, df, stats.chi2.sf(chisq, df) if df > 0 else np.nan]
        rows.append(row)
        previous = row
    table = pd.DataFrame(rows, index=[n for n, _ in fits],
                         columns=["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df",
                                  "Pr(>Chisq)"])
    return table.astype({"npar": int})


# --------------------------------------------------------------------------- simulate
def _draw(module, nat, nsim: int, generator) -> torch.Tensor:
    """``nsim`` draws of ``N(0, M)`` for covariance module ``M`` at ``nat``: a diagonal or
    ``I ⊗ S`` structure through its view, any other through the eigendecomposition of the
    dense matrix (``M`` may be singular, e.g. a variance at its boundary)."""
    n = module.shape[0]
    z = torch.randn(n, nsim, generator=generator, dtype=torch.float64).to(nat)
    diagonal = module.diagonal_view()
    if diagonal is not None:
        values = diagonal.values(nat)
        return values.expand(n).clamp(min=0).sqrt()[:, None] * z
    block = module.repeated_block_view()
    if block is not None:
        root = _sqrt(block.block._evaluate(nat))
        k = root.shape[0]
        return (root @ z.reshape(block.count, k, nsim)).reshape(n, nsim)
    return _sqrt(module._evaluate(nat)) @ z


def _sqrt(M: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (M + M.T))
    return vectors * values.clamp(min=0).sqrt()


def simulate(result, nsim: int = 1, seed: int | None = None) -> pd.DataFrame:
    """``nsim`` responses from the fitted model, ``X β̂ + Σ Z u + e`` with new random
    effects ``u ~ N(0, G)`` and residuals ``e ~ N(0, R)`` in each draw (lme4's
    ``simulate(fit, nsim, seed)``): columns ``sim_1``, ..., one row per observation."""
    from .model import MixedModel
    if not isinstance(nsim, int) or isinstance(nsim, bool) or nsim < 1:
        raise ValueError(f"nsim must be a positive integer, got {nsim!r}")
    generator = torch.Generator()
    generator.manual_seed(int(seed) if seed is not None else torch.seed())
    model = result.model
    mean = torch.as_tensor(result.fitted(conditional=False), dtype=torch.float64)
    with torch.no_grad():
        nat = model.build_params(result.free)
        if isinstance(model, MixedModel):
            out = _draw(model.residual, model._split(nat)[-1], nsim, generator)
            for name, G, part in model._terms(nat):
                out = out + model.z_matmul(name, _draw(G, part, nsim, generator).to(out))
        else:
            out = _draw(model, nat, nsim, generator)
    sims = (mean.to(out)[:, None] + out).cpu().numpy()
    return pd.DataFrame(sims, columns=[f"sim_{i + 1}" for i in range(nsim)])
