r"""REML and ML losses, BLUE and the quantities AI-REML needs (dense Cholesky path).

For ``y = X b + e``, ``e ~ N(0, V(θ))``, with ``r = y - X b̂`` (``b̂`` the GLS estimate),
the REML log-likelihood on R's scale (lme4, nlme, glmmTMB: no ``log|XᵀX|`` term) is

.. math::

    l_R = -\tfrac12\left[\log|V| + \log|X^T V^{-1} X| + r^T V^{-1} r\right]
          - \tfrac{n-p}{2}\log 2\pi ,

and the profiled ML log-likelihood ``l = -½[log|V| + rᵀV⁻¹r] - n/2 log 2π``.

The loss is ``-l`` built by :class:`NegLogLikFunction`: the forward pass factorises ``V``
once; the backward pass returns the closed-form cotangent ``½(P - Py (Py)ᵀ)`` for ``V``
(``P = V⁻¹ - V⁻¹X(XᵀV⁻¹X)⁻¹XᵀV⁻¹``; ``V⁻¹`` in place of ``P`` for ML), plus the cotangents
of ``y`` and ``X`` so a network may produce either. The covariance module then contracts that
cotangent in closed form (see :mod:`covmodules.base`).

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

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import CovarianceModule

__all__ = ["NotPositiveDefiniteError", "NegLogLikFunction", "LikelihoodState", "REML",
           "factorize", "cotangent_v",
           "reml_loss", "ml_loss", "REMLLoss", "MLLoss"]


class NotPositiveDefiniteError(ValueError):
    """``V`` (or ``XᵀV⁻¹X``) is not positive definite at the given parameters."""


@dataclass
class LikelihoodState:
    """Factorisation and estimates at one parameter value (dense path)."""

    L: torch.Tensor          # Cholesky factor of V
    LA: torch.Tensor         # Cholesky factor of A = XᵀV⁻¹X (p x p)
    Xs: torch.Tensor         # L⁻¹X
    beta: torch.Tensor       # GLS estimate
    Py: torch.Tensor         # V⁻¹(y - X b̂) = P y
    neg_loglik: torch.Tensor
    method: str

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``V⁻¹ B``."""
        return torch.cholesky_solve(B, self.L)

    def solve_x(self) -> torch.Tensor:
        """``V⁻¹ X``."""
        return torch.linalg.solve_triangular(self.L.T, self.Xs, upper=True)

    def project(self, U: torch.Tensor) -> torch.Tensor:
        """``Uᵀ P U`` for ``U`` of shape ``(n, k)`` (``Uᵀ V⁻¹ U`` for ML) in ``O(n² k)``."""
        Us = torch.linalg.solve_triangular(self.L, U, upper=False)
        out = Us.T @ Us
        if self.method == "reml":
            C = torch.linalg.solve_triangular(self.LA, self.Xs.T @ Us, upper=False)
            out = out - C.T @ C
        return out

    @property
    def cov_beta(self) -> torch.Tensor:
        """``(XᵀV⁻¹X)⁻¹``."""
        return torch.cholesky_inverse(self.LA)


def factorize(V, y, X, method: str = "reml") -> LikelihoodState:
    """Cholesky of ``V``, GLS estimate and ``-l`` (R's scale) without autograd."""
    n, p = X.shape
    L, info = torch.linalg.cholesky_ex(V)
    if int(info) != 0 or not bool(torch.isfinite(L.diagonal()).all()):
        raise NotPositiveDefiniteError(
            "V is not positive definite at these parameters (Cholesky failed at column "
            f"{int(info)}); try other start values, e.g. larger variances or smaller correlations")
    Xs = torch.linalg.solve_triangular(L, X, upper=False)
    ys = torch.linalg.solve_triangular(L, y[:, None], upper=False)[:, 0]
    LA, info = torch.linalg.cholesky_ex(Xs.T @ Xs)
    if int(info) != 0:
        raise NotPositiveDefiniteError("XᵀV⁻¹X is not positive definite: X is rank deficient")
    beta = torch.cholesky_solve((Xs.T @ ys)[:, None], LA)[:, 0]
    rs = ys - Xs @ beta
    Py = torch.linalg.solve_triangular(L.T, rs[:, None], upper=True)[:, 0]
    logdet_v = 2 * torch.log(L.diagonal()).sum()
    if method == "reml":
        logdet_a = 2 * torch.log(LA.diagonal()).sum()
        neg = 0.5 * (logdet_v + logdet_a + rs @ rs) + 0.5 * (n - p) * math.log(2 * math.pi)
    else:
        neg = 0.5 * (logdet_v + rs @ rs) + 0.5 * n * math.log(2 * math.pi)
    return LikelihoodState(L, LA, Xs, beta, Py, neg, method)


class NegLogLikFunction(torch.autograd.Function):
    """``-l(V, y, X)`` with closed-form cotangents for ``V``, ``y`` and ``X``."""

    @staticmethod
    def forward(ctx, V, y, X, method):
        state = factorize(V, y, X, method)
        ctx.state = state
        return state.neg_loglik

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        s = ctx.state
        gV = gy = gX = None
        if ctx.needs_input_grad[0]:
            gV = cotangent_v(s) * grad
        if ctx.needs_input_grad[1]:
            gy = grad * s.Py
        if ctx.needs_input_grad[2]:
            gX = -torch.outer(s.Py, s.beta)
            if s.method == "reml":
                gX += s.solve_x() @ s.cov_beta
            gX *= grad
        return gV, gy, gX, None


def cotangent_v(s: LikelihoodState) -> torch.Tensor:
    """``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` (``V⁻¹`` in place of ``P`` for ML), in ``O(n³)``."""
    G = torch.cholesky_inverse(s.L)
    if s.method == "reml":
        C = torch.linalg.solve_triangular(s.LA, s.solve_x().T, upper=False)
        G -= C.T @ C
    G -= torch.outer(s.Py, s.Py)
    G *= 0.5
    return G


class REML:
    """The REML (or ML) objective of ``y = X b + e``, ``e ~ N(0, V)``, ``V`` a covariance module.

    Validates the data once (finite values, matching sizes, full-rank ``X``: aliased columns
    are dropped with a warning naming them, like lme4) and evaluates the loss at the
    registered parameters or at given free-scale values.

    Args:
        model: a :class:`~covmodules.base.CovarianceModule` of shape ``(n, n)``.
        y: response, shape ``(n,)``.
        X: fixed-effects design ``(n, p)``; ``None`` means an intercept only.
        x_names: column names of ``X`` (default ``x0, x1, ...``).
        method: ``"reml"`` or ``"ml"``.
        reduction: ``"sum"`` (the total, R's scale) or ``"mean"`` (per observation).
    """

    def __init__(self, model: CovarianceModule, y, X=None, x_names=None, method: str = "reml",
                 reduction: str = "sum"):
        if not isinstance(model, CovarianceModule):
            raise TypeError(f"model must be a CovarianceModule, got {type(model).__name__}")
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.model, self.method, self.reduction = model, method, reduction
        self.y, self.X, self.x_names, self.dropped = _check_data(model, y, X, x_names)

    @property
    def n(self) -> int:
        return self.y.shape[0]

    @property
    def p(self) -> int:
        return self.X.shape[1]

    def loss(self, free_params=None) -> torch.Tensor:
        """``-l`` at the registered parameters (gradients reach them) or at ``free_params``."""
        V = self.model(free_params)
        out = NegLogLikFunction.apply(V, self.y.to(V.dtype), self.X.to(V.dtype), self.method)
        return out / self.n if self.reduction == "mean" else out

    def state(self, free_params=None) -> LikelihoodState:
        """Factorisation, GLS estimate and ``P y`` at the given point (no autograd)."""
        with torch.no_grad():
            V = self.model(free_params)
            return factorize(V, self.y.to(V.dtype), self.X.to(V.dtype), self.method)

    def loglik(self, free_params=None) -> float:
        """The log-likelihood on R's scale (total)."""
        return -float(self.state(free_params).neg_loglik)

    def gradient(self, free: torch.Tensor, state: LikelihoodState) -> torch.Tensor:
        """``∂(-l)/∂θ`` over the free parameters: one closed-form backward pass."""
        with torch.no_grad():
            nat = self.model.build_params(free)
            g = self.model._vjp(nat, cotangent_v(state))
            return g[self.model.free_param_index] * self.model.trans_grad(free)

    def average_information(self, free: torch.Tensor, state: LikelihoodState) -> torch.Tensor:
        """``AI = ½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k (P y)``: K structured products, O(n² K)."""
        U = self.model.dV(state.Py, free)
        return 0.5 * state.project(U.T)


def _check_data(model, y, X, x_names):
    from .design import drop_aliased

    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D of length n, got shape {tuple(y.shape)}")
    n = y.shape[0]
    if model.shape != (n, n):
        raise ValueError(f"the covariance model has shape {model.shape} but y has length {n}")
    dtype = y.dtype if y.is_floating_point() else torch.float64
    if X is None:
        X = torch.ones(n, 1, dtype=dtype, device=y.device)
        x_names = x_names or ["(Intercept)"]
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X must be a torch.Tensor, got {type(X).__name__}")
    if X.dim() != 2 or X.shape[0] != n:
        raise ValueError(f"X must have shape (n, p) with n = len(y) = {n} rows, "
                         f"got {tuple(X.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"y contains {int((~torch.isfinite(y)).sum())} NaN or inf values")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"X contains {int((~torch.isfinite(X)).sum())} NaN or inf values")
    names = list(x_names) if x_names is not None else [f"x{j}" for j in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise ValueError(f"x_names has {len(names)} names for {X.shape[1]} columns of X")
    X, names, dropped = drop_aliased(X, names)
    if dropped:
        warnings.warn(f"fixed-effect model matrix is rank deficient: dropping aliased "
                      f"column(s) {dropped}", stacklevel=3)
    if X.shape[1] >= n:
        raise ValueError(f"X has {X.shape[1]} independent columns for {n} observations")
    return y.to(dtype), X.to(dtype), names, dropped


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
