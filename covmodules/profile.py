r"""Profile-likelihood confidence intervals, as lme4's ``confint(fit, method = "profile")``.

As in lme4, the profiled criterion is the **ML** deviance ``-2 l_ML`` even for a REML fit,
which is first refitted by ML (so the intervals are centred on the ML estimates). Each
covariance parameter is profiled on the SD / correlation scale (:class:`Coordinates`: an
unstructured ``G`` as its SDs and correlations, a variance as its SD, anything else on its
natural scale), each fixed effect ``β_j`` by refitting with ``β_j`` held at a value (its
column as an offset); the interval is where ``D(c) - D̂`` equals the ``level`` quantile of
``χ²₁``, found by regula falsi (Illinois). The other parameters are re-optimised at every
point (BFGS in unconstrained coordinates, gradients by autograd through the closed-form
backward pass).
A bound that the profile does not cross is reported as the limit of the parameter (SD 0,
correlation ±1) or NaN.

Example::

    >>> import torch
    >>> from covmodules import MixedModel, ScalarMatrix, fit
    >>> plot = torch.arange(20) // 4                            # 5 plots of 4 rows
    >>> effect = torch.tensor([-2.0, 1.0, 0.5, 3.0, -1.5], dtype=torch.float64)
    >>> y = effect[plot] + torch.sin(3.0 * torch.arange(20, dtype=torch.float64))
    >>> Z = torch.nn.functional.one_hot(plot).double()
    >>> result = fit(MixedModel(random={"plot": (Z, ScalarMatrix(5))},
    ...                         residual=ScalarMatrix(20)), y)
    >>> ci = result.confint("profile")                          # the ML refit is profiled
    >>> list(ci.index), list(ci.columns)
    (['plot/sd', 'residual/sd', '(Intercept)'], ['2.5 %', '97.5 %'])
    >>> bool(ci.loc["plot/sd", "2.5 %"] < result.params["plot/sigma^2"] ** 0.5)
    True
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import optimize, stats

from .inference import _columns, ml_refit
from .structures.unconstrained import UnconstrainedMatrix

__all__ = ["Coordinates", "profile_confint"]

LIMIT = 30.0            # how far (in unconstrained units) a profile is followed
WALL = 1e10             # deviance excess returned where V or a correlation matrix is singular
SMALL_N = 20_000        # up to this many rows the profile runs on one thread


class Coordinates:
    """A model's free parameters in profiling coordinates ``c`` and their unconstrained
    version ``u``: each fully free :class:`~covmodules.UnconstrainedMatrix` as its SDs
    (``sd[i]``, ``u = log sd``) and correlations (``rho[i,j]``, ``u = atanh rho``) in the
    order of its ``L[i,j]``; each variance as its SD (``sigma^2`` → ``sd``, ``u = log sd``);
    any other parameter on its natural scale (``u`` its free value)."""

    def __init__(self, model):
        names = model.free_param_names
        self.trans = model.free_param_trans
        self.kinds = ["raw"] * len(names)
        self.names = list(names)
        self.blocks = []                         # (free indices, size) of unconstrained G
        position = {name: i for i, name in enumerate(names)}
        for path, module in model.named_modules():
            if not isinstance(module, UnconstrainedMatrix):
                continue
            prefix = path.replace(".", "/") + "/" if path else ""
            full = [prefix + n for n in module.param_names]
            if not all(n in position for n in full):
                continue                         # partly fixed: profiled as it is
            idx = [position[n] for n in full]
            self.blocks.append((idx, module.n))
            for k, (i, j) in zip(idx, zip(module._rows, module._cols)):
                self.kinds[k] = "sd" if i == j else "rho"
                self.names[k] = prefix + (f"sd[{i}]" if i == j else f"rho[{i},{j}]")
        for k, role in enumerate(model.free_param_roles):
            if self.kinds[k] == "raw" and role == "variance":
                self.kinds[k] = "sd_of_variance"
                head, _, leaf = names[k].rpartition("/")
                leaf = "sd" + leaf[len("sigma^2"):] if leaf.startswith("sigma^2") else \
                    f"sqrt({leaf})"
                self.names[k] = f"{head}/{leaf}" if head else leaf

    def to_free(self, u: torch.Tensor) -> torch.Tensor:
        """The free-scale parameters at ``u`` (differentiable); raises
        :class:`ValueError` where the correlations are not positive definite."""
        parts = list(u)
        for k, kind in enumerate(self.kinds):
            if kind == "sd_of_variance":
                parts[k] = self.trans[k].inverse(torch.exp(2 * u[k]))
        for idx, n in self.blocks:
            cell = dict(zip(_tril(n), idx))
            sd = torch.stack([torch.exp(u[cell[i, i]]) for i in range(n)])
            one = torch.ones((), dtype=u.dtype)
            R = torch.stack([torch.stack([one if i == j else torch.tanh(u[cell[max(i, j),
                                                                             min(i, j)]])
                                          for j in range(n)]) for i in range(n)])
            L, info = torch.linalg.cholesky_ex(R * sd[:, None] * sd[None, :])
            if int(info):
                raise ValueError("correlations not positive definite")
            for (i, j), k in cell.items():
                parts[k] = self.trans[k].inverse(L[i, j])
        return torch.stack(parts)

    def from_free(self, free: torch.Tensor, model) -> torch.Tensor:
        """``u`` at free-scale ``free``."""
        u = free.detach().to(torch.float64).clone()
        nat = model.build_params(free, include_fixed=False).detach()
        for k, kind in enumerate(self.kinds):
            if kind == "sd_of_variance":
                u[k] = 0.5 * torch.log(nat[k])
        for idx, n in self.blocks:
            L = torch.zeros(n, n, dtype=u.dtype)
            for k, (i, j) in zip(idx, _tril(n)):
                L[i, j] = nat[k]
            S = L @ L.T
            sd = S.diagonal().sqrt()
            for k, (i, j) in zip(idx, _tril(n)):
                u[k] = torch.log(sd[i]) if i == j else \
                    torch.atanh((S[i, j] / (sd[i] * sd[j])).clamp(-1 + 1e-15, 1 - 1e-15))
        return u

    def value(self, k: int, u: float) -> float:
        """Coordinate ``c_k`` at ``u_k = u``."""
        kind = self.kinds[k]
        if kind in ("sd", "sd_of_variance"):
            return math.exp(u)
        if kind == "rho":
            return math.tanh(u)
        return float(self.trans[k].forward(torch.tensor(u, dtype=torch.float64)))

    def limit(self, k: int, side: int) -> float:
        """The coordinate's end of range on ``side`` (-1, +1) when the profile never
        reaches the cut-off there: SD 0 / inf, correlation ±1, else NaN."""
        kind = self.kinds[k]
        if kind in ("sd", "sd_of_variance"):
            return 0.0 if side < 0 else math.inf
        return float(side) if kind == "rho" else math.nan


def _tril(n: int):
    """Column-major lower-triangle cells, the order of ``UnconstrainedMatrix``'s ``L[i,j]``."""
    return [(i, j) for j in range(n) for i in range(j, n)]


class _Profiler:
    """ML deviance minimised over the coordinates that are not held."""

    def __init__(self, fit_ml):
        self.objective = fit_ml.objective
        self.model = self.objective.model
        self.coords = Coordinates(self.model)
        self.u_hat = self.coords.from_free(fit_ml.free, self.model)
        self.dev_hat = -2 * fit_ml.loglik
        self.hess_inv = None
        H = self.hessian()
        keep = lambda held: [i for i in range(len(H)) if i != held]        # noqa: E731
        try:
            inverses = {held: np.linalg.inv(H[np.ix_(keep(held), keep(held))])
                        for held in [None, *range(len(H))]}
            self.hess_inv = {held: 0.5 * (M + M.T) for held, M in inverses.items()}
            self.u_se = np.sqrt(np.clip(np.diag(2 * self.hess_inv[None]), 0, None))
        except np.linalg.LinAlgError:
            self.hess_inv, self.u_se = None, np.full(len(H), np.nan)

    def hessian(self) -> np.ndarray:
        """Hessian of the deviance in ``u`` at the optimum: central differences of its
        gradient (a start for BFGS and the size of the first steps of the profiles)."""
        u, y, X = self.u_hat, self.objective.y, self.objective.X
        K, h = u.numel(), 1e-4
        H = np.zeros((K, K))
        for k in range(K):
            e = torch.zeros(K, dtype=torch.float64)
            e[k] = h
            H[:, k] = (self.deviance(u + e, y, X)[1] - self.deviance(u - e, y, X)[1]) / (2 * h)
        return 0.5 * (H + H.T)

    def deviance(self, u: torch.Tensor, y, X) -> tuple[float, np.ndarray]:
        u = u.clone().requires_grad_(True)
        try:
            free = self.coords.to_free(u)
            dev = 2 * self.objective.solver.loss(free, y, X, "ml")
        except ValueError:               # not positive definite: a wall for the optimiser
            return self.dev_hat + WALL, np.zeros(u.numel())
        (grad,) = torch.autograd.grad(dev, u)
        return float(dev.detach()), grad.detach().numpy()

    def minimise(self, start: np.ndarray, held: int | None, value: float, y, X):
        """Minimum ML deviance with ``u[held] = value`` (``held`` None: nothing held),
        starting from ``start``; returns ``(deviance, argmin u)``."""
        keep = [i for i in range(len(start)) if i != held]

        def full(x):
            u = torch.tensor(start, dtype=torch.float64)
            u[keep] = torch.as_tensor(x, dtype=torch.float64)
            if held is not None:
                u[held] = value
            return u

        def f(x):
            dev, grad = self.deviance(full(x), y, X)
            return dev, grad[keep]

        if not keep:
            return f(np.zeros(0))[0], full(np.zeros(0)).numpy()
        options = {"gtol": 1e-6, "maxiter": 500}
        if self.hess_inv is not None:
            options["hess_inv0"] = self.hess_inv[held]
        res = optimize.minimize(f, start[keep], jac=True, method="BFGS", options=options)
        return float(res.fun), full(res.x).numpy()

    def interval(self, held, centre: float, step: float, crit: float, y_of, X_of, value_of,
                 limit_of, reach: float) -> list[float]:
        """Both ends where the profile deviance minus ``D̂`` equals ``crit``: the signed
        root ``ζ(v) = ±√(D(v) - D̂)``, close to linear in ``v``, is extrapolated to ``±√crit``
        from ``centre`` (steps growing, at most ``reach`` away) until bracketed, then
        refined by the Illinois method. Where the deviance cannot be evaluated (a singular
        correlation matrix or ``V``) the step is halved; a side whose profile stays below the
        cut-off up to the end of that region or ``reach`` ends at the limit."""
        z, ends = math.sqrt(crit), []
        for side in (-1, 1):
            start = self.u_hat.numpy().copy()

            def zeta(v):
                nonlocal start
                dev, start = self.minimise(start, held, v, y_of(v), X_of(v))
                if dev - self.dev_hat >= WALL / 2:
                    return None
                return side * math.sqrt(max(dev - self.dev_hat, 0.0)) - side * z

            a, fa, delta, b = centre, -side * z, min(step, reach), None
            while True:
                trial = centre + side * delta
                f = zeta(trial)
                if f is None:                        # no deviance there: halve the step
                    if abs(trial - a) < 1e-8:
                        break                        # the feasible region ends at a
                    delta, reach = (abs(a - centre) + delta) / 2, delta
                    continue
                if side * f > 0:
                    b, fb = trial, f
                    break
                if delta >= reach:
                    break
                a, fa = trial, f
                reached = side * f + z               # |ζ| at the trial point
                grow = min(max(2.0, 1.2 * z / reached) if reached > 0 else 4.0, 4.0)
                delta = min(grow * delta, reach)
            ends.append(limit_of(side) if b is None else value_of(_illinois(zeta, a, fa, b, fb)))
        return ends


def _illinois(f, a: float, fa: float, b: float, fb: float, ftol: float = 1e-9,
              max_iter: int = 60) -> float:
    """A root of ``f`` in ``[a, b]`` (``fa``, ``fb`` of opposite signs) by the Illinois
    variant of regula falsi: few evaluations for a nearly linear ``f``."""
    side = 0
    for _ in range(max_iter):
        c = b - fb * (b - a) / (fb - fa)
        fc = f(c)
        if abs(fc) < ftol or abs(b - a) < 1e-12 * max(1.0, abs(c)):
            return c
        if (fc > 0) == (fb > 0):
            b, fb = c, fc
            if side == -1:
                fa /= 2
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb /= 2
            side = 1
    return c


def profile_confint(result, level: float = 0.95, parm=None) -> pd.DataFrame:
    """Profile-likelihood intervals of the covariance parameters (SD / correlation scale,
    names of :class:`Coordinates`) and fixed effects of ``result`` at ``level``; ``parm``
    selects some by name. The ML deviance is profiled (a REML fit is refitted by ML).

    The profile evaluates the deviance hundreds of times; for data of at most
    ``SMALL_N`` rows it runs on one intra-op thread (restored afterwards), which is the
    fastest for small factorisations, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    if result.n <= SMALL_N:
        torch.set_num_threads(1)
    try:
        return _profile_confint(result, level, parm)
    finally:
        torch.set_num_threads(threads)


def _profile_confint(result, level, parm) -> pd.DataFrame:
    fit_ml = ml_refit(result)
    prof = _Profiler(fit_ml)
    coords, objective = prof.coords, prof.objective
    names = coords.names + list(objective.x_names)
    wanted = names if parm is None else list(parm)
    unknown = [p for p in wanted if p not in names]
    if unknown:
        raise ValueError(f"parm: unknown parameter(s) {unknown}; choose from {names}")
    crit = float(stats.chi2.ppf(level, 1))
    z = math.sqrt(crit)
    y, X = objective.y, objective.X
    rows = {}
    for k, name in enumerate(coords.names):
        if name in wanted:
            se = prof.u_se[k]                    # first step: at most a factor e in an SD
            step = min(z * se, 1.0) if np.isfinite(se) and se > 0 else 0.5
            rows[name] = prof.interval(k, float(prof.u_hat[k]), step, crit, lambda v: y,
                                       lambda v: X, lambda v, k=k: coords.value(k, v),
                                       lambda side, k=k: coords.limit(k, side), LIMIT)
    beta = fit_ml.state.beta.cpu()
    se_beta = fit_ml.state.cov_beta.diagonal().sqrt().cpu()
    for j, name in enumerate(objective.x_names):
        if name in wanted:
            others = [i for i in range(X.shape[1]) if i != j]
            rows[name] = prof.interval(None, float(beta[j]), z * float(se_beta[j]), crit,
                                       lambda b, j=j: y - b * X[:, j], lambda b: X[:, others],
                                       float, lambda side: math.nan,
                                       2 ** 12 * z * float(se_beta[j]))
    return pd.DataFrame([rows[n] for n in wanted], index=wanted, columns=_columns(level))

