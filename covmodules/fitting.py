"""``fit``: build the REML objective, optimise it (AI-REML or a torch optimiser), report."""

from __future__ import annotations

import math
import warnings

import torch

from .base import CovarianceModule
from .optim import AIREML
from .scale import ParameterScale, scale_start, settle_boundary, unidentified_params
from .distributed import ShardedREML, world_size
from .linalg import NotPositiveDefiniteError
from .reml import REML
from .results import FitResult
from .threads import BUILD_PER_ROW, threads_for

__all__ = ["fit", "fit_result", "start_values", "torch_optimizer", "loss_converged", "InUnits",
           "free_parameters", "free_units"]

OPTIMIZERS = ("ai", "lbfgs", "adam", "sgd")
METHODS = ("reml", "ml")


def fit(model: CovarianceModule | REML | ShardedREML, y=None, X=None, *, x_names=None,
        optimizer: str = "ai", method: str = "reml", start=None, max_iter: int | None = None,
        tol: float = 1e-10, lr: float = 0.05, solver=None, callback=None, checks=None,
        reml: bool | None = None) -> FitResult:
    """Fit the covariance parameters of ``y = X b + e``, ``Var(y) = V`` by REML (or ML).

    Args:
        model: a covariance module for ``V`` (e.g. a :class:`~covmodules.MixedModel`), or an
            objective (then ``y``, ``X``, ``x_names``, ``method``, ``solver`` and ``checks``
            come from it): a :class:`~covmodules.reml.REML`, or for data over processes a
            :class:`~covmodules.distributed.ShardedREML` or
            :class:`~covmodules.crossed.CrossedREML`; under ``torch.distributed`` every
            process runs the same fit and ends at the same estimates.
        y: response ``(n,)``; X: fixed-effects design ``(n, p)`` (``None``: intercept only).
        x_names: names of the columns of ``X``.
        optimizer: ``"ai"`` (AI-REML, default), ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        method: ``"reml"`` (default) or ``"ml"`` (profiled maximum likelihood).
        start: ``None`` (the registered values, or a data-driven scale when they are all at
            their defaults), a dict of natural-scale values by name, or a flat free-scale tensor.
        max_iter: iteration limit (default 50 for AI-REML, 200 for LBFGS, 2000 for Adam/SGD).
        tol: convergence tolerance (AI-REML: Newton decrement; torch optimisers: the change of
            the loss between iterations, per observation).
        lr: learning rate for Adam/SGD (LBFGS uses a strong-Wolfe line search).
        solver: likelihood solver name or instance (default: chosen from the structure;
            see :func:`covmodules.linalg.select_solver`); reported as ``result.solver``.
        callback: called with a dict per iteration (AI-REML) or per step (torch optimisers).
        checks: the design checks run before the fit, a :class:`~covmodules.checks.Checks`
            (default: all of them; e.g. ``Checks(obs_gt_levels=False)`` fits anyway).
        reml: deprecated (``method="reml"`` / ``"ml"``); so is ``method`` naming the optimiser.

    Returns:
        A :class:`~covmodules.results.FitResult`; the model is left at the estimates.

    Example::

        >>> import torch
        >>> from covmodules import MixedModel, ScalarMatrix, fit
        >>> g = torch.arange(6).repeat_interleave(4)
        >>> Z = torch.nn.functional.one_hot(g).double()
        >>> y = torch.tensor([3., 4, 5, 4, 8, 9, 7, 8, 1, 2, 2, 3,
        ...                   6, 5, 6, 7, 2, 3, 4, 3, 9, 8, 9, 10], dtype=torch.float64)
        >>> model = MixedModel(random={"g": (Z, ScalarMatrix(6))}, residual=ScalarMatrix(24))
        >>> result = fit(model, y)
        >>> result.converged, round(result.params["g/sigma^2"], 4)   # balanced: (MSB - MSW) / 4
        (True, 7.7)
    """
    optimizer, method = _old_keywords(optimizer, method, reml)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (the optimiser is optimizer=, one "
                         f"of {OPTIMIZERS}), got {method!r}")
    if isinstance(model, (ShardedREML, REML)):
        objective, model = model, model.model
    else:
        rows = model.shape[0] if isinstance(model, CovarianceModule) else 0
        with threads_for(BUILD_PER_ROW * rows):         # checks, sums, patterns: O(n) passes
            objective = REML(model, y, X, x_names=x_names, method=method, solver=solver,
                             checks=checks)
    y = getattr(objective, "y", None)
    with threads_for(objective.solver.cost, None if y is None else y.device):
        free = start_values(objective, start)
        if optimizer == "ai":
            run = AIREML(objective, max_iter=50 if max_iter is None else max_iter, tol=tol,
                         callback=callback).run(free)
            return fit_result(objective, run.free, run.converged, run.iterations, optimizer,
                              run.history, run.boundary, run.state)
        limit = (200 if optimizer == "lbfgs" else 2000) if max_iter is None else max_iter
        free, converged, iterations, history = _torch_fit(objective, free, optimizer, limit,
                                                         tol, lr, callback)
        return fit_result(objective, free, converged, iterations, optimizer, history)


def _old_keywords(optimizer: str, method: str, reml: bool | None) -> tuple[str, str]:
    """``(optimizer, method)`` from fit's former keywords, with a ``DeprecationWarning``:
    ``method`` naming the optimiser (``"ai"``, ``"lbfgs"``, ...), ``reml=True/False``."""
    if method in OPTIMIZERS:
        warnings.warn(f"fit(method={method!r}) is deprecated: method is 'reml' or 'ml' now; "
                      f"pass optimizer={method!r}", DeprecationWarning, stacklevel=3)
        optimizer, method = method, "reml"
    if reml is not None:
        warnings.warn(f"fit(reml={reml}) is deprecated: pass method="
                      f"{'reml' if reml else 'ml'!r}", DeprecationWarning, stacklevel=3)
        method = "reml" if reml else "ml"
    return optimizer, method


def fit_result(objective, free, converged: bool, iterations: int, optimizer: str,
               history=(), boundary: list[str] | None = None, state=None) -> FitResult:
    """The :class:`~covmodules.results.FitResult` of a run that ended at free-scale ``free``
    (every optimiser, here and in ``training``): the model is set to ``free``; a torch
    optimiser's run (``boundary`` ``None``) has its boundary parameters settled as AI-REML's
    are (:func:`~covmodules.scale.settle_boundary`); a singular AI matrix is reported
    (:attr:`FitResult.unidentified`), each with a warning."""
    state = objective.state(free) if state is None else state
    if boundary is None:
        boundary, state = settle_boundary(objective, free, state)
        if boundary:
            warnings.warn(f"singular fit: {boundary} at the boundary of the parameter space",
                          stacklevel=3)
    objective.model.set_free_params(free)
    ai = objective.average_information(free, state)
    names = objective.model.free_param_names
    unidentified = unidentified_params(ai, names, [name not in boundary for name in names])
    if unidentified:
        warnings.warn(f"the AI matrix is singular at the estimates: {unidentified} are not "
                      "identified by these data (their standard errors are NaN); simplify the "
                      "model or fix one of them", stacklevel=3)
    return FitResult(objective, free, state, ai, converged, iterations, optimizer,
                     list(boundary), list(history), unidentified)


def start_values(objective: REML, start=None) -> torch.Tensor:
    """Free-scale start of a fit: ``start`` as a dict of natural-scale values by name or a flat
    free-scale tensor; by default the registered values, or :func:`~covmodules.scale.scale_start`
    when they are all at their defaults."""
    model = objective.model
    if start is None:
        current = model.free_params().to(torch.float64)
        if torch.equal(current.cpu(), model.free_param_defaults):
            return scale_start(objective)
        return current
    if isinstance(start, dict):
        model.set_params(start)
        return model.free_params().to(torch.float64)
    return model._check_free(start).detach().to(torch.float64)


def torch_optimizer(optimizer: str, params, lr: float = 0.05, objective=None
                    ) -> torch.optim.Optimizer:
    """The torch optimiser ``fit`` uses for ``optimizer`` (``"lbfgs"``, ``"adam"``, ``"sgd"``):
    LBFGS with a strong-Wolfe line search and tight tolerances; Adam / SGD at ``lr``.

    With the ``objective``, it runs on ``θ / unit`` (:class:`InUnits`) and LBFGS stops when
    an iteration changes ``-l`` by less than ``1e-13`` per observation: a scale-free rule
    above the rounding error of ``-l``, so the end point does not depend on rounding (the
    order of the sums over shards and processes)."""
    change = 1e-14 if objective is None else 1e-13 * objective.n

    def build(tensors):
        if optimizer == "lbfgs":
            return torch.optim.LBFGS(tensors, lr=1.0, max_iter=20, tolerance_grad=1e-12,
                                     tolerance_change=change, history_size=20,
                                     line_search_fn="strong_wolfe")
        return (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(tensors, lr=lr)

    if objective is None:
        return build(list(params))
    return InUnits(params, free_units(objective), build)


def free_parameters(model) -> list[torch.nn.Parameter]:
    """The model's free parameters (``nn.Parameter`` s) in the flat free order."""
    raws = model._raw_tensors()
    return [raws[i] for i in model.free_param_index]


def free_units(objective) -> list[float]:
    """Each free parameter's unit on the data's scale (:meth:`ParameterScale.free_units`)."""
    return ParameterScale(objective.model, objective.residual_variance()).free_units().tolist()


class InUnits(torch.optim.Optimizer):
    """A torch optimiser run on ``u = θ / unit`` for parameters ``θ``: each free parameter
    measured in its unit on the data's scale, so that the iterates do not depend on the scale
    of ``y`` (a loading moves in units of ``y``'s standard deviation, a log variance in its
    own units). The parameters ``θ`` keep the values and gradients; ``build(tensors)`` makes
    the inner optimiser of the ``u`` tensors, whose state this one saves and loads."""

    def __init__(self, params, units, build):
        params = list(params)
        super().__init__(params, {})
        if len(units) != len(params):
            raise ValueError(f"units has {len(units)} entries for {len(params)} parameters")
        self.units = [float(u) for u in units]
        self.scaled = [p.detach().clone().requires_grad_(True) for p in params]
        self.inner = build(self.scaled)

    def _pairs(self):
        return zip(self.param_groups[0]["params"], self.scaled, self.units)

    @torch.no_grad()
    def _write_params(self) -> None:
        for p, u, unit in self._pairs():
            p.copy_(u * unit)

    def _read_grads(self) -> None:
        for p, u, unit in self._pairs():
            u.grad = None if p.grad is None else p.grad * unit

    def step(self, closure=None):
        with torch.no_grad():
            for p, u, unit in self._pairs():          # θ may have been set since the last step
                u.copy_(p / unit)

        def scaled_closure():
            self._write_params()
            with torch.enable_grad():
                loss = closure()
            self._read_grads()
            return loss

        if closure is None:
            self._read_grads()
        loss = self.inner.step(None if closure is None else scaled_closure)
        self._write_params()
        return loss

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)


def _torch_fit(objective, free, optimizer, max_iter, tol, lr, callback):
    """Run the torch optimiser ``optimizer`` in the parameters' units (:class:`InUnits`)."""
    model = objective.model
    model.set_free_params(free)
    params = free_parameters(model)
    opt = torch_optimizer(optimizer, params, lr, objective)

    def closure():
        opt.zero_grad()
        loss = objective.loss()
        loss.backward()
        if world_size() > 1:           # what DDP does: average the processes' gradients
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world_size()
        return loss.detach()

    history, previous, converged = [], math.inf, False
    for step in range(1, max_iter + 1):
        last = model.free_params().clone()
        try:
            loss = float(opt.step(closure))
        except NotPositiveDefiniteError as err:
            warnings.warn(f"{optimizer} stopped at its last point where V is positive definite: "
                          f"a trial step left that region ({err}); optimizer='ai' halves such "
                          "steps", stacklevel=3)
            return last, False, step, history
        record = {"iteration": step, "loglik": -loss}
        history.append(record)
        if callback is not None:
            callback(record)
        if loss_converged(previous, loss, tol, objective.n):
            converged = True
            break
        previous = loss
    if not converged:
        warnings.warn(f"{optimizer} reached max_iter={max_iter} without converging",
                      stacklevel=3)
    return model.free_params().clone(), converged, step, history


def loss_converged(previous: float, loss: float, tol: float, n: int) -> bool:
    """The torch optimisers' convergence rule: ``-l`` changed by less than ``tol`` per
    observation (an absolute change: ``-l`` moves by ``(n - p) log s`` when ``y → s y``)."""
    return abs(previous - loss) < tol * n
