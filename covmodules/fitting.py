"""``fit``: build the REML objective, optimise it (AI-REML or a torch optimiser), report."""

from __future__ import annotations

import math
import warnings

import torch

from .base import CovarianceModule
from .optim import AIREML, scale_start
from .distributed import ShardedREML, world_size
from .reml import REML
from .results import FitResult

__all__ = ["fit", "start_values", "torch_optimizer"]

OPTIMIZERS = ("ai", "lbfgs", "adam", "sgd")


def fit(model: CovarianceModule | ShardedREML, y=None, X=None, *, x_names=None, method: str = "ai",
        reml: bool = True, start=None, max_iter: int | None = None, tol: float = 1e-10,
        lr: float = 0.05, solver=None, callback=None, checks=None) -> FitResult:
    """Fit the covariance parameters of ``y = X b + e``, ``Var(y) = V`` by REML (or ML).

    Args:
        model: a covariance module for ``V`` (e.g. a :class:`~covmodules.MixedModel`), or a
            :class:`~covmodules.distributed.ShardedREML` objective (then ``y``, ``X``,
            ``x_names``, ``reml``, ``solver`` and ``checks`` come from it): under
            ``torch.distributed`` every process runs the same fit and ends at the same estimates.
        y: response ``(n,)``; X: fixed-effects design ``(n, p)`` (``None``: intercept only).
        x_names: names of the columns of ``X``.
        method: ``"ai"`` (AI-REML, default), ``"lbfgs"``, ``"adam"`` or ``"sgd"``.
        reml: REML (default) or profiled ML.
        start: ``None`` (the registered values, or a data-driven scale when they are all at
            their defaults), a dict of natural-scale values by name, or a flat free-scale tensor.
        max_iter: iteration limit (default 50 for AI-REML, 200 for LBFGS, 2000 for Adam/SGD).
        tol: convergence tolerance (AI-REML: Newton decrement; torch optimisers: the change of
            the loss between iterations).
        lr: learning rate for Adam/SGD (LBFGS uses a strong-Wolfe line search).
        solver: likelihood solver name or instance (default: chosen from the structure;
            see :func:`covmodules.linalg.select_solver`); reported as ``result.solver``.
        callback: called with a dict per iteration (AI-REML) or per step (torch optimisers).
        checks: the design checks run before the fit, a :class:`~covmodules.checks.Checks`
            (default: all of them; e.g. ``Checks(obs_gt_levels=False)`` fits anyway).

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
    if method not in OPTIMIZERS:
        raise ValueError(f"method must be one of {OPTIMIZERS}, got {method!r}")
    if isinstance(model, ShardedREML):
        objective, model = model, model.model
    else:
        objective = REML(model, y, X, x_names=x_names, method="reml" if reml else "ml",
                         solver=solver, checks=checks)
    free = start_values(objective, start)
    if method == "ai":
        run = AIREML(objective, max_iter=50 if max_iter is None else max_iter, tol=tol,
                     callback=callback).run(free)
        free, state, ai = run.free, run.state, run.ai
        converged, iterations, boundary, history = (run.converged, run.iterations,
                                                    run.boundary, run.history)
    else:
        limit = (200 if method == "lbfgs" else 2000) if max_iter is None else max_iter
        free, converged, iterations, history = _torch_fit(objective, free, method, limit, tol,
                                                         lr, callback)
        state = objective.state(free)
        ai = objective.average_information(free, state)
        boundary = []
    model.set_free_params(free)
    return FitResult(objective, free, state, ai, converged, iterations, method, boundary,
                     history)


def start_values(objective: REML, start=None) -> torch.Tensor:
    """Free-scale start of a fit: ``start`` as a dict of natural-scale values by name or a flat
    free-scale tensor; by default the registered values, or :func:`~covmodules.optim.scale_start`
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


def torch_optimizer(method: str, params, lr: float = 0.05) -> torch.optim.Optimizer:
    """The torch optimiser ``fit`` uses for ``method`` (``"lbfgs"``, ``"adam"``, ``"sgd"``):
    LBFGS with a strong-Wolfe line search and tight tolerances; Adam / SGD at ``lr``."""
    if method == "lbfgs":
        return torch.optim.LBFGS(params, lr=1.0, max_iter=20, tolerance_grad=1e-12,
                                 tolerance_change=1e-14, history_size=20,
                                 line_search_fn="strong_wolfe")
    return (torch.optim.Adam if method == "adam" else torch.optim.SGD)(params, lr=lr)


def _torch_fit(objective, free, method, max_iter, tol, lr, callback):
    model = objective.model
    model.set_free_params(free)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(method, params, lr)

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
        loss = float(opt.step(closure))
        record = {"iteration": step, "loglik": -loss}
        history.append(record)
        if callback is not None:
            callback(record)
        if abs(previous - loss) < tol * max(1.0, abs(loss)):
            converged = True
            break
        previous = loss
    if not converged:
        warnings.warn(f"{method} reached max_iter={max_iter} without converging", stacklevel=3)
    return model.free_params().clone(), converged, step, history
