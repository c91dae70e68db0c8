r"""The dense Cholesky solver: the reference every structured solver must match.

Factorises the full ``V = L Lᵀ`` (``n³/3``) as one more :class:`~.base.Factor`
(:class:`DenseFactor`: ``F = L⁻¹``), so the likelihood, the AI matrix and the sums over shards
are those of every solver. The gradient contracts the cotangent
``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` (``V⁻¹`` in place of ``P`` for ML, :func:`cotangent_v`) with
the covariance module in closed form. :class:`NegLogLikFunction` keeps the route where ``V``
itself carries an autograd graph (a network that produces ``V``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .base import Factor, GLSState, NotPositiveDefiniteError, Solver, \
    data_cotangents, gls

__all__ = ["DenseSolver", "DenseFactor", "cholesky", "factorize", "cotangent_v",
           "NegLogLikFunction"]

NOT_PD = ("V is not positive definite at these parameters (or singular up to rounding); try "
          "other start values, e.g. larger variances or smaller correlations")


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


class DenseFactor(Factor):
    """``V = L Lᵀ`` by Cholesky: whitening ``F = L⁻¹`` (``J = I``), ``log|V| = 2 Σ log L_ii``.

    >>> f = DenseFactor(torch.tensor([[4.0, 2.0], [2.0, 5.0]], dtype=torch.float64))
    >>> round(float(f.logdet), 6), f.unwhiten(f.whiten(torch.eye(2, dtype=torch.float64)))[0]
    (2.772589, tensor([ 0.3125, -0.1250], dtype=torch.float64))
    """

    def __init__(self, V: torch.Tensor):
        self.L = cholesky(V, NOT_PD)
        self.logdet = 2 * torch.log(self.L.diagonal()).sum()

    def whiten(self, B):
        return torch.linalg.solve_triangular(self.L, B, upper=False)

    def unwhiten(self, W):
        return torch.linalg.solve_triangular(self.L.T, W, upper=True)

    def inverse(self) -> torch.Tensor:
        """``V⁻¹``."""
        return torch.cholesky_inverse(self.L)


def factorize(V, y, X, method: str = "reml") -> GLSState:
    """Cholesky of ``V``, GLS estimate and ``-l`` (R's scale) without autograd."""
    return gls(DenseFactor(V), y, X, method)


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


def cotangent_v(s: GLSState) -> torch.Tensor:
    """``∂(-l)/∂V = ½(P - Py (Py)ᵀ)`` (``V⁻¹`` in place of ``P`` for ML), in ``O(n³)``, from a
    state of :class:`DenseFactor`."""
    G = s.factor.inverse()
    if s.method == "reml":
        C = torch.linalg.solve_triangular(s.LA, s.solve_x().T, upper=False)
        G -= C.T @ C
    G -= torch.outer(s.Py, s.Py)
    G *= 0.5
    return G


class DenseSolver(Solver):
    """Cholesky of the full ``V``; works for every covariance module."""

    name = "dense"

    def factorize(self, nat):
        return DenseFactor(self.model._evaluate(nat))

    def natural_gradient(self, nat, state: GLSState) -> torch.Tensor:
        return self.model._vjp(nat, cotangent_v(state))
