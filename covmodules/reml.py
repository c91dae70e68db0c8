r"""The REML and ML objectives and losses; solvers (``covmodules.linalg``) do the algebra.

For ``y = X b + e``, ``e ~ N(0, V(θ))``, with ``r = y - X b̂`` (``b̂`` the GLS estimate),
the REML log-likelihood on R's scale (lme4, nlme, glmmTMB: no ``log|XᵀX|`` term) is

.. math::

    l_R = -\tfrac12\left[\log|V| + \log|X^T V^{-1} X| + r^T V^{-1} r\right]
          - \tfrac{n-p}{2}\log 2\pi ,

and the profiled ML log-likelihood ``l = -½[log|V| + rᵀV⁻¹r] - n/2 log 2π``.

The loss is ``-l``, differentiable in the covariance parameters (through closed-form
backward passes, see :mod:`covmodules.base` and :mod:`covmodules.linalg.dense`) and in ``y``
and ``X`` so a network may produce either. The solver is chosen from the model's structure
(:func:`covmodules.linalg.select_solver`) or named with ``solver=``.

Example::

    >>> import torch
    >>> from covmodules import ScalarMatrix
    >>> from covmodules.reml import reml_loss
    >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> X = torch.ones(3, 1, dtype=torch.float64)
    >>> loss = reml_loss(ScalarMatrix(3), y, X)
    >>> round(loss.item(), 6)      # ½[log|V| + log|XᵀX| + rᵀr] + (n-p)/2 log 2π = ½[0 + log 3 + 14/3] + log 2π
    4.720517
"""

from __future__ import annotations

import torch
from torch import nn

from .base import CovarianceModule
from .checks import Checks, prepare
from .linalg import NotPositiveDefiniteError, identify, select_solver

__all__ = ["NotPositiveDefiniteError", "REML",
           "reml_loss", "ml_loss", "REMLLoss", "MLLoss"]


class REML:
    """The REML (or ML) objective of ``y = X b + e``, ``e ~ N(0, V)``, ``V`` a covariance module.

    Validates the data once with :func:`covmodules.checks.prepare` (real finite values,
    matching sizes, full-rank ``X``: aliased columns are dropped with a warning naming them,
    like lme4; ``y`` not fitted exactly by ``X``; the design checks of ``checks``) and
    evaluates the loss at the registered parameters or at given free-scale values. ``y`` and
    ``X`` are kept as float64 on the model's device.

    Args:
        model: a :class:`~covmodules.base.CovarianceModule` of shape ``(n, n)``.
        y: response, shape ``(n,)``.
        X: fixed-effects design ``(n, p)``; ``None`` means an intercept only.
        x_names: column names of ``X`` (default ``x0, x1, ...``).
        method: ``"reml"`` or ``"ml"``.
        reduction: ``"sum"`` (the total, R's scale) or ``"mean"`` (per observation).
        solver: ``None`` (chosen from the model's structure), a name from
            ``covmodules.linalg.SOLVERS`` (``"dense"``, ...) or a ``Solver`` instance.
        checks: the design checks to run, a :class:`~covmodules.checks.Checks` (default:
            all of them).
    """

    def __init__(self, model: CovarianceModule, y, X=None, x_names=None, method: str = "reml",
                 reduction: str = "sum", solver=None, checks: Checks | None = None):
        if not isinstance(model, CovarianceModule):
            raise TypeError(f"model must be a CovarianceModule, got {type(model).__name__}")
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        data = prepare([(model, y, X)], x_names, checks)
        self._hold(model, method, reduction, data.ys[0], data.Xs[0], data.x_names, data.dropped,
                   data.residual_variance)
        identify(model)
        self.solver = select_solver(model, solver)

    def _hold(self, model, method, reduction, y, X, x_names, dropped, residual_variance):
        """Keep the model, the method and the validated data."""
        self.model, self.method, self.reduction = model, method, reduction
        self.y, self.X, self.x_names, self.dropped = y, X, list(x_names), list(dropped)
        self._residual_variance = residual_variance

    @classmethod
    def of_prepared(cls, model, y, X, x_names, method, solver, dropped,
                    residual_variance: float) -> "REML":
        """The objective of data already validated as part of a whole (a shard of a
        :class:`~covmodules.distributed.ShardedREML`): no checks, the whole's column
        decisions and scale."""
        self = cls.__new__(cls)
        self._hold(model, method, "sum", y, X, x_names, dropped, residual_variance)
        self.solver = solver
        return self

    def refit(self, model: CovarianceModule, method: str) -> "REML":
        """The objective of the same data for ``model`` (e.g. a copy) and ``method``, with
        this one's solver kind."""
        return REML(model, self.y, self.X, x_names=self.x_names, method=method,
                    solver=self.solver.name)

    @property
    def n(self) -> int:
        return self.y.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    @property
    def device(self) -> torch.device:
        return self.y.device

    def residual_variance(self) -> float:
        """Variance of the OLS residuals of ``y`` on ``X`` (positive: ``y`` is not fitted
        exactly): the data's scale, for start values and boundary thresholds."""
        return self._residual_variance

    def loss(self, free_params=None) -> torch.Tensor:
        """``-l`` at the registered parameters (gradients reach them) or at ``free_params``."""
        out = self.solver.loss(free_params, self.y, self.X, self.method)
        return out / self.n if self.reduction == "mean" else out

    def state(self, free_params=None):
        """Factorisation, GLS estimate and ``P y`` at the given point (no autograd)."""
        return self.solver.state(free_params, self.y, self.X, self.method)

    def loglik(self, free_params=None) -> float:
        """The log-likelihood on R's scale (total)."""
        return -float(self.state(free_params).neg_loglik)

    def gradient(self, free: torch.Tensor, state) -> torch.Tensor:
        """``∂(-l)/∂θ`` over the free parameters: one closed-form backward pass."""
        return self.solver.gradient(free, state)

    def average_information(self, free: torch.Tensor, state) -> torch.Tensor:
        """``AI = ½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k (P y)``: K structured products."""
        return self.solver.average_information(free, state)

    def term_sums(self, name: str, state) -> torch.Tensor:
        """``Z_tᵀ P y`` (``(q_t, 1)``) of random term ``name`` of a
        :class:`~covmodules.MixedModel`, for its BLUPs ``G_t Z_tᵀ P y``."""
        return self.model.zt_matmul(name, state.Py[:, None])


def reml_loss(model: CovarianceModule, y, X=None, reduction: str = "sum") -> torch.Tensor:
    """Minus the REML log-likelihood (R's scale) at the model's registered parameters."""
    return REML(model, y, X, reduction=reduction).loss()


def ml_loss(model: CovarianceModule, y, X=None, reduction: str = "sum") -> torch.Tensor:
    """Minus the profiled ML log-likelihood at the model's registered parameters."""
    return REML(model, y, X, method="ml", reduction=reduction).loss()


class REMLLoss(nn.Module):
    """``REMLLoss()(model, y, X)``: minus the REML log-likelihood, as a loss module."""

    method = "reml"

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, model: CovarianceModule, y, X=None) -> torch.Tensor:
        return REML(model, y, X, method=self.method, reduction=self.reduction).loss()


class MLLoss(REMLLoss):
    """``MLLoss()(model, y, X)``: minus the profiled ML log-likelihood."""

    method = "ml"
