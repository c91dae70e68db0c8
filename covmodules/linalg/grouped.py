r"""The grouped solver: ``V`` block diagonal over the levels of one grouping factor.

``V = Σ_pieces`` of: a diagonal residual (any structure with a
:class:`~covmodules.capabilities.DiagonalView`: ``ScalarMatrix``, ``DiagonalMatrix``,
``IdentityMatrix``, ...); a ``Grouped(S, groups, positions)`` residual (``S[p_i, p_j]`` within
a group); random terms ``Z (I_L ⊗ S) Zᵀ`` whose ``G`` offers a
:class:`~covmodules.capabilities.RepeatedBlock` ``I_L ⊗ S``
(``KroneckerProduct(IdentityMatrix(L), S)``, or ``ScalarMatrix(L)`` / ``IdentityMatrix(L)``
for ``k = 1``) and whose ``Z`` has one block of ``k`` columns per level (subject-major ``Z``
as :func:`covmodules.design.random_design` builds it). The
grouping is the coarsest of the pieces' groupings; every other must be nested in it (a finer
one is applied as a mask within the block). The pieces' own parameters are shared by all groups.
:meth:`GroupedSolver.within_groups` takes the pieces of ``Grouped(S) (+ σ² I)`` from ``S``, the
nugget and the rows directly (the covariance layers' batches: no ``N``-row model is built).

Blocks of equal size are stacked and factorised by one batched Cholesky
(``V_g = L_g L_gᵀ``, bucketed by size), so one evaluation costs ``Σ_g n_g³/3`` and every REML
quantity is a sum over groups (:mod:`covmodules.linalg.statistics`):

.. math:: \log|V| = \sum_g \log|V_g|, \quad X^T V^{-1} X = \sum_g X_g^T V_g^{-1} X_g, \quad
          y^T V^{-1} y = \sum_g y_g^T V_g^{-1} y_g .

**Gradient.** The cotangent is block diagonal,
``Ḡ_g = ½(V_g⁻¹ - W_g W_gᵀ - (Py)_g (Py)_gᵀ)`` with ``W = V⁻¹ X L_A^{-T}`` (absent for ML),
and contracts per piece: the diagonal of ``Ḡ`` (its trace for a constant one) for a
diagonal residual,
``S̄ = Σ_g Σ_{ij} Ḡ_g[i, j] e_{p_i} e_{p_j}ᵀ`` (a scatter-add) for ``Grouped(S)``, and
``S̄ = Σ_g Z̃_gᵀ Ḡ_g Z̃_g`` (``Z̃_g`` the ``n_g x k`` term values of group ``g``) for a term;
each structure's ``_vjp`` maps ``S̄`` to its parameters. The AI products ``dV/dθ (P y)`` use
the level sums ``Z̃ᵀ P y`` (``L x k``) instead of ``Z``, so no ``n x q`` or ``n x n`` matrix is
formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capabilities import DiagonalView
from ..operators.grouped import Grouped, grouped_dv_matmul
from .base import (Factor, GLSState, Solver, UnsupportedStructure, additive_pieces,
                   term_dv)
from .dense import cholesky

__all__ = ["GroupedSolver", "GroupedFactor"]


@dataclass
class _Piece:
    """One additive piece of ``V`` and its rows' block structure."""

    kind: str                            # "diagonal", "grouped" or "term"
    module: object                       # the leaf, the Grouped operator or the term's G
    offset: int                          # first parameter in the model's flat order
    inner: object = None                 # S, shared by the groups or levels
    diagonal: DiagonalView | None = None   # the diagonal residual's view
    codes: torch.Tensor | None = None    # block of each row (-1: none)
    index: torch.Tensor | None = None    # row -> position in S (Grouped)
    values: torch.Tensor | None = None   # (n, k) term values (term)
    masked: bool = False                 # several blocks within one group

    @property
    def num_params(self) -> int:
        return self.module.num_params


@dataclass
class _Rows:
    """A piece's positions (Grouped) or term values in one bucket of equal-size groups:
    ``(count, s[, k])``, or ``(s[, k])`` when every group of the bucket shares them."""

    common: bool
    data: torch.Tensor
    mask: torch.Tensor | None


class GroupedFactor(Factor):
    """Batched Cholesky factors ``L_g`` of the blocks, one stack per block size."""

    def __init__(self, buckets: list[torch.Tensor], blocks: list[torch.Tensor], n: int):
        self.buckets, self.n, self.L = buckets, n, []
        logdet = 0.0
        for V in blocks:
            L = cholesky(V, "a block of V is not positive definite at these parameters (or "
                            "singular up to rounding); try other start values, e.g. larger "
                            "variances or smaller correlations")
            self.L.append(L)
            logdet = logdet + 2 * torch.log(L.diagonal(dim1=1, dim2=2)).sum()
        self.logdet = logdet

    def whiten(self, B):
        k = B.shape[1]
        if k == 0:
            return B.new_zeros(self.n, 0)
        return torch.cat([torch.linalg.solve_triangular(L, B[idx], upper=False)
                          .reshape(idx.numel(), k) for idx, L in zip(self.buckets, self.L)])

    def unwhiten(self, W):
        out, start = W.new_empty(self.n, W.shape[1]), 0
        for idx, L in zip(self.buckets, self.L):
            c, s = idx.shape
            block = W[start:start + c * s].reshape(c, s, -1)
            out[idx] = torch.linalg.solve_triangular(L.transpose(1, 2), block, upper=True)
            start += c * s
        return out


class GroupedSolver(Solver):
    """Block-diagonal ``V`` over one grouping factor (see the module docstring)."""

    name = "grouped"

    def __init__(self, model):
        super().__init__(model)
        self._arrange(model.shape[0], [self._piece(model, name, module, off)
                                       for name, module, off in additive_pieces(model)])

    @classmethod
    def within_groups(cls, model, within, codes, positions, nugget=None) -> "GroupedSolver":
        """The solver of ``Grouped(within, codes, positions)`` (``+ nugget``, a module with a
        constant diagonal view: ``σ² I`` of any size) without building that model, for the
        flat parameters of ``model``: ``within``'s, then ``nugget``'s (e.g.
        ``Sum(within=within, nugget=ScalarMatrix(T))``; ``model`` maps free to natural
        parameters and is not evaluated). ``codes`` and ``positions`` are long tensors."""
        view = None if nugget is None else nugget.diagonal_view()
        if nugget is not None and (view is None or not view.constant):
            raise UnsupportedStructure(f"the nugget {type(nugget).__name__} is not a constant "
                                       "diagonal")
        if model.num_params != within.num_params + (0 if nugget is None else nugget.num_params):
            raise ValueError("model's parameters must be within's, then the nugget's")
        if codes.dim() != 1 or codes.shape != positions.shape:
            raise ValueError(f"codes and positions must be 1-D of one length, got shapes "
                             f"{tuple(codes.shape)} and {tuple(positions.shape)}")
        pieces = [_Piece("grouped", within, 0, within, codes=codes, index=positions)]
        if nugget is not None:
            pieces.append(_Piece("diagonal", nugget, within.num_params, diagonal=view))
        solver = cls.__new__(cls)                   # not __init__: there is no batch model
        super(GroupedSolver, solver).__init__(model)
        solver._arrange(codes.shape[0], pieces)
        return solver

    def _arrange(self, n: int, pieces: list[_Piece]) -> None:
        """Group the ``n`` rows of ``pieces`` into buckets of equal-size groups."""
        self.n, self.pieces = n, pieces
        groups = self._grouping([p for p in self.pieces if p.codes is not None])
        sizes = torch.bincount(groups)
        order = torch.argsort(groups, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        self.buckets = []
        for s in torch.unique(sizes).tolist():
            first = starts[sizes == s]
            self.buckets.append(order[first[:, None] + torch.arange(s, device=first.device)])
        self.blocks = [[self._rows(p, idx) for p in self.pieces] for idx in self.buckets]
        self.full = [any(b is not None and not b.common for b in blocks)
                     or any(p.diagonal is not None and not p.diagonal.constant
                            for p in self.pieces)
                     for blocks in self.blocks]

    @staticmethod
    def _piece(model, name, module, offset) -> _Piece:
        if name is not None:
            view = module.repeated_block_view()
            S = None if view is None else view.block
            rows = None if S is None else model.term_groups(name, S.shape[0])
            if rows is None:
                raise UnsupportedStructure(
                    f"random term {name!r} is not I ⊗ S with one block of Z columns per level")
            codes, values = rows                 # a row of zeros belongs to no level
            codes = torch.where((values != 0).any(1), codes, -1)
            return _Piece("term", module, offset, S, codes=codes, values=values)
        view = module.diagonal_view()
        if view is not None:
            return _Piece("diagonal", module, offset, diagonal=view)
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
        coarsest = pieces[0]
        if len(pieces) > 1:
            counts = [torch.unique(p.codes[p.codes >= 0]).numel() for p in pieces]
            coarsest = pieces[counts.index(min(counts))]
        codes = coarsest.codes.clone()
        loose = codes < 0
        codes[loose] = int(codes.max()) + 1 + torch.arange(int(loose.sum()), device=codes.device)
        groups = torch.unique(codes, return_inverse=True)[1]
        num = int(groups.max()) + 1
        for p in pieces:
            if p is coarsest:               # its blocks are the groups
                continue
            defined = p.codes >= 0
            c, g = p.codes[defined], groups[defined]
            blocks = torch.unique(c).numel()
            if torch.unique(c * num + g).numel() != blocks:
                raise UnsupportedStructure("the random terms and the residual are not nested "
                                           "in one grouping factor")
            p.masked = blocks != torch.unique(g).numel()
        return groups

    @staticmethod
    def _rows(p: _Piece, idx: torch.Tensor):
        """The piece's rows in one bucket, shared by all its groups where they agree."""
        if p.kind == "diagonal":
            return None
        data = p.index[idx] if p.kind == "grouped" else p.values[idx]
        mask = None
        if p.masked:
            c = p.codes[idx]
            mask = (c[:, :, None] == c[:, None, :]) & (c[:, :, None] >= 0)
        common = bool((data == data[:1]).all()) and (mask is None or bool((mask == mask[:1]).all()))
        if common:
            data, mask = data[0], None if mask is None else mask[0]
        return _Rows(common, data, mask)

    @property
    def cost(self) -> float:
        return float(sum(idx.shape[0] * (idx.shape[1] ** 3 / 3 + idx.shape[1] ** 2)
                         for idx in self.buckets))

    def _slice(self, nat, p: _Piece):
        return nat[p.offset:p.offset + p.num_params]

    def _part(self, p: _Piece, rows: "_Rows", S: torch.Tensor) -> torch.Tensor:
        """The piece's ``(s, s)`` (common) or ``(count, s, s)`` contribution to the blocks."""
        if p.kind == "grouped":
            pos = rows.data
            part = S[pos[..., :, None], pos[..., None, :]]
        else:
            Zt = rows.data.to(S.dtype)
            part = Zt @ S @ Zt.transpose(-1, -2)
        return part if rows.mask is None else part * rows.mask

    def factorize(self, nat):
        inner, diagonal, scalar = {}, None, 0.0
        for i, p in enumerate(self.pieces):
            part = self._slice(nat, p)
            if p.kind != "diagonal":
                inner[i] = p.inner._evaluate(part)
            elif p.diagonal.constant:
                scalar = scalar + p.diagonal.values(part)[0]
            else:
                values = p.diagonal.values(part)
                diagonal = values if diagonal is None else diagonal + values
        blocks = []
        for idx, rows in zip(self.buckets, self.blocks):
            c, s = idx.shape
            common = nat.new_zeros(s, s)
            common.diagonal().add_(scalar)
            V = None
            for i, p in enumerate(self.pieces):
                if rows[i] is None:
                    continue
                part = self._part(p, rows[i], inner[i])
                if rows[i].common:
                    common += part
                else:
                    V = part if V is None else V.add_(part)
            V = common.expand(c, s, s).clone() if V is None else V.add_(common)
            if diagonal is not None:
                V.diagonal(dim1=1, dim2=2).add_(diagonal[idx])
            blocks.append(V)
        return GroupedFactor(self.buckets, blocks, self.n)

    def natural_gradient(self, nat, state: GLSState):
        f, Py = state.factor, state.Py
        W = f.unwhiten(state.low_rank_x()) if state.method == "reml" else None
        diag, trace = Py.new_zeros(self.n), nat.new_zeros(())
        varying = any(p.diagonal is not None and not p.diagonal.constant for p in self.pieces)
        acc = {i: nat.new_zeros(p.inner.shape) for i, p in enumerate(self.pieces)
               if p.kind != "diagonal"}
        for idx, L, rows, full in zip(self.buckets, f.L, self.blocks, self.full):
            s = idx.shape[1]
            Vinv = torch.cholesky_inverse(L)
            r = Py[idx]
            total = Vinv.sum(0) - r.T @ r                   # Σ_g Ḡ_g (times 2)
            if W is not None:
                Wg = W[idx]
                Wf = Wg.transpose(0, 1).reshape(s, -1)
                total -= Wf @ Wf.T
            total *= 0.5
            trace += total.trace()
            if full:
                G = Vinv.sub_(r[:, :, None] * r[:, None, :])
                if W is not None:
                    G -= Wg @ Wg.transpose(1, 2)
                G *= 0.5
                if varying:
                    diag[idx] = G.diagonal(dim1=1, dim2=2)
            for i, p in enumerate(self.pieces):
                b = rows[i]
                if b is None:
                    continue
                Gm = total if b.common else G
                Gm = Gm if b.mask is None else Gm * b.mask
                if p.kind == "grouped":
                    pos = b.data
                    acc[i].index_put_((pos[..., :, None], pos[..., None, :]), Gm,
                                      accumulate=True)
                else:
                    Zt = b.data.to(nat.dtype)
                    acc[i] += (Zt.transpose(-1, -2) @ Gm @ Zt).reshape(-1, *acc[i].shape).sum(0)
        out = nat.new_zeros(nat.shape[0])
        for i, p in enumerate(self.pieces):
            part = self._slice(nat, p)
            if p.kind != "diagonal":
                g = p.inner._vjp(part, acc[i])
            elif p.diagonal.constant:
                g = p.diagonal.trace_vjp(part, trace, self.n)
            else:
                g = p.diagonal.vjp(part, diag)
            out[p.offset:p.offset + p.num_params] = g
        return out

    def natural_dv_py(self, nat, Py):
        """Per piece; terms through their level sums ``Z̃ᵀ P y``."""
        U = Py.new_zeros(nat.shape[0], self.n)
        for p in self.pieces:
            part, rows = self._slice(nat, p), slice(p.offset, p.offset + p.num_params)
            if p.kind == "term":
                U[rows] = term_dv(p.inner, part, p.codes.clamp(min=0), p.values,
                                  p.module.shape[0] // p.values.shape[1], Py)
            elif p.kind == "grouped":
                U[rows] = grouped_dv_matmul(p.inner, part, p.codes, p.index, Py[:, None])[..., 0]
            else:
                U[rows] = p.module._dv_matmul(part, Py[:, None])[..., 0]
        return U
