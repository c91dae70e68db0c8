r"""The dense Cholesky solver: the reference every structured solver must match.

Factorises the full ``V`` (``n³/3``); the backward pass of the loss returns the closed-form
cotangent ``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` (``V⁻¹`` in place of ``P`` for ML), which the
covariance module contracts in closed form, plus the cotangents of ``y`` and ``X``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from .base import NotPositiveDefiniteError, Solver, data_cotangents

__all__ = ["DenseSolver", "DenseState", "cholesky", "factorize", "cotangent_v", "NegLogLikFunction"]


@dataclass
class DenseState:
    """Factorisation and estimates at one parameter value (dense path)."""

    L: torch.Tensor          # Cholesky factor of V
    LA: torch.Tensor         # Cholesky factor of A = XᵀV⁻¹X (p x p)
    Xs: torch.Tensor         # L⁻¹X
    beta: torch.Tensor       # GLS estimate
    Py: torch.Tensor         # V⁻¹(y - X b̂) = P y
    neg_loglik: torch.Tensor
    method: str

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


def cholesky(V: torch.Tensor, message: str) -> torch.Tensor:
    """The Cholesky factor of ``V`` (or of a batch of matrices), or
    :class:`NotPositiveDefiniteError` with ``message`` when the factorisation fails or a pivot
    is at rounding level, ``L_ii² <= 16 m eps V_ii`` (``m`` the matrix size): row ``i`` of
    ``V`` then adds nothing to the earlier rows but rounding (e.g. it repeats one of them), so
    ``V`` is singular up to rounding and ``log|V|`` and ``V⁻¹`` would be noise.

    >>> cholesky(torch.tensor([[4.0, 2.0], [2.0, 5.0]], dtype=torch.float64), "not PD")
    tensor([[2., 0.],
            [1., 2.]], dtype=torch.float64)
    """
    L, info = torch.linalg.cholesky_ex(V)
    pivots = L.diagonal(dim1=-2, dim2=-1) ** 2
    level = 16 * V.shape[-1] * torch.finfo(V.dtype).eps * V.diagonal(dim1=-2, dim2=-1)
    if bool(((info != 0) | ~(pivots > level).all(-1)).any()):
        raise NotPositiveDefiniteError(message)
    return L


def factorize(V, y, X, method: str = "reml") -> DenseState:
    """Cholesky of ``V``, GLS estimate and ``-l`` (R's scale) without autograd."""
    n, p = X.shape
    L = cholesky(V, "V is not positive definite at these parameters (or singular up to "
                    "rounding); try other start values, e.g. larger variances or smaller "
                    "correlations")
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
    return DenseState(L, LA, Xs, beta, Py, neg, method)


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
        gV = cotangent_v(ctx.state) * grad if ctx.needs_input_grad[0] else None
        gy, gX = data_cotangents(ctx.state, grad, *ctx.needs_input_grad[1:3])
        return gV, gy, gX, None


def cotangent_v(s: DenseState) -> torch.Tensor:
    """``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` (``V⁻¹`` in place of ``P`` for ML), in ``O(n³)``."""
    G = torch.cholesky_inverse(s.L)
    if s.method == "reml":
        C = torch.linalg.solve_triangular(s.LA, s.solve_x().T, upper=False)
        G -= C.T @ C
    G -= torch.outer(s.Py, s.Py)
    G *= 0.5
    return G


class DenseSolver(Solver):
    """Cholesky of the full ``V``; works for every covariance module."""

    name = "dense"

    @classmethod
    def supports(cls, model) -> bool:
        return True

    def loss(self, free_params, y, X, method):
        V = self.model(free_params)
        return NegLogLikFunction.apply(V, y.to(V.dtype), X.to(V.dtype), method)

    def state(self, free, y, X, method) -> DenseState:
        with torch.no_grad():
            V = self.model(free)
            return factorize(V, y.to(V.dtype), X.to(V.dtype), method)

    def gradient(self, free, state: DenseState) -> torch.Tensor:
        with torch.no_grad():
            g = self.model._vjp(self.model.build_params(free), cotangent_v(state))
            return self.model.to_free(g, free)
