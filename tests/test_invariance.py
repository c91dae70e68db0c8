"""Equivariance and invariance of REML fits, over every covariance structure, solver and optimiser.

A REML fit of ``y = X b + e``, ``Var(e) = V(θ)``, must not depend on the units of ``y`` nor on
how the data are laid out:

- **scale** (``y -> s y``, ``s`` from ``1e-8`` to ``1e8``): ``V(θ̂_s) = s² V(θ̂_1)``; each
  natural-scale parameter moves as ``s ** power`` (variances ``s²``, Cholesky entries and
  loadings ``s``, correlations not at all: :data:`models.SCALE_POWER`); ``b̂`` and its
  standard errors ``× s``; BLUPs ``× s``; ``logLik_s = logLik_1 - (n - p) log s`` (ML:
  ``- n log s``), all to ``1e-6`` relative, in about the same number of iterations;
- **row order**: permuting the rows (the model rebuilt from the permuted data: group codes,
  positions, ``Z`` rows, grid cells) changes nothing but the order of ``V``;
- **level labels**: relabelling the levels of a grouping factor changes nothing but the order
  of the BLUPs;
- **location**: ``y + c`` with an intercept in ``X`` moves the intercept by ``c`` only.

Each model of :mod:`models` is fitted with every solver that applies to it (forced with
``solver=``) and with AI-REML and L-BFGS; test ids read ``model-solver-optimiser``. The
``s = 1`` fits are computed once per case and shared.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import covmodules.structures
from covmodules import fit
from covmodules.linalg import SOLVERS

from models import (DTYPE, PARAMETERLESS, SPECS, Data, permute_rows, relabel, scale_power,
                    simulate)

pytestmark = pytest.mark.usefixtures("one_thread")

SCALES = (1e-8, 1e-4, 1e4, 1e8)
OPTIMISERS = ("ai", "lbfgs")
RTOL = 1e-6            # estimates under y -> s y, and every estimate under the invariances
LOGLIK_RTOL = 1e-8     # log-likelihood under row / level permutations and a shift
ITER_SLACK = 3         # "about the same number of iterations"
SHIFT = 1e3            # c in y + c (the data have unit scale)

CASES = [(name, solver, opt) for name, spec in SPECS.items() for solver in spec.solvers
         for opt in OPTIMISERS]
#: ML (``- n log s``) on one model per structured solver
ML_CASES = [(name, solver, opt) for name, solver in
            [("scalar_intercept", "woodbury"), ("grouped_ar1", "grouped"),
             ("kron_ar1_ar1", "kronecker"), ("unstructured_slope", "dense")]
            for opt in OPTIMISERS]


def case_id(case) -> str:
    return "-".join(case)


def scale_id(s: float) -> str:
    return f"s={s:g}"


# ----------------------------------------------------------------------------- fitting
@dataclass
class Fit:
    """What the checks compare, taken from one ``fit``."""

    params: dict
    fixed: list
    V: torch.Tensor
    beta: np.ndarray
    se_beta: np.ndarray
    blups: dict
    loglik: float
    iterations: int
    converged: bool
    boundary: list
    solver: str
    n: int
    p: int
    warnings: list

    def summary(self) -> str:
        params = ", ".join(f"{k}={v:.10g}" for k, v in self.params.items())
        return (f"loglik={self.loglik:.12g}, iterations={self.iterations}, "
                f"converged={self.converged}, boundary={self.boundary}, params: {params}"
                + (f"; warnings: {self.warnings}" if self.warnings else ""))


def run(case, data: Data, reml: bool = True) -> Fit:
    """Fit a fresh model of ``case`` (default start values) to ``data``."""
    name, solver, opt = case
    model, y, X = SPECS[name].build(data.rows, data.y, solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, y, X, optimizer=opt, solver=solver,
                     method="reml" if reml else "ml")
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    with torch.no_grad():
        V = result.model(result.free).detach().to(DTYPE)
    fe = result.fixed_effects
    return Fit(params=result.params, fixed=list(result.model.fixed_param_names), V=V,
               beta=fe["estimate"].to_numpy(), se_beta=fe["std_error"].to_numpy(),
               blups={k: v.to_numpy().reshape(-1) for k, v in result.blups().items()},
               loglik=result.loglik, iterations=result.iterations,
               converged=bool(result.converged), boundary=list(result.boundary),
               solver=result.solver, n=result.n, p=result.objective.p, warnings=messages)


@functools.cache
def reference(case, reml: bool = True) -> Fit:
    """The ``s = 1`` fit of ``case`` to the simulated data (shared by the tests)."""
    return run(case, simulate(case[0]), reml)


# ----------------------------------------------------------------------------- checks
def rel_err(got, expected) -> float:
    got, expected = np.asarray(got, dtype=float), np.asarray(expected, dtype=float)
    if expected.size == 0:
        return 0.0
    scale = float(np.abs(expected).max())
    return float(np.abs(got - expected).max()) / max(scale, 1e-300)


class Problems(list):
    """Collects every mismatch of one comparison, so that a failure shows all of them."""

    def check(self, what: str, got, expected, rtol: float) -> None:
        err = rel_err(got, expected)
        if not err <= rtol:
            self.append(f"{what}: relative error {err:.3g} > {rtol:g} "
                        f"(got {np.ravel(got)[:4]}, expected {np.ravel(expected)[:4]})")

    def raise_if_any(self, ref: Fit, got: Fit, what: str) -> None:
        if self:
            detail = "\n  ".join(self)
            pytest.fail(f"{what}:\n  {detail}\n reference: {ref.summary()}\n this fit: "
                        f"{got.summary()}", pytrace=False)


def check_fit(problems: Problems, fit_: Fit, solver: str, label: str) -> None:
    """Every fit: converged to an interior optimum with the requested solver."""
    if not fit_.converged:
        problems.append(f"{label} fit did not converge")
    if fit_.boundary:
        problems.append(f"{label} fit put {fit_.boundary} at the boundary (interior optimum)")
    if fit_.solver != solver:
        problems.append(f"{label} fit used solver {fit_.solver!r}, not {solver!r}")


def check_iterations(problems: Problems, ref: Fit, got: Fit) -> None:
    if abs(got.iterations - ref.iterations) > ITER_SLACK:
        problems.append(f"iterations {got.iterations} vs {ref.iterations} at s = 1 "
                        f"(more than {ITER_SLACK} apart)")


def check_params(problems: Problems, ref: Fit, got: Fit, s: float = 1.0) -> None:
    """Every natural-scale parameter by name: ``θ_s = s ** power θ_1`` (fixed ones equal)."""
    if sorted(got.params) != sorted(ref.params):
        problems.append(f"parameter names differ: {sorted(got.params)} vs {sorted(ref.params)}")
        return
    for name, value in ref.params.items():
        power = 0 if name in ref.fixed else scale_power(name)
        problems.check(f"parameter {name} (x s^{power})", got.params[name], value * s ** power,
                       RTOL)


# ----------------------------------------------------------------------------- the catalogue
def _leaf_classes(spec) -> set[str]:
    data = simulate(spec.name)
    model, _, _ = spec.build(data.rows, data.y, "dense")
    return {type(m).__name__ for m in model.modules()}


def test_catalogue_covers_every_structure_and_solver():
    """Every structure in the registry is fitted by some model (those without parameters
    at least appear in one), and every solver is forced on some model."""
    registry = set(covmodules.structures.__all__)
    used = set().union(*(_leaf_classes(spec) for spec in SPECS.values()))
    fitted_free = registry - PARAMETERLESS
    assert fitted_free <= used, f"structures no model fits: {sorted(fitted_free - used)}"
    # a DesignMatrix given as Z becomes a BlockDesignMatrix inside MixedModel
    assert PARAMETERLESS - {"DesignMatrix"} <= used
    assert {solver for _, solver, _ in CASES} == set(SOLVERS)


#: how closely two different optimisers agree on V: each stops at its own distance from the
#: optimum (a 1e-10 Newton decrement or loss change leaves parameters ~1e-5 off), so this
#: only asks for the same optimum; the log-likelihood, flat there, is held to LOGLIK_RTOL
AGREE_RTOL = 1e-4


@pytest.mark.parametrize("name", list(SPECS))
def test_solvers_and_optimisers_agree_at_s1(name):
    """The catalogue's optimum is unique and interior: every solver and optimiser finds the
    same optimum at ``s = 1`` (a precondition of the comparisons below)."""
    fits = {case_id(c): reference(c) for c in CASES if c[0] == name}
    first_key, first = next(iter(fits.items()))
    problems = Problems()
    for key, other in fits.items():
        check_fit(problems, other, key.split("-")[1], key)
        problems.check(f"{key} vs {first_key}: log-likelihood", other.loglik, first.loglik,
                       LOGLIK_RTOL)
        problems.check(f"{key} vs {first_key}: V", other.V, first.V, AGREE_RTOL)
        problems.check(f"{key} vs {first_key}: fixed effects", other.beta, first.beta,
                       AGREE_RTOL)
    if problems:
        pytest.fail("\n  ".join([f"{name}: fits disagree"] + problems + [
            f"{k}: {f.summary()}" for k, f in fits.items()]), pytrace=False)


# ----------------------------------------------------------------------------- scale
def _check_scaled(case, s: float, reml: bool) -> None:
    name, solver, _ = case
    ref = reference(case, reml)
    data = simulate(name)
    got = run(case, Data(data.rows, data.y * s), reml)
    problems = Problems()
    check_fit(problems, ref, solver, "s = 1")
    check_fit(problems, got, solver, f"s = {s:g}")
    check_params(problems, ref, got, s)
    problems.check("V / s^2", got.V / s ** 2, ref.V, RTOL)
    problems.check("fixed effects / s", got.beta / s, ref.beta, RTOL)
    problems.check("fixed-effect standard errors / s", got.se_beta / s, ref.se_beta, RTOL)
    for term, u in ref.blups.items():
        problems.check(f"BLUPs of {term} / s", got.blups[term] / s, u, RTOL)
    df = ref.n - ref.p if reml else ref.n
    problems.check(f"logLik + {'(n - p)' if reml else 'n'} log s", got.loglik + df * math.log(s),
                   ref.loglik, RTOL)
    check_iterations(problems, ref, got)
    problems.raise_if_any(ref, got, f"y -> {s:g} y")


@pytest.mark.parametrize("s", SCALES, ids=scale_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_scale_equivariance(case, s):
    _check_scaled(case, s, reml=True)


@pytest.mark.parametrize("s", SCALES, ids=scale_id)
@pytest.mark.parametrize("case", ML_CASES, ids=case_id)
def test_scale_equivariance_ml(case, s):
    _check_scaled(case, s, reml=False)


# ----------------------------------------------------------------------------- invariance
def _check_same(problems: Problems, ref: Fit, got: Fit, solver: str) -> None:
    check_fit(problems, ref, solver, "reference")
    check_fit(problems, got, solver, "transformed")
    check_params(problems, ref, got)
    problems.check("log-likelihood", got.loglik, ref.loglik, LOGLIK_RTOL)
    problems.check("fixed-effect standard errors", got.se_beta, ref.se_beta, RTOL)
    check_iterations(problems, ref, got)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_row_permutation_invariance(case):
    """Rows in a random order: the same fit; ``V`` permuted with the rows (the Kronecker
    solver puts the rows back into grid order itself)."""
    name, solver, _ = case
    ref = reference(case)
    data = simulate(name)
    perm = torch.randperm(data.y.shape[0], generator=torch.Generator().manual_seed(7))
    got = run(case, permute_rows(data, perm))
    problems = Problems()
    _check_same(problems, ref, got, solver)
    expected_V = ref.V if solver == "kronecker" else ref.V[perm][:, perm]
    problems.check("V (rows permuted)", got.V, expected_V, RTOL)
    problems.check("fixed effects", got.beta, ref.beta, RTOL)
    for term, u in ref.blups.items():
        problems.check(f"BLUPs of {term}", got.blups[term], u, RTOL)
    problems.raise_if_any(ref, got, "rows permuted")


RELABEL_CASES = [c for c in CASES if SPECS[c[0]].factors]


@pytest.mark.parametrize("case", RELABEL_CASES, ids=case_id)
def test_level_relabelling_invariance(case):
    """Level codes of every grouping factor permuted: the same fit and ``V``; the BLUPs of
    level ``a`` move to level ``pi(a)``."""
    name, solver, _ = case
    spec = SPECS[name]
    ref = reference(case)
    g = torch.Generator().manual_seed(11)
    maps = {key: torch.randperm(levels, generator=g) for key, levels in spec.factors.items()}
    got = run(case, relabel(simulate(name), maps))
    problems = Problems()
    _check_same(problems, ref, got, solver)
    problems.check("V", got.V, ref.V, RTOL)
    problems.check("fixed effects", got.beta, ref.beta, RTOL)
    for term, (key, k) in spec.terms.items():
        levels = spec.factors[key]
        moved = got.blups[term].reshape(levels, k)[maps[key].numpy()]
        problems.check(f"BLUPs of {term} (levels relabelled)", moved,
                       ref.blups[term].reshape(levels, k), RTOL)
    problems.raise_if_any(ref, got, "levels relabelled")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_shift_invariance(case):
    """``y + c`` with an intercept (column 0 of every ``X``): only the intercept moves, by
    ``c``."""
    name, solver, _ = case
    ref = reference(case)
    data = simulate(name)
    got = run(case, Data(data.rows, data.y + SHIFT))
    problems = Problems()
    _check_same(problems, ref, got, solver)
    problems.check("V", got.V, ref.V, RTOL)
    shifted = ref.beta.copy()
    shifted[0] += SHIFT
    problems.check("fixed effects - c e_0", got.beta - (shifted - ref.beta), ref.beta, RTOL)
    for term, u in ref.blups.items():
        problems.check(f"BLUPs of {term}", got.blups[term], u, RTOL)
    problems.raise_if_any(ref, got, f"y -> y + {SHIFT:g}")
