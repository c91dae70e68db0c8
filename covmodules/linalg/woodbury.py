r"""The Woodbury / mixed-model-equations solver: ``V = Σ_i Z_i G_i Z_iᵀ + R``, ``R`` diagonal.

With ``Z = [Z_1 … Z_k]`` (``n x q``), ``G = diag(G_i) = Λ Λᵀ`` (a Cholesky factor per term;
a symmetric square root where ``G_i`` is only semi-definite, e.g. at a boundary fit) and
``M = I + Λᵀ Zᵀ R⁻¹ Z Λ`` (``q x q``, always ``≥ I``, so well conditioned even as ``G → 0``):

.. math::

    \log|V| = \log|R| + \log|M| \;(= \log|R| + \log|G| + \log|G^{-1} + Z^T R^{-1} Z|),
    \qquad V^{-1} = R^{-1} - R^{-1} Z \Lambda M^{-1} \Lambda^T Z^T R^{-1}.

The whitening stacks ``R^{-1/2} B`` (``n`` rows, sign ``+``) over
``L_M⁻¹ Λᵀ Zᵀ R⁻¹ B`` (``q`` rows, sign ``−``), so every GLS quantity costs ``n q`` per column
after the ``n q² + q³`` factorisation. This is lme4's formulation; ``q`` counts the columns of
all terms, crossed terms included.

**Gradient.** With ``K = Zᵀ R⁻¹ Z``, ``H = L_M⁻¹ Λᵀ K``, ``W = V⁻¹ X L_A^{-T}`` (absent for
ML) and ``P y``, the cotangent ``Ḡ = ½(P - Py Pyᵀ)`` contracts to

.. math::

    Z^T \bar G Z = \tfrac12\big[K - H^T H - (Z^T W)(Z^T W)^T - (Z^T P y)(Z^T P y)^T\big],
    \qquad \operatorname{diag}\bar G = \tfrac12\big[r^{-1} - \lVert E_{i\cdot}\rVert^2
    - \lVert W_{i\cdot}\rVert^2 - (P y)_i^2\big],

``E = R⁻¹ Z Λ L_M^{-T}``; term ``i`` receives the diagonal block ``Z_iᵀ Ḡ Z_i`` (its own
``_vjp`` does the rest) and each residual piece the diagonal of ``Ḡ``. The residual is read
through its pieces' :class:`~covmodules.capabilities.DiagonalView` (values and VJP), so any
structure that offers one is a Woodbury residual.
"""

from __future__ import annotations

import functools

import torch

from .base import (Factor, GLSState, NotPositiveDefiniteError, Solver,
                   UnsupportedStructure, mixed_model_pieces)

__all__ = ["WoodburySolver", "WoodburyFactor", "root"]


def root(G: torch.Tensor) -> torch.Tensor:
    """A factor ``Λ`` with ``Λ Λᵀ = G``: Cholesky, or ``Q diag(√λ)`` for a semi-definite ``G``."""
    if not bool(torch.isfinite(G).all()):
        raise NotPositiveDefiniteError("a random-effect covariance G is not finite at these "
                                       "parameters")
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return L
    lam, Q = torch.linalg.eigh(G)
    tol = max(1e-10, 100 * G.shape[0] * torch.finfo(G.dtype).eps)   # eigh's rounding
    if float(lam.min()) < -tol * max(float(lam.abs().max()), 1e-300):
        raise NotPositiveDefiniteError("a random-effect covariance G is not positive "
                                       "semi-definite at these parameters")
    return Q * lam.clamp(min=0).sqrt()


class WoodburyFactor(Factor):
    """``V = R + Z Λ Λᵀ Zᵀ`` through ``M = I + Λᵀ Zᵀ R⁻¹ Z Λ``; signature ``(+n, −q)``."""

    def __init__(self, r: torch.Tensor, Z: torch.Tensor, Lam: torch.Tensor):
        if not bool((r > 0).all()):
            raise NotPositiveDefiniteError("the residual variances must be positive")
        self.r, self.Z, self.Lam, self.n = r, Z, Lam, r.shape[0]
        self.RZL = (Z @ Lam) / r[:, None]                          # R⁻¹ Z Λ
        M = Lam.T @ (Z.T @ self.RZL) + torch.eye(Lam.shape[1], dtype=r.dtype, device=r.device)
        self.LM, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
        if int(info) != 0:
            raise NotPositiveDefiniteError("I + Λᵀ Zᵀ R⁻¹ Z Λ is not positive definite")
        self.logdet = torch.log(r).sum() + 2 * torch.log(self.LM.diagonal()).sum()

    def whiten(self, B):
        low = torch.linalg.solve_triangular(self.LM, self.RZL.T @ B, upper=False)
        return torch.cat([B / self.r.sqrt()[:, None], low])

    def unwhiten(self, W):
        n = self.n
        low = torch.linalg.solve_triangular(self.LM.T, W[n:], upper=True)
        return W[:n] / self.r.sqrt()[:, None] - self.RZL @ low

    def inner(self, U, W):
        n = self.n
        return U[:n].T @ W[:n] - U[n:].T @ W[n:]


class WoodburySolver(Solver):
    """``Σ Z_i G_i Z_iᵀ + R`` with ``R`` diagonal and ``q < n`` (see the module docstring)."""

    name = "woodbury"

    def __init__(self, model):
        super().__init__(model)
        pieces = mixed_model_pieces(model)
        self.terms = [(name, G, off) for name, G, off in pieces if name is not None]
        self.residual = [(R.diagonal_view(), slice(off, off + R.num_params))
                         for name, R, off in pieces if name is None]
        if any(view is None for view, _ in self.residual):
            raise UnsupportedStructure("the residual must be diagonal (a structure with a "
                                       "diagonal_view, e.g. ScalarMatrix, DiagonalMatrix or "
                                       "IdentityMatrix, or a Sum of them)")
        self.n = model.shape[0]
        self.q = sum(G.shape[0] for _, G, _ in self.terms)
        if self.q >= self.n:
            raise UnsupportedStructure(f"q = {self.q} random effects for n = {self.n} rows")

    @property
    def cost(self) -> float:
        return self.n * self.q ** 2 + self.q ** 3

    @functools.cached_property
    def _Z(self) -> torch.Tensor:
        return torch.cat([self.model.design(name) for name, _, _ in self.terms], 1)

    def _diagonal(self, nat):
        return sum(view.values(nat[rows]) for view, rows in self.residual)

    def factorize(self, nat):
        blocks = [root(G._evaluate(nat[off:off + G.num_params])) for _, G, off in self.terms]
        return WoodburyFactor(self._diagonal(nat), self._Z.to(nat.dtype),
                              torch.block_diag(*blocks))

    def natural_gradient(self, nat, state: GLSState):
        f = state.factor
        Z, r = f.Z, f.r
        K = Z.T @ (Z / r[:, None])
        H = torch.linalg.solve_triangular(f.LM, f.Lam.T @ K, upper=False)
        E = torch.linalg.solve_triangular(f.LM, f.RZL.T, upper=False)
        zp = Z.T @ state.Py
        Gz = K - H.T @ H - torch.outer(zp, zp)
        d = 1 / r - (E * E).sum(0) - state.Py ** 2
        if state.method == "reml":
            W = f.unwhiten(state.low_rank_x())
            ZW = Z.T @ W
            Gz -= ZW @ ZW.T
            d -= (W * W).sum(1)
        Gz, d = 0.5 * Gz, 0.5 * d
        out = nat.new_zeros(nat.shape[0])
        start = 0
        for _, G, off in self.terms:
            q = G.shape[0]
            block = Gz[start:start + q, start:start + q]
            out[off:off + G.num_params] = G._vjp(nat[off:off + G.num_params], block)
            start += q
        for view, rows in self.residual:
            out[rows] = view.vjp(nat[rows], d)
        return out
