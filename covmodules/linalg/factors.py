r"""Factors built from other factors: diagonal, block diagonal, and a low-rank update.

Every :class:`~.base.Factor` gives ``log|V|`` and a whitening ``F`` with ``Fᵀ J F = V⁻¹``;
these compose, so a structured residual (one Kronecker factor per field trial) carries random
effects without an ``N x N`` matrix:

- :class:`DiagonalFactor`: ``V = diag(r)``, ``F = R^{-1/2}``.
- :class:`BlockFactor`: ``V = diag(V_1, ..., V_k)`` over consecutive rows; ``F`` stacks the
  blocks' whitenings, ``J`` their signatures, ``log|V| = Σ log|V_b|``.
- :class:`LowRankFactor`: ``V = R + C Cᵀ`` (``C`` ``n x q``) for any factor of ``R``: with
  ``C_w = F_R C`` and ``M = I + ⟨C_w, C_w⟩ = I + Cᵀ R⁻¹ C = L_M L_Mᵀ``,

  .. math::

      \log|V| = \log|R| + \log|M|, \qquad
      F B = \begin{bmatrix} F_R B \\ L_M^{-1} \langle C_w, F_R B\rangle \end{bmatrix},
      \qquad J = \operatorname{diag}(J_R, -I_q),

  so ``⟨F B, F B'⟩ = Bᵀ(R⁻¹ - R⁻¹ C M⁻¹ Cᵀ R⁻¹)B' = Bᵀ V⁻¹ B'`` (Woodbury), and
  ``Fᵀ J W = F_Rᵀ J_R (W_R - C_w L_M^{-T} W_q)``: one whitening of ``R`` per column.

Each factor reports :attr:`rows`, the length of its whitened columns.

Example (``V = I + c cᵀ`` against its dense inverse)::

    >>> import torch
    >>> c = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    >>> f = LowRankFactor(DiagonalFactor(torch.ones(2, dtype=torch.float64)), c)
    >>> B = torch.eye(2, dtype=torch.float64)
    >>> V = torch.eye(2, dtype=torch.float64) + c @ c.T
    >>> torch.allclose(f.unwhiten(f.whiten(B)), torch.linalg.inv(V)), round(float(f.logdet), 6)
    (True, 1.791759)
"""

from __future__ import annotations

import torch

from .base import Factor, NotPositiveDefiniteError

__all__ = ["DiagonalFactor", "BlockFactor", "LowRankFactor"]


class DiagonalFactor(Factor):
    """``V = diag(r)``, ``r > 0``."""

    def __init__(self, r: torch.Tensor):
        if not bool((r > 0).all()) or not bool(torch.isfinite(r).all()):
            raise NotPositiveDefiniteError("the residual variances must be positive")
        self.r, self.rows = r, r.shape[0]
        self.root = r.sqrt()[:, None]
        self.logdet = torch.log(r).sum()

    def whiten(self, B):
        return B / self.root

    def unwhiten(self, W):
        return W / self.root


class BlockFactor(Factor):
    """``V = diag(V_1, ..., V_k)`` from the factors of its diagonal blocks (consecutive rows:
    block ``b`` holds ``sizes[b]`` rows)."""

    def __init__(self, factors, sizes):
        self.factors, self.sizes = list(factors), list(sizes)
        self.whitened = [f.rows for f in self.factors]
        self.rows = sum(self.whitened)
        self.logdet = sum(f.logdet for f in self.factors)

    def whiten(self, B):
        return torch.cat([f.whiten(part) for f, part in
                          zip(self.factors, torch.split(B, self.sizes))])

    def unwhiten(self, W):
        return torch.cat([f.unwhiten(part) for f, part in
                          zip(self.factors, torch.split(W, self.whitened))])

    def inner(self, U, W):
        return sum(f.inner(u, w) for f, u, w in zip(self.factors, torch.split(U, self.whitened),
                                                    torch.split(W, self.whitened)))


class LowRankFactor(Factor):
    """``V = R + C Cᵀ`` for a factor ``base`` of ``R`` (module docstring); ``Cw``, when given,
    is ``base.whiten(C)``."""

    def __init__(self, base: Factor, C: torch.Tensor, Cw: torch.Tensor | None = None):
        self.base, self.q = base, C.shape[1]
        self.Cw = base.whiten(C) if Cw is None else Cw
        M = base.inner(self.Cw, self.Cw)
        M = 0.5 * (M + M.T) + torch.eye(self.q, dtype=M.dtype, device=M.device)
        self.LM, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0:
            raise NotPositiveDefiniteError("I + Cᵀ R⁻¹ C is not positive definite")
        self.rows = base.rows + self.q
        self.logdet = base.logdet + 2 * torch.log(self.LM.diagonal()).sum()

    def whiten(self, B):
        top = self.base.whiten(B)
        low = torch.linalg.solve_triangular(self.LM, self.base.inner(self.Cw, top), upper=False)
        return torch.cat([top, low])

    def unwhiten(self, W):
        top, low = W[:self.base.rows], W[self.base.rows:]
        low = torch.linalg.solve_triangular(self.LM.T, low, upper=True)
        return self.base.unwhiten(top - self.Cw @ low)

    def inner(self, U, W):
        r = self.base.rows
        return self.base.inner(U[:r], W[:r]) - U[r:].T @ W[r:]

    def correction(self) -> torch.Tensor:
        """``H = R⁻¹ C L_M^{-T}`` (``n x q``): ``V⁻¹ = R⁻¹ - H Hᵀ``."""
        return self.base.unwhiten(torch.linalg.solve_triangular(self.LM, self.Cw.T,
                                                                upper=False).T)
