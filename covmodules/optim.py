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

Variance parameters that run to zero (or correlations to ±1) are fixed at the boundary with a
"singular fit" warning instead of stalling. Convergence is declared on the Newton decrement
``sᵀΔ``, the score norm, or a negligible change of both ``l`` and ``θ``.

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
from .transforms import Chain, Exp, ExpPow2, Sigmoid, Softplus, Transform

__all__ = ["AIREML", "AIRun", "scale_start"]


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


def _kind(t: Transform) -> str:
    """'variance' (positive, boundary at 0), 'correlation' (bounded, sigmoid) or 'free'."""
    if isinstance(t, (ExpPow2, Exp, Softplus)):
        return "variance"
    if isinstance(t, Chain) and any(isinstance(s, Sigmoid) for s in t.transforms):
        return "correlation"
    if isinstance(t, Sigmoid):
        return "correlation"
    return "free"


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

    def __init__(self, objective: REML, max_iter: int = 50, tol: float = 1e-10,
                 max_halvings: int = 20, max_step: float = 2.0, callback=None):
        self.objective, self.max_iter, self.tol = objective, int(max_iter), float(tol)
        self.max_halvings, self.max_step = int(max_halvings), float(max_step)
        self.callback = callback
        model = objective.model
        self.names = model.free_param_names
        self.kinds = [_kind(t) for t in model.free_param_trans]
        self.transforms = model.free_param_trans
        self.data_variance = objective.residual_variance()

    # ---------------------------------------------------------------- pieces
    def _state(self, free):
        try:
            state = self.objective.state(free)
        except NotPositiveDefiniteError:
            return None
        return state if bool(torch.isfinite(state.neg_loglik)) else None

    def _direction(self, ai, score, active, lam: float = 0.0):
        """Newton direction ``(AI + λ diag(AI))⁻¹ s`` on the active parameters; ``λ`` grows
        from the given value until the damped matrix is safely positive definite."""
        delta = torch.zeros_like(score)
        idx = active.nonzero()[:, 0]
        if idx.numel() == 0:
            return delta
        A, s = ai[idx][:, idx], score[idx]
        # damping scale: AI's diagonal, floored so that a damped step stays near max_step even
        # where AI is (near) singular, e.g. when P y is orthogonal to dV/dθ_k
        scale = torch.maximum(A.diagonal().abs(), s.abs() / self.max_step)
        scale = scale.clamp(min=1e-12 * float(scale.max()) + 1e-300)
        while True:
            L, info = torch.linalg.cholesky_ex(A + lam * torch.diag(scale))
            ok = int(info) == 0
            if ok:
                diag = L.diagonal()
                ok = float(diag.min() ** 2) > 1e-12 * float(diag.max() ** 2)
            if ok:
                delta[idx] = torch.cholesky_solve(s[:, None], L)[:, 0]
                return delta
            lam = max(lam * 10.0, 1e-8)

    def _at_boundary(self, k: int, x: float) -> bool:
        kind = self.kinds[k]
        if kind == "correlation":
            return abs(x) > 18.0
        if kind == "variance":
            return self._implied_variance(k, x) < 1e-8 * self.data_variance
        return False

    def _fix_boundary(self, free, score, active, boundary) -> bool:
        """Fix parameters that sit at a boundary with the score pointing outwards."""
        changed = False
        for k in range(len(free)):
            x, s = float(free[k]), float(score[k])
            outward = s * x > 0 if self.kinds[k] == "correlation" else s < 0
            if active[k] and outward and self._at_boundary(k, x):
                free[k] = self._boundary_value(k, x)
                active[k] = False
                boundary.append(self.names[k])
                changed = True
        return changed

    def _probe_boundary(self, free, score, ai, active, boundary, state) -> bool:
        """A small variance (below 1e-3 of the data variance) whose Newton step runs past
        ``max_step`` towards zero is tried at the boundary (log-scale steps alone approach
        zero only linearly)."""
        delta = self._direction(ai, score, active)
        return any(delta[k] < -self.max_step and self._try_boundary(free, k, active, boundary,
                                                                     state, 1e-3, 0.0)
                   for k in range(len(free)))

    def _settle_tiny_variances(self, free, active, boundary, state) -> bool:
        """At convergence, a variance below 1e-6 of the data variance is tried at the boundary
        (the log scale flattens before reaching zero)."""
        return any(self._try_boundary(free, k, active, boundary, state, 1e-6, 1e-9)
                   for k in range(len(free)))

    def _try_boundary(self, free, k, active, boundary, state, below, slack) -> bool:
        """Fix active variance ``k``, if below ``below`` times the data variance, at the
        boundary when that lowers ``l`` by at most ``slack``."""
        if not (active[k] and self.kinds[k] == "variance"
                and self._implied_variance(k, float(free[k])) < below * self.data_variance):
            return False
        probe = free.clone()
        probe[k] = self._boundary_value(k, -1.0)
        trial = self._state(probe)
        if trial is None or float(trial.neg_loglik) > float(state.neg_loglik) + slack:
            return False
        free[k], active[k] = probe[k], False
        boundary.append(self.names[k])
        return True

    def _release_boundary(self, free, score, active, boundary, released) -> bool:
        """Free a boundary variance again (twice at most) when the likelihood increases away
        from the boundary: its natural-scale score ``∂l/∂σ²`` is positive."""
        for k in range(len(free)):
            if active[k] or self.kinds[k] != "variance" or released[k] >= 2:
                continue
            slope = float(score[k] / self.transforms[k].derivative(free[k]))
            if slope * self.data_variance > 1e-6 * self.objective.n:
                target = 1e-2 * self.data_variance
                target = math.sqrt(target) if isinstance(self.transforms[k], Exp) else target
                free[k] = self.transforms[k].inverse(torch.tensor(target, dtype=torch.float64))
                active[k], released[k] = True, released[k] + 1
                boundary.remove(self.names[k])
                return True
        return False

    def _implied_variance(self, k: int, x: float) -> float:
        value = float(self.transforms[k].forward(torch.tensor(x, dtype=torch.float64)))
        return value ** 2 if isinstance(self.transforms[k], Exp) else value

    def _boundary_value(self, k: int, direction: float) -> float:
        if self.kinds[k] == "correlation":
            return math.copysign(18.5, direction)
        target = 1e-10 * self.data_variance
        t = self.transforms[k]
        target = math.sqrt(target) if isinstance(t, Exp) else target
        return float(t.inverse(torch.tensor(target, dtype=torch.float64)))

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

    def step(self) -> dict | None:
        """One AI-REML iteration (after any boundary moves); returns its history record, or
        ``None`` once the run has converged or stopped (see :attr:`converged`)."""
        if self.done:
            return None
        while True:
            score = -self.objective.gradient(self.free, self.state)
            self.ai = self.objective.average_information(self.free, self.state)
            if not self._boundary_moves(score):
                break
            self.state = self._state(self.free) or self.state
        newton = self._direction(self.ai, score, self.active)
        decrement = float(score @ newton)
        score_norm = float(score[self.active].abs().max()) if bool(self.active.any()) else 0.0
        if decrement < self.tol or score_norm < 1e-8:
            if self._settle_tiny_variances(self.free, self.active, self.boundary, self.state):
                self.state = self._state(self.free) or self.state
                return self.step()
            return self._finish(True)
        if self.iterations >= self.max_iter:
            warnings.warn(f"AI-REML reached max_iter={self.max_iter} without converging "
                          f"(Newton decrement {decrement:.3g})", stacklevel=2)
            return self._finish(False)
        self.iterations += 1
        delta = (newton if self.damping == 0.0
                 else self._direction(self.ai, score, self.active, self.damping))
        bounded = torch.tensor([k != "free" for k in self.kinds], device=self.free.device)
        halvings, trial = 0, None
        while halvings <= self.max_halvings:
            # up to two step halvings, then Levenberg-Marquardt damping grows instead
            if halvings > 2:
                self.damping = max(10.0 * self.damping, 1e-4)
                delta = self._direction(self.ai, score, self.active, self.damping)
            step = 0.5 ** min(halvings, 2)
            clipped = torch.where(bounded, delta.clamp(-self.max_step, self.max_step), delta)
            candidate = self.free + step * clipped
            trial = self._state(candidate)
            if trial is not None and float(trial.neg_loglik) <= float(self.state.neg_loglik) \
                    + 1e-12 * abs(float(self.state.neg_loglik)):
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
                float((step * clipped).abs().max()) < 1e-9:
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


def scale_start(objective: REML) -> torch.Tensor:
    """Data-driven start: shift every variance parameter to the scale of the OLS residuals.

    Tries a few common scales around the OLS residual variance (one factorisation each) and
    returns the free-parameter vector with the best likelihood; correlations stay at their
    registered values.
    """
    model = objective.model
    free = model.free_params().to(torch.float64)
    kinds = [_kind(t) for t in model.free_param_trans]
    mask = torch.tensor([k == "variance" for k in kinds], device=free.device)
    if not bool(mask.any()):
        return free
    base = 0.5 * math.log(objective.residual_variance())
    best, best_loss = free, math.inf
    for shift in [base + 0.5 * math.log(10.0) * j for j in range(-4, 3)]:
        candidate = torch.where(mask, free + shift, free)
        try:
            loss = float(objective.state(candidate).neg_loglik)
        except NotPositiveDefiniteError:
            continue
        if loss < best_loss:
            best, best_loss = candidate, loss
    return best
