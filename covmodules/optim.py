r"""Average-information REML (AI-REML) with the safeguards production fits need.

Each iteration at free parameters ``θ``:

- one factorisation of ``V`` gives ``-l``, ``b̂`` and ``P y``;
- the score ``s = -∂(-l)/∂θ`` is one closed-form backward pass;
- ``AI = ½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k · P y`` needs only ``K`` structured products
  (``O(n³ + K n²)`` in all on the dense path; never a ``(K, n, n)`` tensor);
- the step ``Δ = (AI + λ D)⁻¹ s`` (Levenberg–Marquardt damping ``λ`` only when ``AI`` is
  not safely positive definite), clipped to ``max_step`` on the log / logit scale of variances
  and correlations, is halved (twice at most, then the damping grows) until ``-l`` decreases
  and ``V`` is positive definite.

Every decision is scale-free, so that ``y → s y`` gives the same iterations with variances
``× s²``: the conditioning test and the damping act on the Jacobi-scaled AI matrix
``D^{-1/2} AI D^{-1/2}`` (``D`` its diagonal), thresholds on variances are relative to the
data's variance and each parameter's unit follows from its role
(:class:`~covmodules.scale.ParameterScale`).

Variance parameters that run to zero (or correlations to ±1) are fixed at the boundary with a
"singular fit" warning instead of stalling (:func:`~covmodules.scale.settle_boundary`, shared
with the torch optimisers of :func:`covmodules.fit`). Convergence is declared on the Newton decrement
``sᵀΔ``, the Jacobi-scaled score, or a negligible change of both ``l`` and ``θ``. Every loop
is bounded; a non-finite score or AI matrix stops the run with a warning.

Example::

    >>> import torch
    >>> from covmodules import ScalarMatrix
    >>> from covmodules.reml import REML
    >>> from covmodules.optim import AIREML
    >>> y = torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64)
    >>> run = AIREML(REML(ScalarMatrix(4), y)).run()
    >>> run.converged, round(run.loglik, 6)     # closed form at sigma^2 = sample variance
    (True, -5.716201)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .linalg import NotPositiveDefiniteError
from .reml import REML
from .scale import (BOUNDED_ROLES, POSITIVE_ROLES, ParameterScale, finite_state, rounding,
                    settle_boundary, try_boundary)

__all__ = ["AIREML", "AIRun"]


@dataclass
class AIRun:
    """Outcome of an AI-REML run (free-scale estimates, diagnostics, history)."""

    free: torch.Tensor
    state: object
    ai: torch.Tensor
    converged: bool
    iterations: int
    boundary: list[str]
    history: list[dict] = field(default_factory=list)

    @property
    def loglik(self) -> float:
        return -float(self.state.neg_loglik)


class AIREML:
    """AI-REML on a :class:`~covmodules.reml.REML` objective.

    Args:
        objective: the REML (or ML) objective.
        max_iter: iteration limit; reaching it warns and reports ``converged=False``.
        tol: tolerance on the Newton decrement ``sᵀΔ`` (twice the predicted gain in ``l``).
        max_halvings: trial points (halvings, then growing damping) tried before giving up.
        max_step: largest change of a variance (log scale) or correlation (logit scale)
            parameter in one iteration (larger steps are clipped).
        callback: called as ``callback(record)`` after each iteration with the history record.
    """

    MAX_DAMPING_GROWTH = 40     # damping 1e-8 ... 1e31: beyond it the AI matrix is unusable

    def __init__(self, objective: REML, max_iter: int = 50, tol: float = 1e-10,
                 max_halvings: int = 20, max_step: float = 2.0, callback=None):
        self.objective, self.max_iter, self.tol = objective, int(max_iter), float(tol)
        self.max_halvings, self.max_step = int(max_halvings), float(max_step)
        self.callback = callback
        self.scale = ParameterScale(objective.model, objective.residual_variance())
        self.names = self.scale.names
        self.units = self.scale.free_units()

    # ---------------------------------------------------------------- pieces
    def _state(self, free):
        return finite_state(self.objective, free)

    def _jacobi(self, A, s, idx):
        """Square roots of the damping scale: AI's diagonal, floored so that a damped step
        stays near ``max_step`` free units even where AI is (near) singular, e.g. when P y
        is orthogonal to dV/dθ_k."""
        floor = s.abs() / (self.max_step * self.units.to(s)[idx])
        scale = torch.maximum(A.diagonal().abs(), floor)
        return torch.where(scale > 0, scale, torch.ones_like(scale)).sqrt()

    def _direction(self, ai, score, active, lam: float = 0.0):
        """Newton direction ``(AI + λ diag(AI))⁻¹ s`` on the active parameters, computed on
        the Jacobi-scaled AI matrix; ``λ`` grows from the given value until that matrix is
        safely positive definite. ``None`` when no damping makes it so (a non-finite AI)."""
        delta = torch.zeros_like(score)
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            return delta
        A, s = ai[idx][:, idx], score[idx]
        d = self._jacobi(A, s, idx)
        A = A / torch.outer(d, d)
        eye = torch.eye(len(idx), dtype=A.dtype, device=A.device)
        for _ in range(self.MAX_DAMPING_GROWTH):
            L, info = torch.linalg.cholesky_ex(A + lam * eye)
            pivots = L.diagonal() ** 2
            if int(info) == 0 and bool(torch.isfinite(pivots).all()) \
                    and float(pivots.min()) > 1e-12 * float(pivots.max()):
                delta[idx] = torch.cholesky_solve((s / d)[:, None], L)[:, 0] / d
                return delta
            lam = max(lam * 10.0, 1e-8)
        return None

    def _scaled(self, v, active) -> float:
        """``max_k |v_k| √D_k`` over the active parameters: a step in standard-error units."""
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            return 0.0
        d = self.ai.diagonal()[idx].abs().sqrt()
        return float((v[idx].abs() * d).max())

    def _fix_boundary(self, free, score, active, boundary) -> bool:
        """Fix parameters that sit at a boundary with the score pointing outwards."""
        changed = False
        for k in range(len(free)):
            x, s = float(free[k]), float(score[k])
            outward = s * x > 0 if self.scale.roles[k] == "correlation" else s < 0
            if active[k] and outward and self.scale.at_boundary(k, x):
                free[k] = self.scale.boundary_value(k, x)
                active[k] = False
                boundary.append(self.names[k])
                changed = True
        return changed

    def _probe_boundary(self, free, score, ai, active, boundary, state) -> bool:
        """A small variance (below 1e-3 of the data variance) whose Newton step runs past
        ``max_step`` towards zero is tried at the boundary (log-scale steps alone approach
        zero only linearly)."""
        delta = self._direction(ai, score, active)
        if delta is None:
            return False
        return any(delta[k] < -self.max_step and self._try_boundary(free, k, active, boundary,
                                                                     state, 1e-3, 0.0)
                   for k in range(len(free)))

    def _try_boundary(self, free, k, active, boundary, state, below, slack) -> bool:
        if not active[k] or try_boundary(self.objective, self.scale, free, k, state, below,
                                         slack) is None:
            return False
        active[k] = False
        boundary.append(self.names[k])
        return True

    def _release_boundary(self, free, score, active, boundary, released) -> bool:
        """Free a boundary variance again (twice at most) when the likelihood increases away
        from the boundary: its natural-scale score ``∂l/∂θ`` is positive, or negative for a
        parameter with sign partners (a Cholesky diagonal), which are then reflected."""
        for k in range(len(free)):
            if active[k] or self.scale.roles[k] not in POSITIVE_ROLES or released[k] >= 2:
                continue
            slope = float(score[k] / self.scale.transforms[k].derivative(free[k]))
            slope *= self.scale.natural_unit(k)
            if -slope > 1e-6 * self.objective.n and k in self.scale.reflections:
                self.scale.reflect(free, k)
                slope = -slope
            if slope > 1e-6 * self.objective.n:
                free[k] = self.scale.free_value(k, self.scale.natural_unit(k, 1e-2))
                active[k], released[k] = True, released[k] + 1
                boundary.remove(self.names[k])
                return True
        return False

    # ------------------------------------------------------------------- loop
    def start(self, free: torch.Tensor | None = None) -> None:
        """Begin at ``free`` (free scale; the model's registered values by default)."""
        model = self.objective.model
        free = (model._registered_free() if free is None else free).detach().clone()
        self.free = free.to(torch.float64)
        self.state = self._state(self.free)
        if self.state is None:
            natural = model.build_params(self.free, include_fixed=False).tolist()
            raise NotPositiveDefiniteError(
                f"V is not positive definite at the start values {dict(zip(self.names, natural))};"
                " set other start values (e.g. larger variances, correlations nearer 0)")
        self.active = torch.ones(len(self.free), dtype=torch.bool, device=self.free.device)
        self.boundary, self.history, self.released = [], [], [0] * len(self.free)
        self.iterations, self.damping, self.converged, self.done = 0, 0.0, False, False
        self.ai = None

    def _score_and_ai(self):
        """Score and AI matrix at the current point, after any boundary moves (each move fixes
        or releases a parameter, and releases are limited, so the moves end)."""
        for _ in range(4 * len(self.free) + 1):
            self.ai = self.objective.average_information(self.free, self.state)
            score = -self.objective.gradient(self.free, self.state)     # may reuse AI's work
            if not (bool(torch.isfinite(score).all()) and bool(torch.isfinite(self.ai).all())):
                return score, False
            if not self._boundary_moves(score):
                break
            self.state = self._state(self.free) or self.state
        return score, True

    def _polish(self, newton) -> None:
        """Take the converged Newton step too, when it does not lower ``l``: one more
        factorisation makes the estimates about as accurate as the decrement is small, not
        its square root."""
        candidate = self.free + torch.where(self.active, newton, torch.zeros_like(newton))
        trial = self._state(candidate)
        if trial is not None and float(trial.neg_loglik) <= float(self.state.neg_loglik):
            self.free, self.state = candidate, trial

    def _stop(self, reason: str) -> None:
        warnings.warn(f"AI-REML stopped: {reason} at {dict(zip(self.names, self.free.tolist()))}"
                      " (free scale); the fit has not converged", stacklevel=3)
        self._finish(False)

    def step(self) -> dict | None:
        """One AI-REML iteration (after any boundary moves); returns its history record, or
        ``None`` once the run has converged or stopped (see :attr:`converged`)."""
        if self.done:
            return None
        score, finite = self._score_and_ai()
        if not finite:
            return self._stop("the score or the AI matrix is not finite")
        newton = self._direction(self.ai, score, self.active)
        if newton is None:
            return self._stop("no damping makes the AI matrix positive definite")
        decrement = float(score @ newton)
        score_norm = self._scaled(score / self.ai.diagonal().abs().clamp(min=1e-300),
                                  self.active)
        if decrement < self.tol or score_norm < 1e-8:
            self._polish(newton)
            moved, self.state = settle_boundary(self.objective, self.free, self.state,
                                                self.scale, self.active)
            if moved:
                self.boundary += moved
                return self.step()
            return self._finish(True)
        if self.iterations >= self.max_iter:
            warnings.warn(f"AI-REML reached max_iter={self.max_iter} without converging "
                          f"(Newton decrement {decrement:.3g})", stacklevel=2)
            return self._finish(False)
        self.iterations += 1
        delta = (newton if self.damping == 0.0
                 else self._direction(self.ai, score, self.active, self.damping))
        limit = torch.tensor([self.max_step if r in BOUNDED_ROLES else math.inf
                              for r in self.scale.roles], dtype=self.free.dtype,
                             device=self.free.device)
        halvings, trial = 0, None
        while delta is not None and halvings <= self.max_halvings:
            # up to two step halvings, then Levenberg-Marquardt damping grows instead
            if halvings > 2:
                self.damping = max(10.0 * self.damping, 1e-4)
                delta = self._direction(self.ai, score, self.active, self.damping)
                if delta is None:
                    break
            step = 0.5 ** min(halvings, 2)
            clipped = torch.maximum(torch.minimum(delta, limit), -limit)
            candidate = self.free + step * clipped
            trial = self._state(candidate)
            if trial is not None and float(trial.neg_loglik) <= float(self.state.neg_loglik) \
                    + rounding(self.state.neg_loglik):
                break
            trial, halvings = None, halvings + 1
        if halvings <= 2:     # the step needed no more damping than it had: relax it
            self.damping = self.damping / 10.0 if self.damping > 1e-6 else 0.0
        if trial is None:
            if decrement >= 1e-6:
                warnings.warn("AI-REML could not improve the log-likelihood along the AI "
                              f"direction (Newton decrement {decrement:.3g}); stopping",
                              stacklevel=2)
            return self._finish(decrement < 1e-6)
        change = float(self.state.neg_loglik - trial.neg_loglik)
        self.free, self.state = candidate, trial
        record = {"iteration": self.iterations, "loglik": -float(trial.neg_loglik),
                  "change": change, "step": step, "halvings": halvings, "decrement": decrement,
                  "score_norm": score_norm, "params": self.free.tolist()}
        self.history.append(record)
        if self.callback is not None:
            self.callback(record)
        if change < 1e-12 * max(1.0, abs(float(trial.neg_loglik))) and \
                self._scaled(step * clipped, self.active) < 1e-9:
            self._finish(True)
        return record

    def _boundary_moves(self, score) -> bool:
        """Fix, release or probe boundary parameters; True when ``free`` changed."""
        args = (self.free, score, self.active, self.boundary)
        return (self._fix_boundary(*args)
                or self._release_boundary(*args, self.released)
                or self._probe_boundary(self.free, score, self.ai, self.active, self.boundary,
                                        self.state))

    def _finish(self, converged: bool) -> None:
        self.converged, self.done = converged, True
        if self.boundary:
            warnings.warn(f"singular fit: {self.boundary} at the boundary of the parameter space",
                          stacklevel=3)

    def result(self) -> AIRun:
        """The run so far as an :class:`AIRun`."""
        return AIRun(self.free, self.state, self.ai, self.converged, self.iterations,
                     list(self.boundary), list(self.history))

    def run(self, start: torch.Tensor | None = None) -> AIRun:
        """Iterate from ``start`` until converged, stopped or ``max_iter``."""
        self.start(start)
        while self.step() is not None:
            pass
        return self.result()

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (see :meth:`load_state_dict`)."""
        return {"free": self.free.clone(), "active": self.active.clone(),
                "boundary": list(self.boundary), "released": list(self.released),
                "iterations": self.iterations, "damping": self.damping,
                "converged": self.converged, "done": self.done, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Continue a run saved by :meth:`state_dict` (the factorisation is recomputed)."""
        self.start(state["free"])
        self.active = state["active"].clone()
        self.boundary, self.released = list(state["boundary"]), list(state["released"])
        self.iterations, self.damping = int(state["iterations"]), float(state["damping"])
        self.converged, self.done = bool(state["converged"]), bool(state["done"])
        self.history = list(state["history"])
