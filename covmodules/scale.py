"""The free parameters on the data's scale: units, start values, boundaries, identifiability.

Each parameter's role (:class:`~covmodules.ParamSpec`) says how its natural value scales when
``y → s y``; with the variance of the OLS residuals it gives the parameter a unit, so that the
optimisers' decisions (damping, clipping, thresholds, start values, the boundary of the
parameter space) are the same at every scale of ``y``.

Example::

    >>> from covmodules import UnconstrainedMatrix
    >>> scale = ParameterScale(UnconstrainedMatrix(2), data_variance=100.0)
    >>> scale.roles, [round(u, 12) for u in scale.free_units().tolist()]   # log sd; sd units
    (['sd', 'loading', 'sd'], [1.0, 10.0, 1.0])
"""

from __future__ import annotations

import math

import torch

from .linalg import NotPositiveDefiniteError

__all__ = ["ParameterScale", "scale_start", "settle_boundary", "try_boundary",
           "unidentified_params", "finite_state", "rounding", "SETTLE_RULES"]

BOUNDED_ROLES = ("variance", "sd", "correlation")   # steps clipped on their log / logit scale
POSITIVE_ROLES = ("variance", "sd")                 # boundary at zero
CORRELATION_BOUNDARY = 18.0                         # |free| beyond this: correlation at ±1


class ParameterScale:
    """The free parameters measured on the data's scale, from their roles.

    A parameter whose natural value scales as ``s ** k`` with ``y → s y`` (``k`` = 2 for a
    variance, 1 for a standard deviation or loading, 0 for a correlation) has the natural unit
    ``v ** (k / 2)`` with ``v`` the variance of the OLS residuals; its *free* unit is that
    unit divided by the transform's slope there (1 on a log or logit scale, the natural unit
    on the identity scale). Boundary values and thresholds are fractions of these units.
    """

    def __init__(self, model, data_variance: float):
        specs = [s for s in model.param_specs if not s.fixed]
        self.names = [s.name for s in specs]
        self.roles = [s.role for s in specs]
        self.powers = [s.scale_power for s in specs]
        self.transforms = [s.transform for s in specs]
        self.data_variance = float(data_variance)
        free_index = {i: k for k, i in enumerate(model.free_param_index)}
        self.reflections = {free_index[i]: [free_index[j] for j in js]
                            for i, js in model.sign_reflections().items()
                            if i in free_index and all(j in free_index for j in js)}

    def __len__(self) -> int:
        return len(self.names)

    def natural_unit(self, k: int, fraction: float = 1.0) -> float:
        """``(fraction · v) ** (k / 2)``: a value of parameter ``k`` on the data's scale."""
        return (fraction * self.data_variance) ** (self.powers[k] / 2)

    def free_units(self) -> torch.Tensor:
        """The free-scale unit of every parameter (see the class docstring)."""
        units = []
        for k, t in enumerate(self.transforms):
            if self.powers[k] == 0:
                units.append(1.0)
                continue
            unit = torch.tensor(self.natural_unit(k), dtype=torch.float64)
            units.append(float(unit / t.derivative(t.inverse(unit)).abs()))
        return torch.tensor(units, dtype=torch.float64)

    def free_value(self, k: int, natural: float) -> float:
        return float(self.transforms[k].inverse(torch.tensor(natural, dtype=torch.float64)))

    def reflect(self, free: torch.Tensor, k: int) -> None:
        """Negate the natural values of parameter ``k``'s sign partners in ``free`` (``V`` is
        unchanged; ``k`` itself may then move away from its boundary on the other side)."""
        for j in self.reflections[k]:
            t = self.transforms[j]
            free[j] = t.inverse(-t.forward(free[j]))

    def implied_variance(self, k: int, x: float) -> float:
        """The variance a positive parameter at free value ``x`` stands for."""
        value = float(self.transforms[k].forward(torch.tensor(x, dtype=torch.float64)))
        return value ** (2 / self.powers[k])

    def boundary_value(self, k: int, direction: float) -> float:
        """The free value standing for the boundary: ±1 for a correlation (on the side of
        ``direction``), a variance of ``1e-10 v`` for a positive parameter."""
        if self.roles[k] == "correlation":
            return math.copysign(CORRELATION_BOUNDARY + 0.5, direction)
        return self.free_value(k, self.natural_unit(k, 1e-10))

    def at_boundary(self, k: int, x: float) -> bool:
        if self.roles[k] == "correlation":
            return abs(x) > CORRELATION_BOUNDARY
        if self.roles[k] in POSITIVE_ROLES:
            return self.implied_variance(k, x) < 1e-8 * self.data_variance
        return False

    def is_tiny(self, k: int, x: float, below: float) -> bool:
        """Whether positive parameter ``k`` stands for a variance under ``below · v``."""
        return (self.roles[k] in POSITIVE_ROLES
                and self.implied_variance(k, x) < below * self.data_variance)


def rounding(neg_loglik) -> float:
    """The rounding error of ``-l``: differences below it are noise. (``-l`` moves by
    ``(n - p) log s`` when ``y → s y``, so a larger relative slack would let the scale of
    ``y`` decide which steps are accepted.)"""
    return 100 * torch.finfo(torch.float64).eps * max(1.0, abs(float(neg_loglik)))


def finite_state(objective, free):
    """The objective's state at ``free``, or ``None`` where ``V`` is not positive definite or
    the log-likelihood is not finite."""
    try:
        state = objective.state(free)
    except NotPositiveDefiniteError:
        return None
    return state if bool(torch.isfinite(state.neg_loglik)) else None


def try_boundary(objective, scale: ParameterScale, free, k, state, below, slack):
    """The state with positive parameter ``k`` moved to its boundary, when it stands for a
    variance under ``below · v`` and the move lowers ``l`` by at most ``slack``; else ``None``
    (``free`` is changed only on success)."""
    if not scale.is_tiny(k, float(free[k]), below):
        return None
    probe = free.clone()
    boundary = scale.boundary_value(k, -1.0)
    if scale.implied_variance(k, boundary) > scale.implied_variance(k, float(free[k])):
        return state                   # already nearer zero than the boundary value
    probe[k] = boundary
    trial = finite_state(objective, probe)
    if trial is None or float(trial.neg_loglik) > float(state.neg_loglik) + slack:
        return None
    free[k] = probe[k]
    return trial


#: ``(below, slack)``: a variance under ``below`` times the data's variance is moved to the
#: boundary when that lowers ``l`` by at most ``slack``.
SETTLE_RULES = ((1e-3, 0.0), (1e-6, 1e-9))


def settle_boundary(objective, free: torch.Tensor, state, scale: ParameterScale | None = None,
                    active: torch.Tensor | None = None, rules=SETTLE_RULES):
    """Fix parameters at the boundary of the parameter space after an optimiser stopped.

    A positive parameter standing for a small variance is moved to the boundary when that
    does not lower ``l`` (below 1e-3 of the data's variance) or lowers it by at most 1e-9
    (below 1e-6; a log or softplus scale reaches zero only asymptotically, and a first-order
    optimiser slowly); a correlation whose free value is beyond ±18 is at ±1. The same rules
    serve AI-REML and the torch optimisers. ``free`` (and ``active``) are updated in place.
    Returns ``(names, state)``.
    """
    scale = scale or ParameterScale(objective.model, objective.residual_variance())
    active = torch.ones(len(free), dtype=torch.bool) if active is None else active
    names = []
    for k in range(len(free)):
        if not active[k]:
            continue
        if scale.roles[k] == "correlation" and scale.at_boundary(k, float(free[k])):
            names.append(scale.names[k])
            active[k] = False
            continue
        trial = None
        for below, slack in rules:
            trial = trial or try_boundary(objective, scale, free, k, state, below, slack)
        if trial is not None:
            state = trial
            names.append(scale.names[k])
            active[k] = False
    return names, state


def unidentified_params(ai: torch.Tensor, names: list[str], active=None,
                        tol: float = 1e-10) -> list[str]:
    """Free parameters in the null space of the AI matrix (their standard errors do not exist).

    The active block of ``ai`` is Jacobi scaled (unit diagonal); a parameter is unidentified
    when its diagonal is zero or it weighs in an eigenvector whose eigenvalue is below ``tol``
    (the estimates are then correlated to ``1 - tol``).
    """
    idx = [k for k in range(len(names)) if active is None or bool(active[k])]
    if not idx or not bool(torch.isfinite(ai).all()):
        return [names[k] for k in idx] if not bool(torch.isfinite(ai).all()) else []
    A = ai[idx][:, idx].to(torch.float64).cpu()
    d = A.diagonal().clamp(min=0).sqrt()
    out = {k for k, dk in zip(idx, d.tolist()) if dk <= 0}
    keep = d > 0
    if bool(keep.any()):
        sub = A[keep][:, keep] / torch.outer(d[keep], d[keep])
        values, vectors = torch.linalg.eigh(0.5 * (sub + sub.T))
        kept = [k for k, ok in zip(idx, keep.tolist()) if ok]
        for j in range(len(values)):
            if float(values[j]) <= tol * max(float(values[-1]), 1.0):
                out |= {kept[i] for i in range(len(kept)) if abs(float(vectors[i, j])) > 0.1}
    return [names[k] for k in sorted(out)]


def scale_start(objective) -> torch.Tensor:
    """Data-driven start: every parameter measured in the units of ``y`` moved to the scale of
    the OLS residuals.

    Multiplies the registered natural values of variances by ``c`` and of standard deviations
    and loadings by ``√c`` for a few ``c`` around the OLS residual variance (one
    factorisation each) and returns the free-parameter vector with the best likelihood;
    correlations and unitless parameters stay at their registered values.
    """
    model = objective.model
    free = model.free_params().to(torch.float64)
    scale = ParameterScale(model, objective.residual_variance())
    nat = model.build_params(free, include_fixed=False).tolist()
    scaled = [k for k in range(len(scale)) if scale.powers[k] > 0]
    if not scaled:
        return free
    best, best_loss = free, math.inf
    for j in range(-4, 3):
        c = scale.data_variance * 10.0 ** j
        candidate = free.clone()
        for k in scaled:
            candidate[k] = scale.free_value(k, nat[k] * c ** (scale.powers[k] / 2))
        if not bool(torch.isfinite(candidate).all()):
            continue
        state = finite_state(objective, candidate)
        if state is not None and float(state.neg_loglik) < best_loss:
            best, best_loss = candidate, float(state.neg_loglik)
    return best
