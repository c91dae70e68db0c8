r"""The grouped solver: ``V`` block diagonal over the levels of one grouping factor.

``V = Σ_pieces`` of: a diagonal residual (``ScalarMatrix``, ``DiagonalMatrix``,
``IdentityMatrix``); a ``Grouped(S, groups, positions)`` residual (``S[p_i, p_j]`` within a
group); random terms ``Z (I_L ⊗ S) Zᵀ`` whose ``Z`` has one block of ``k`` columns per level
(``G = KroneckerProduct(IdentityMatrix(L), S)``, or ``ScalarMatrix(L)`` / ``IdentityMatrix(L)``
for ``k = 1``; subject-major ``Z`` as :func:`covmodules.design.random_design` builds it). The
grouping is the coarsest of the pieces' groupings; every other must be nested in it (a finer
one is applied as a mask within the block). The pieces' own parameters are shared by all groups.

Blocks of equal size are stacked and factorised by one batched Cholesky
(``V_g = L_g L_gᵀ``, bucketed by size), so one evaluation costs ``Σ_g n_g³/3`` and every REML
quantity is a sum over groups (DESIGN.md, "Data parallel REML"):

.. math:: \log|V| = \sum_g \log|V_g|, \quad X^T V^{-1} X = \sum_g X_g^T V_g^{-1} X_g, \quad
          y^T V^{-1} y = \sum_g y_g^T V_g^{-1} y_g .

**Gradient.** The cotangent is block diagonal,
``Ḡ_g = ½(V_g⁻¹ - W_g W_gᵀ - (Py)_g (Py)_gᵀ)`` with ``W = V⁻¹ X L_A^{-T}`` (absent for ML),
and contracts per piece: the diagonal of ``Ḡ`` for a diagonal residual,
``S̄ = Σ_g Σ_{ij} Ḡ_g[i, j] e_{p_i} e_{p_j}ᵀ`` (a scatter-add) for ``Grouped(S)``, and
``S̄ = Σ_g Z̃_gᵀ Ḡ_g Z̃_g`` (``Z̃_g`` the ``n_g x k`` term values of group ``g``) for a term;
each structure's ``_vjp`` maps ``S̄`` to its parameters. The AI products ``dV/dθ (P y)`` use
the level sums ``Z̃ᵀ P y`` (``L x k``) instead of ``Z``, so no ``n x q`` or ``n x n`` matrix is
formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import MixedModel
from ..operators.grouped import Grouped
from ..operators.kronecker import KroneckerProduct
from ..structures.identity import IdentityMatrix
from ..structures.scalar import ScalarMatrix
from .base import (Factor, GLSState, NotPositiveDefiniteError, StructuredSolver,
                   UnsupportedStructure, additive_pieces)
from .woodbury import DIAGONAL, diagonal_values, diagonal_vjp

__all__ = ["GroupedSolver", "GroupedFactor"]


@dataclass
class _Piece:
    """One additive piece of ``V`` and its rows' block structure."""

    kind: str                            # "diagonal", "grouped" or "term"
    module: object                       # the leaf, the Grouped operator or the term's G
    offset: int                          # first parameter in the model's flat order
    inner: object = None                 # S, shared by the groups or levels
    codes: torch.Tensor | None = None    # block of each row (-1: none)
    index: torch.Tensor | None = None    # row -> position in S (Grouped)
    values: torch.Tensor | None = None   # (n, k) term values (term)
    masked: bool = False                 # several blocks within one group

    @property
    def num_params(self) -> int:
        return self.module.num_params


def _term_structure(G):
    """``S`` with ``G = I_L ⊗ S``, or ``None``."""
    if isinstance(G, ScalarMatrix):
        return ScalarMatrix(1)
    if isinstance(G, IdentityMatrix):
        return IdentityMatrix(1)
    if isinstance(G, KroneckerProduct) and isinstance(G.operand_modules[0], IdentityMatrix):
        return G.operand_modules[1]
    return None


class GroupedFactor(Factor):
    """Batched Cholesky factors ``L_g`` of the blocks, one stack per block size."""

    def __init__(self, buckets: list[torch.Tensor], blocks: list[torch.Tensor], n: int):
        self.buckets, self.n, self.L = buckets, n, []
        logdet = 0.0
        for V in blocks:
            L, info = torch.linalg.cholesky_ex(V)
            if bool((info != 0).any()):
                raise NotPositiveDefiniteError(
                    "a block of V is not positive definite at these parameters; try other "
                    "start values, e.g. larger variances or smaller correlations")
            self.L.append(L)
            logdet = logdet + 2 * torch.log(L.diagonal(dim1=1, dim2=2)).sum()
        self.logdet = logdet

    def whiten(self, B):
        k = B.shape[1]
        return torch.cat([torch.linalg.solve_triangular(L, B[idx], upper=False).reshape(-1, k)
                          for idx, L in zip(self.buckets, self.L)])

    def unwhiten(self, W):
        out, start = W.new_empty(self.n, W.shape[1]), 0
        for idx, L in zip(self.buckets, self.L):
            c, s = idx.shape
            block = W[start:start + c * s].reshape(c, s, -1)
            out[idx] = torch.linalg.solve_triangular(L.transpose(1, 2), block, upper=True)
            start += c * s
        return out


class GroupedSolver(StructuredSolver):
    """Block-diagonal ``V`` over one grouping factor (see the module docstring)."""

    name = "grouped"

    def __init__(self, model):
        super().__init__(model)
        self.n = n = model.shape[0]
        self.pieces = [self._piece(model, name, module, off)
                       for name, module, off in additive_pieces(model)]
        groups = self._grouping([p for p in self.pieces if p.codes is not None])
        sizes = torch.bincount(groups)
        order = torch.argsort(groups, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        self.buckets = []
        for s in torch.unique(sizes).tolist():
            first = starts[sizes == s]
            self.buckets.append(order[first[:, None] + torch.arange(s)])
        self.masks = [[self._mask(p, idx) for p in self.pieces] for idx in self.buckets]
        if sum(idx.numel() for idx in self.buckets) != n:
            raise UnsupportedStructure("grouping does not cover every row")

    @staticmethod
    def _piece(model, name, module, offset) -> _Piece:
        if name is not None:
            S = _term_structure(module)
            rows = None if S is None else model.term_groups(name, S.shape[0])
            if rows is None:
                raise UnsupportedStructure(
                    f"random term {name!r} is not I ⊗ S with one block of Z columns per level")
            return _Piece("term", module, offset, S, codes=rows[0], values=rows[1])
        if isinstance(module, DIAGONAL):
            return _Piece("diagonal", module, offset)
        if isinstance(module, Grouped):
            return _Piece("grouped", module, offset, module.operand_modules[0],
                          codes=module.group_codes, index=module.positions)
        raise UnsupportedStructure(f"{type(module).__name__} is not block diagonal over a "
                                   "grouping factor")

    def _grouping(self, pieces: list[_Piece]) -> torch.Tensor:
        """Group of each row: the coarsest piece grouping, the others nested in it."""
        n = self.n
        if not pieces:
            return torch.arange(n)
        counts = [torch.unique(p.codes[p.codes >= 0]).numel() for p in pieces]
        codes = pieces[counts.index(min(counts))].codes.clone()
        loose = codes < 0
        codes[loose] = int(codes.max()) + 1 + torch.arange(int(loose.sum()))
        groups = torch.unique(codes, return_inverse=True)[1]
        num = int(groups.max()) + 1
        for p in pieces:
            defined = p.codes >= 0
            c, g = p.codes[defined], groups[defined]
            blocks = torch.unique(c).numel()
            if torch.unique(c * num + g).numel() != blocks:
                raise UnsupportedStructure("the random terms and the residual are not nested "
                                           "in one grouping factor")
            p.masked = blocks != torch.unique(g).numel()
        return groups

    @staticmethod
    def _mask(p: _Piece, idx: torch.Tensor):
        if not p.masked:
            return None
        c = p.codes[idx]
        return (c[:, :, None] == c[:, None, :]) & (c[:, :, None] >= 0)

    @property
    def cost(self) -> float:
        return float(sum(idx.shape[0] * (idx.shape[1] ** 3 / 3 + idx.shape[1] ** 2)
                         for idx in self.buckets))

    def _slice(self, nat, p: _Piece):
        return nat[p.offset:p.offset + p.num_params]

    def factorize(self, nat):
        diagonal = None
        inner = {}
        for i, p in enumerate(self.pieces):
            part = self._slice(nat, p)
            if p.kind == "diagonal":
                d = diagonal_values(p.module, part, self.n)
                diagonal = d if diagonal is None else diagonal + d
            else:
                inner[i] = p.inner._evaluate(part)
        blocks = []
        for idx, masks in zip(self.buckets, self.masks):
            c, s = idx.shape
            V = nat.new_zeros(c, s, s)
            for i, p in enumerate(self.pieces):
                if p.kind == "grouped":
                    pos = p.index[idx]
                    part = inner[i][pos[:, :, None], pos[:, None, :]]
                elif p.kind == "term":
                    Zt = p.values[idx].to(nat.dtype)
                    part = Zt @ inner[i] @ Zt.transpose(1, 2)
                else:
                    continue
                V += part if masks[i] is None else part * masks[i]
            if diagonal is not None:
                V.diagonal(dim1=1, dim2=2).add_(diagonal[idx])
            blocks.append(V)
        return GroupedFactor(self.buckets, blocks, self.n)

    def natural_gradient(self, nat, state: GLSState):
        f, Py = state.factor, state.Py
        W = f.unwhiten(state.low_rank_x()) if state.method == "reml" else None
        diag = Py.new_zeros(self.n)
        acc = {i: nat.new_zeros(p.inner.shape) for i, p in enumerate(self.pieces)
               if p.kind != "diagonal"}
        for idx, L, masks in zip(self.buckets, f.L, self.masks):
            G = torch.cholesky_inverse(L)
            r = Py[idx]
            G -= r[:, :, None] * r[:, None, :]
            if W is not None:
                Wg = W[idx]
                G -= Wg @ Wg.transpose(1, 2)
            G *= 0.5
            diag[idx] = G.diagonal(dim1=1, dim2=2)
            for i, p in enumerate(self.pieces):
                if p.kind == "diagonal":
                    continue
                Gm = G if masks[i] is None else G * masks[i]
                if p.kind == "grouped":
                    T, pos = p.inner.shape[0], p.index[idx]
                    flat = (pos[:, :, None] * T + pos[:, None, :]).reshape(-1)
                    acc[i].view(-1).index_add_(0, flat, Gm.reshape(-1))
                else:
                    Zt = p.values[idx].to(nat.dtype)
                    acc[i] += (Zt.transpose(1, 2) @ Gm @ Zt).sum(0)
        out = nat.new_zeros(nat.shape[0])
        for i, p in enumerate(self.pieces):
            part = self._slice(nat, p)
            g = (diagonal_vjp(p.module, diag) if p.kind == "diagonal"
                 else p.inner._vjp(part, acc[i]))
            out[p.offset:p.offset + p.num_params] = g
        return out

    def average_information(self, free, state):
        """``½ Uᵀ P U`` with ``U[:, k] = dV/dθ_k (P y)``; terms through level sums ``Z̃ᵀ P y``."""
        model, Py = self.model, state.Py
        with torch.no_grad():
            nat = model.build_params(free)
            U = Py.new_zeros(nat.shape[0], self.n)
            for p in self.pieces:
                part, rows = self._slice(nat, p), slice(p.offset, p.offset + p.num_params)
                if p.kind == "grouped":
                    U[rows] = p.module._dv_matmul(part, Py[:, None])[..., 0]
                elif p.kind == "term":
                    level, values = p.codes.clamp(min=0), p.values.to(Py.dtype)
                    k = values.shape[1]
                    sums = Py.new_zeros(p.module.shape[0] // k, k).index_add_(
                        0, level, values * Py[:, None])
                    dS = p.inner._dv_matmul(part, sums.T)            # (K, k, L)
                    U[rows] = torch.einsum("ik,Kki->Ki", values, dS[:, :, level])
                elif isinstance(p.module, ScalarMatrix):
                    U[rows] = Py
                else:
                    U[rows] = p.module._dv_matmul(part, Py[:, None])[..., 0]
            U = U[model.free_param_index] * model.trans_grad(free)[:, None]
            return 0.5 * state.project(U.T)
