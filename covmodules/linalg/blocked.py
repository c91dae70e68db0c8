r"""The blocked Cholesky factor of the mixed-model-equations matrix of crossed random terms.

For random terms ``t`` with ``Z_t`` one block of ``k_t`` columns per level (codes and term
values, :class:`~covmodules.structures.block_design.BlockDesignMatrix`), ``G_t = I ⊗ S_t``
with ``S_t = L_t L_tᵀ`` and a diagonal ``R = diag(r)``, lme4's matrix

.. math:: M = I + Λ^T Z^T R^{-1} Z Λ, \qquad Λ = \operatorname{diag}_t(I \otimes L_t),

is split with the term of most columns first (index ``0``) and the others after it:

.. math::

    M = \begin{pmatrix} D & B \\ B^T & C \end{pmatrix}, \qquad
    L = \begin{pmatrix} L_D & 0 \\ E^T & L_S \end{pmatrix}, \qquad
    E = L_D^{-1} B, \quad S = C - E^T E = L_S L_S^T .

``D`` is block diagonal (one ``k_0 x k_0`` block per level: a batched Cholesky), ``B`` is
sparse (a block for each pair of levels that share a row) and is stored per level of term 0 as
the columns it touches ("patterns", bucketed by their length so that every product is a
batched matrix product), and the Schur complement ``S`` of the other terms is dense.

**Rule (measured on InstEval's and simulated crossed designs).** ``S`` is factorised dense:
two crossed factors that share rows fill their Schur complement almost completely (1,142 of
1,142 columns of InstEval's lecturers and departments; 18 % of a 10,000-level factor crossed
with a 50,000-level one before any fill of the factorisation), so a sparse factorisation of
``S`` saves nothing but the ordering; the cost of one factorisation is therefore
``Σ_j k_0 z_j² + s³/3`` (``z_j`` the pattern length of level ``j``, ``s`` the columns of the
other terms), which is what :attr:`MixedModelFactor.cost` reports to dispatch.

**Selected inversion.** The gradient needs ``M⁻¹`` only where ``Zᵀ R⁻¹ Z`` is not zero:
``M⁻¹_{22} = S⁻¹``, ``M⁻¹_{12} = -L_D^{-T} E S⁻¹`` on the pattern of ``B`` (each level's
``E_j S⁻¹`` restricted to its own pattern: ``Σ_j k_0 z_j²`` flops) and the diagonal blocks
``M⁻¹_{jj} = L_D^{-T}(I + E_j S⁻¹ E_jᵀ) L_D^{-1}``; no ``q x q`` inverse is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dense import cholesky
from .statistics import NotPositiveDefiniteError

__all__ = ["Pattern", "MixedModelFactor"]


@dataclass
class _Bucket:
    """Levels of term 0 whose patterns have the same length ``z``."""

    levels: torch.Tensor       # (count,) levels of term 0
    columns: torch.Tensor      # (count, z) columns of the other terms (in ``0..s-1``)
    entries: torch.Tensor      # (count, z) index into the pair-major entry order
    cells: torch.Tensor        # (count * z * z,) the flat ``s x s`` cells of its column pairs


class Pattern:
    """Which levels of term 0 share rows with which columns of the other terms.

    Args:
        codes: per term, the ``(n,)`` level of every row; term 0 first.
        sizes: per term, ``(levels, k)``.
    """

    def __init__(self, codes: list[torch.Tensor], sizes: list[tuple[int, int]]):
        m0, k0 = sizes[0]
        self.sizes, self.k0 = sizes, k0
        self.offsets, s = [], 0
        for m, k in sizes[1:]:
            self.offsets.append(s)
            s += m * k
        self.s = s
        self.pairs, self.pair_of_row = [], []
        level_parts, column_parts = [], []
        for (m, k), off, c in zip(sizes[1:], self.offsets, codes[1:]):
            pair_keys, inverse = torch.unique(codes[0] * m + c, return_inverse=True)
            j, l = pair_keys // m, pair_keys % m
            self.pairs.append((j, l))
            self.pair_of_row.append(inverse)
            level_parts.append(j.repeat_interleave(k))
            column_parts.append((off + l[:, None] * k + torch.arange(k, device=l.device)).reshape(-1))
        device = codes[0].device
        levels = torch.cat(level_parts) if level_parts else torch.zeros(0, dtype=torch.long)
        columns = torch.cat(column_parts) if column_parts else torch.zeros(0, dtype=torch.long)
        levels, columns = levels.to(device), columns.to(device)
        order = torch.argsort(levels * max(s, 1) + columns)
        lengths = torch.bincount(levels, minlength=m0)
        starts = torch.cumsum(lengths, 0) - lengths
        self.buckets = []
        for z in torch.unique(lengths[lengths > 0]).tolist():
            members = torch.nonzero(lengths == z)[:, 0]
            at = order[starts[members][:, None] + torch.arange(z, device=device)]
            cols = columns[at]
            cells = (cols[:, :, None] * s + cols[:, None, :]).reshape(-1)
            self.buckets.append(_Bucket(members, cols, at, cells))
        if self.buckets:                                   # every bucket at once
            self.cells = torch.cat([b.cells for b in self.buckets])
            self.columns = torch.cat([b.columns.reshape(-1) for b in self.buckets])
            self.levels = torch.cat([b.levels for b in self.buckets])
        self.flops = float(k0 * (lengths.double() ** 2).sum()) + s ** 3 / 3

    def to_buckets(self, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-pair ``(pairs, k0, k_u)`` blocks of every other term → per bucket
        ``(count, k0, z)``."""
        if not blocks:
            return []
        flat = torch.cat([b.permute(1, 0, 2).reshape(self.k0, -1) for b in blocks], 1)
        return [flat[:, b.entries].permute(1, 0, 2) for b in self.buckets]

    def from_buckets(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The inverse of :meth:`to_buckets`."""
        total = sum(j.numel() * k for (j, _), (_, k) in zip(self.pairs, self.sizes[1:]))
        flat = parts[0].new_zeros(self.k0, total) if parts else None
        for b, part in zip(self.buckets, parts):
            flat[:, b.entries] = part.permute(1, 0, 2)
        out, start = [], 0
        for (j, _), (_, k) in zip(self.pairs, self.sizes[1:]):
            width = j.numel() * k
            out.append(flat[:, start:start + width].reshape(self.k0, -1, k).permute(1, 0, 2))
            start += width
        return out


class MixedModelFactor:
    """``M = L Lᵀ`` blocked as in the module docstring.

    Args:
        pattern: the :class:`Pattern` of the terms.
        D: ``(m0, k0, k0)`` diagonal blocks of term 0 (each ``≥ I``, so their triangular
            inverses, kept for the solves, are well conditioned).
        B: per other term, ``(pairs, k0, k_u)`` blocks of ``M_{0u}``.
        C: ``(s, s)`` block of the other terms (overwritten by the Schur complement).
    """

    def __init__(self, pattern: Pattern, D, B: list[torch.Tensor], C: torch.Tensor):
        message = "I + Λᵀ Zᵀ R⁻¹ Z Λ is not positive definite"
        self.pattern = pattern
        m0, k0 = pattern.sizes[0]
        if k0 == 1:                                        # D ≥ I: square roots
            if not bool(torch.isfinite(D).all()):
                raise NotPositiveDefiniteError(message)
            self.LD = D.sqrt()
            self.LDinv = 1 / self.LD
        elif k0 == 2:                                      # closed form, D ≥ I
            if not bool(torch.isfinite(D).all()):
                raise NotPositiveDefiniteError(message)
            a = D[:, 0, 0].sqrt()
            b = D[:, 1, 0] / a
            c = (D[:, 1, 1] - b * b).clamp(min=0).sqrt()
            zero = torch.zeros_like(a)
            self.LD = torch.stack([torch.stack([a, zero], 1), torch.stack([b, c], 1)], 1)
            self.LDinv = torch.stack([torch.stack([1 / a, zero], 1),
                                      torch.stack([-b / (a * c), 1 / c], 1)], 1)
        else:
            self.LD = cholesky(D, message)
            eye = torch.eye(k0, dtype=D.dtype, device=D.device).expand(m0, k0, k0)
            self.LDinv = torch.linalg.solve_triangular(self.LD, eye, upper=False)
        self.E = [self.LDinv[b.levels] @ part
                  for b, part in zip(pattern.buckets, pattern.to_buckets(B))]
        S = C
        if self.E:                                                 # S = C - Eᵀ E
            S.view(-1).index_add_(0, pattern.cells,
                                  torch.cat([(E.transpose(1, 2) @ E).reshape(-1)
                                             for E in self.E]), alpha=-1)
        self.LS = cholesky(S, message) if pattern.s else S
        self.logdet = 2 * (torch.log(self.LD.diagonal(dim1=1, dim2=2)).sum()
                           + torch.log(self.LS.diagonal()).sum())

    def _e_t(self, x0: torch.Tensor) -> torch.Tensor:
        """``Eᵀ x_0`` for ``x_0`` of shape ``(m0, k0, r)``: ``(s, r)``."""
        r = x0.shape[-1]
        parts = [(E.transpose(1, 2) @ x0[b.levels]).reshape(-1, r)
                 for b, E in zip(self.pattern.buckets, self.E)]
        return x0.new_zeros(self.pattern.s, r).index_add_(0, self.pattern.columns,
                                                          torch.cat(parts))

    def _e(self, x: torch.Tensor) -> torch.Tensor:
        """``E x`` for ``x`` of shape ``(s, r)``: ``(m0, k0, r)``."""
        m0, k0 = self.pattern.sizes[0]
        out = x.new_zeros(m0, k0, x.shape[-1])
        out[self.pattern.levels] = torch.cat([E @ x[b.columns]
                                              for b, E in zip(self.pattern.buckets, self.E)])
        return out

    def solve_lower(self, u: torch.Tensor) -> torch.Tensor:
        """``L⁻¹ u`` for ``u`` of shape ``(q, r)`` (term 0's rows first)."""
        m0, k0 = self.pattern.sizes[0]
        x0 = self.LDinv @ u[:m0 * k0].reshape(m0, k0, -1)
        rest = u[m0 * k0:]
        if self.pattern.s:
            rest = torch.linalg.solve_triangular(self.LS, rest - self._e_t(x0), upper=False)
        return torch.cat([x0.reshape(m0 * k0, -1), rest])

    def solve_upper(self, w: torch.Tensor) -> torch.Tensor:
        """``L⁻ᵀ w`` for ``w`` of shape ``(q, r)``."""
        m0, k0 = self.pattern.sizes[0]
        rest, top = w[m0 * k0:], w[:m0 * k0].reshape(m0, k0, -1)
        if self.pattern.s:
            rest = torch.linalg.solve_triangular(self.LS.T, rest, upper=True)
            top = top - self._e(rest)
        x0 = self.LDinv.mT @ top
        return torch.cat([x0.reshape(m0 * k0, -1), rest])

    def selected_inverse(self):
        """``M⁻¹`` where ``ΛᵀZᵀR⁻¹ZΛ`` is not zero: ``(diagonal blocks of term 0 (m0, k0, k0),
        per other term its pair blocks of M⁻¹_{0u} (pairs, k0, k_u), S⁻¹ (s, s))``."""
        m0, k0 = self.pattern.sizes[0]
        Sinv = torch.cholesky_inverse(self.LS) if self.pattern.s else self.LS
        inner = torch.eye(k0, dtype=self.LD.dtype, device=self.LD.device).repeat(m0, 1, 1)
        cross, flat = [], Sinv.reshape(-1)
        for b, E in zip(self.pattern.buckets, self.E):
            z = b.columns.shape[1]
            F = E @ flat[b.cells].reshape(-1, z, z)                # E_j S⁻¹ on its pattern
            inner.index_add_(0, b.levels, F @ E.transpose(1, 2))
            cross.append(-self.LDinv[b.levels].mT @ F)
        diagonal = self.LDinv.mT @ inner @ self.LDinv
        return diagonal, self.pattern.from_buckets(cross), Sinv
