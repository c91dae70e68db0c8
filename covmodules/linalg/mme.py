r"""The mixed-model-equations solver: crossed and nested random terms at lme4's scale.

``V = Σ_t Z_t (I ⊗ S_t) Z_tᵀ + R`` with every ``Z_t`` one block of ``k_t`` columns per level
(group codes and term values; a dense ``Z`` of that pattern is converted when the model is
built) and ``R`` diagonal (any residual with a
:class:`~covmodules.capabilities.DiagonalView`). It is the Woodbury identity of
:mod:`.woodbury` with ``M = I + ΛᵀZᵀR⁻¹ZΛ`` factorised blockwise (:mod:`.blocked`), so no
``n x q`` or ``q x q`` matrix is formed:

- ``Zᵀ R⁻¹ Z`` is summed from the codes in ``O(n Σ_t k_t²)``, once for a residual ``σ² I``
  (scaled by ``1/σ²`` at every evaluation: lme4's sufficient statistics), at every evaluation
  otherwise;
- the whitening ``F B = [R^{-1/2} B ; L_M⁻¹ Λᵀ Zᵀ R⁻¹ B]`` costs ``O(n k)`` per column plus the
  blocked triangular solves.

**Gradient.** ``T = Zᵀ V⁻¹ Z`` satisfies ``T Λ = Zᵀ R⁻¹ Z Λ M⁻¹``, so the level sums the terms'
VJPs need, ``Σ_j T_jj = (Σ_j [KΛM⁻¹]_jj) L_t⁻¹`` (``K = ZᵀR⁻¹Z``), read ``M⁻¹`` only where
``K`` is not zero (:meth:`.blocked.MixedModelFactor.selected_inverse`), and so does the residual's
``diag V⁻¹ = r⁻¹ - r⁻² diag(Z Λ M⁻¹ Λᵀ Zᵀ)``. A singular ``S_t`` (a variance at zero) is
factorised as ``Q diag(√max(λ, δ²)) `` with ``δ² = 10⁻¹²⁰`` times the mean residual variance,
which changes ``V`` below rounding and keeps ``L_t`` invertible: each such column scales by
``δ`` exactly, so the division by it is exact. The REML correction and the ``P y`` terms are
level sums of ``Zᵀ V⁻¹ X`` and ``Zᵀ P y`` as in :mod:`.grouped`, and the AI products use the
level sums ``Z̃ᵀ P y``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..structures.block_design import block_matmul, block_rmatmul
from .base import (Factor, GLSState, Solver, UnsupportedStructure, additive_pieces,
                   mixed_model_pieces, term_dv)
from .blocked import MixedModelFactor, Pattern
from .woodbury import root

__all__ = ["MMESolver", "MMEFactor"]


@dataclass
class _Term:
    """A random term ``Z (I_m ⊗ S) Zᵀ``: codes ``(n,)``, values ``(n, k)``, ``m`` levels."""

    name: str
    block: object                # S
    offset: int                  # first parameter of G in the model's flat order
    num_params: int
    codes: torch.Tensor
    values: torch.Tensor
    m: int

    @property
    def k(self) -> int:
        return self.values.shape[1]


def _root(S: torch.Tensor, floor: float) -> torch.Tensor:
    """``L`` with ``L Lᵀ = S``, its singular directions raised to ``√floor``."""
    L = root(S)
    if bool((L.norm(dim=0) ** 2 > floor).all()):
        return L
    lam, Q = torch.linalg.eigh(S)
    return Q * lam.clamp(min=floor).sqrt()


def _lam_t(L, x):
    """``(I ⊗ L)ᵀ x`` for ``x`` of shape ``(m k, r)``."""
    k = L.shape[0]
    if k == 1:
        return x * L[0, 0]
    return torch.einsum("ba,mbr->mar", L, x.reshape(-1, k, x.shape[-1])).reshape(x.shape)


def _lam(L, x):
    """``(I ⊗ L) x``."""
    k = L.shape[0]
    if k == 1:
        return x * L[0, 0]
    return torch.einsum("ab,mbr->mar", L, x.reshape(-1, k, x.shape[-1])).reshape(x.shape)


class MMEFactor(Factor):
    """``V = R + Z Λ Λᵀ Zᵀ`` through the blocked factor of ``M``; signature ``(+n, −q)``."""

    def __init__(self, r, terms: list[_Term], lams: list[torch.Tensor], M: MixedModelFactor,
                 data_sums=None):
        self.r, self.terms, self.lams, self.M, self.n = r, terms, lams, M, r.shape[0]
        self.logdet = torch.log(r).sum() + M.logdet
        self.data_sums = data_sums if bool((r == r[0]).all()) else None

    def lam_zt(self, B):
        """``Λᵀ Zᵀ B`` (``q x r``)."""
        return torch.cat([_lam_t(L, block_rmatmul(t.codes, t.values, t.m, B))
                          for t, L in zip(self.terms, self.lams)])

    def _lam_zt_r(self, B):
        """``Λᵀ Zᵀ R⁻¹ B``, from the kept ``Z̃ᵀ B`` of the fit's data when ``R = r I``."""
        sums = None if self.data_sums is None else self.data_sums(B)
        if sums is None:
            return self.lam_zt(B / self.r[:, None])
        return torch.cat([_lam_t(L, part) for part, L in zip(sums, self.lams)]) / self.r[0]

    def z_lam(self, x):
        """``Z Λ x`` (``n x r``)."""
        out, start = 0, 0
        for t, L in zip(self.terms, self.lams):
            q = t.m * t.k
            out = out + block_matmul(t.codes, t.values, t.m, _lam(L, x[start:start + q]))
            start += q
        return out

    def whiten(self, B):
        low = self.M.solve_lower(self._lam_zt_r(B))
        return torch.cat([B / self.r.sqrt()[:, None], low])

    def unwhiten(self, W):
        n = self.n
        return (W[:n] / self.r.sqrt()[:, None]
                - self.z_lam(self.M.solve_upper(W[n:])) / self.r[:, None])

    def inner(self, U, W):
        n = self.n
        return U[:n].T @ W[:n] - U[n:].T @ W[n:]


class MMESolver(Solver):
    """Crossed / nested random terms, each ``I ⊗ S`` on a block design, and a diagonal ``R``
    (see the module docstring)."""

    name = "mme"

    def __init__(self, model):
        super().__init__(model)
        self.terms, self.residual = _read(model)
        self.n = model.shape[0]
        self.pattern = Pattern([t.codes for t in self.terms], [(t.m, t.k) for t in self.terms])
        self._unit = None                                  # Zᵀ Z blocks (R = σ² I)
        self._data = []                                    # (B, version, Z̃ᵀ B) of y and X

    #: flop-equivalent of one evaluation's fixed work per term (its dozen small kernels and
    #: Python steps, about 0.5 ms measured on sleepstudy-sized models against the grouped
    #: solver, which has fewer), so that small one-factor models keep the grouped solver.
    OVERHEAD = 5e5

    @property
    def cost(self) -> float:
        return (self.n * sum(t.k for t in self.terms) ** 2 + self.pattern.flops
                + self.OVERHEAD * len(self.terms))

    def _cross_products(self, w: torch.Tensor):
        """``Zᵀ diag(w) Z = c · (D blocks, pair blocks per other term, dense rest)``: the sums
        of unit weights (kept) and ``c = w_0`` for a constant ``w``, else those of ``w`` and 1."""
        if bool((w == w[0]).all()):
            if self._unit is None or self._unit[0].dtype != w.dtype:
                self._unit = self._sums(torch.ones_like(w))
            return (*self._unit, w[0])
        return (*self._sums(w), w.new_ones(()))

    def _sums(self, w):
        t0, rest, p = self.terms[0], self.terms[1:], self.pattern
        v0 = t0.values.to(w.dtype)
        D = w.new_zeros(t0.m, t0.k, t0.k).index_add_(
            0, t0.codes, w[:, None, None] * v0[:, :, None] * v0[:, None, :])
        B = [w.new_zeros(j.numel(), t0.k, t.k).index_add_(
                 0, inv, w[:, None, None] * v0[:, :, None] * t.values.to(w)[:, None, :])
             for t, (j, _), inv in zip(rest, p.pairs, p.pair_of_row)]
        C = w.new_zeros(p.s * p.s)
        for a, (t, off) in enumerate(zip(rest, p.offsets)):
            for u, off_u in zip(rest[a:], p.offsets[a:]):
                rows = off + t.codes[:, None] * t.k + torch.arange(t.k, device=t.codes.device)
                cols = off_u + u.codes[:, None] * u.k + torch.arange(u.k, device=u.codes.device)
                index = rows[:, :, None] * p.s + cols[:, None, :]
                value = w[:, None, None] * t.values.to(w)[:, :, None] * u.values.to(w)[:, None]
                C.index_add_(0, index.reshape(-1), value.reshape(-1))
                if u is not t:
                    index = cols[:, :, None] * p.s + rows[:, None, :]
                    C.index_add_(0, index.reshape(-1), value.transpose(1, 2).reshape(-1))
        return D, B, C.reshape(p.s, p.s)

    def state(self, free, y, X, method):
        """As :meth:`Solver.state`; ``Z̃ᵀ X`` and ``Z̃ᵀ y`` are summed once per data set."""
        self._data = [(B, B._version, [block_rmatmul(t.codes, t.values, t.m, B.to(free))
                                       for t in self.terms])
                      if found is None else found
                      for B in (X, y[:, None]) for found in [self._data_sums_entry(B)]]
        return super().state(free, y, X, method)

    def _data_sums_entry(self, B):
        for entry in self._data:
            kept, version, _ = entry
            if (kept.data_ptr() == B.data_ptr() and kept.shape == B.shape
                    and kept.stride() == B.stride() and kept.dtype == B.dtype
                    and kept.device == B.device and version == B._version):
                return entry
        return None

    def _data_sums(self, B):
        entry = self._data_sums_entry(B)
        return None if entry is None else entry[2]

    def _r(self, nat):
        return sum(view.values(nat[rows]) for view, rows in self.residual)

    def factorize(self, nat):
        r = self._r(nat)
        lams, M = self._factor_m(nat, r)
        return MMEFactor(r, self.terms, lams, M, self._data_sums)

    def _factor_m(self, nat, r):
        """The terms' roots ``L_t`` and the blocked factor of ``M`` for residual diagonal ``r``."""
        floor = 1e-120 * float(r.detach().mean())
        lams = [_root(t.block._evaluate(nat[t.offset:t.offset + t.num_params]), floor)
                for t in self.terms]
        Kd, Kb, Kc, c = self._cross_products(1 / r)
        L0 = lams[0]
        D = c * (L0.T @ Kd @ L0) + torch.eye(L0.shape[0], dtype=r.dtype, device=r.device)
        B = [c * (L0.T @ b @ L) for b, L in zip(Kb, lams[1:])]
        C = _lam_t_rows_cols(lams[1:], self.terms[1:], Kc).mul_(c)    # the one s x s copy
        C.diagonal().add_(1.0)
        return lams, MixedModelFactor(self.pattern, D, B, C)

    def natural_gradient(self, nat, state: GLSState):
        f, Py = state.factor, state.Py
        w = 1 / f.r
        Sd, Sb, Sinv = f.M.selected_inverse()
        H = self._level_sums(w, f.lams, Sd, Sb, Sinv)
        W = f.unwhiten(state.low_rank_x()) if state.method == "reml" else None
        quad = self._row_quadratic(f, Sd, Sb, Sinv)
        d = w - w * w * quad - Py ** 2
        if W is not None:
            d = d - (W * W).sum(1)
        zp = [block_rmatmul(t.codes, t.values, t.m, Py[:, None]).reshape(t.m, t.k)
              for t in self.terms]
        zw = [None if W is None else block_rmatmul(t.codes, t.values, t.m, W).reshape(t.m, t.k, -1)
              for t in self.terms]
        out = self._term_gradients(nat, f.lams, H, zp, zw)
        for view, rows in self.residual:
            out[rows] = view.vjp(nat[rows], 0.5 * d)
        return out

    def _level_sums(self, w, lams, Sd, Sb, Sinv) -> list[torch.Tensor]:
        """``H_t = Σ_j [K Λ M⁻¹]_jj`` per term (``K = Zᵀ diag(w) Z``), from the selected
        inverse."""
        Kd, Kb, Kc, c = self._cross_products(w)
        rest, p, L0 = self.terms[1:], self.pattern, lams[0]
        H = [(Kd @ L0 @ Sd).sum(0)]
        H[0] = H[0] + sum(((b @ L) @ s.transpose(1, 2)).sum(0)
                          for b, L, s in zip(Kb, lams[1:], Sb))
        KL = _lam_cols(lams[1:], rest, Kc)                  # K_rest Λ_rest / c
        for t, off, L, b, s in zip(rest, p.offsets, lams[1:], Kb, Sb):
            q = t.m * t.k
            dense = (KL[off:off + q].reshape(t.m, t.k, -1)
                     @ Sinv[:, off:off + q].T.reshape(t.m, t.k, -1).transpose(1, 2)).sum(0)
            H.append((b.transpose(1, 2) @ L0 @ s).sum(0) + dense)
        return [c * h for h in H]

    def _term_gradients(self, nat, lams, H, zp, zw) -> torch.Tensor:
        """The terms' natural gradients (zeros elsewhere) from ``H_t`` and the level sums
        ``Z_tᵀ P y`` (``(m, k)``) and ``Z_tᵀ W`` (``(m, k, p)``, ``None`` for ML)."""
        out = nat.new_zeros(nat.shape[0])
        for t, L, h, zp_t, zw_t in zip(self.terms, lams, H, zp, zw):
            Sbar = torch.linalg.solve(L.T, h.T).T - zp_t.T @ zp_t
            if zw_t is not None:
                Sbar = Sbar - torch.einsum("map,mbp->ab", zw_t, zw_t)
            Sbar = 0.25 * (Sbar + Sbar.T)
            out[t.offset:t.offset + t.num_params] = t.block._vjp(
                nat[t.offset:t.offset + t.num_params], Sbar)
        return out

    def _row_quadratic(self, f: MMEFactor, Sd, Sb, Sinv):
        """``diag(Z Λ M⁻¹ Λᵀ Zᵀ)`` from the selected inverse."""
        p = self.pattern
        a = [t.values.to(Sinv.dtype) @ L for t, L in zip(self.terms, f.lams)]   # Λᵀ z_i
        t0 = self.terms[0]
        out = torch.einsum("ia,iab,ib->i", a[0], Sd[t0.codes], a[0])
        for au, s, inv in zip(a[1:], Sb, p.pair_of_row):
            out = out + 2 * torch.einsum("ia,iab,ib->i", a[0], s[inv], au)
        for x, (t, off) in enumerate(zip(self.terms[1:], p.offsets)):
            rows = off + t.codes[:, None] * t.k + torch.arange(t.k, device=t.codes.device)
            for u, off_u, au in zip(self.terms[1 + x:], p.offsets[x:], a[1 + x:]):
                cols = off_u + u.codes[:, None] * u.k + torch.arange(u.k, device=u.codes.device)
                block = Sinv[rows[:, :, None], cols[:, None, :]]
                term = torch.einsum("ia,iab,ib->i", a[1 + x], block, au)
                out = out + (term if u is t else 2 * term)
        return out

    def natural_dv_py(self, nat, Py):
        """Terms through their level sums ``Z̃ᵀ P y``, the residual's pieces their own."""
        U = Py.new_zeros(nat.shape[0], self.n)
        for t in self.terms:
            rows = slice(t.offset, t.offset + t.num_params)
            U[rows] = term_dv(t.block, nat[rows], t.codes, t.values, t.m, Py)
        for name, module, off in additive_pieces(self.model):
            if name is None:
                rows = slice(off, off + module.num_params)
                U[rows] = module._dv_matmul(nat[rows], Py[:, None])[..., 0]
        return U


def _read(model) -> tuple[list[_Term], list]:
    """The random terms of ``model`` (most columns first) and its residual's diagonal pieces
    ``(view, parameter slice)``; :class:`UnsupportedStructure` when it has other structure."""
    terms, residual = [], []
    for name, module, off in mixed_model_pieces(model):
        if name is None:
            view = module.diagonal_view()
            if view is None:
                raise UnsupportedStructure("the residual must be diagonal")
            residual.append((view, slice(off, off + module.num_params)))
            continue
        view = module.repeated_block_view()
        rows = None if view is None else model.term_groups(name, view.block.shape[0])
        if rows is None:
            raise UnsupportedStructure(f"random term {name!r} is not I ⊗ S on a design "
                                       "with one block of columns per level")
        codes, values = rows
        values = values.to(torch.float64) * (codes >= 0)[:, None]
        terms.append(_Term(name, view.block, off, module.num_params, codes.clamp(min=0),
                           values, view.count))
    return sorted(terms, key=lambda t: -t.m * t.k), residual


def _lam_cols(lams, terms, K):
    """``K Λ`` for the dense block of the other terms."""
    out = K.clone()
    off = 0
    for t, L in zip(terms, lams):
        q = t.m * t.k
        if t.k == 1:
            out[:, off:off + q] *= L[0, 0]
        else:
            out[:, off:off + q] = _lam_t(L, K[:, off:off + q].T).T
        off += q
    return out


def _lam_t_rows_cols(lams, terms, K):
    """``Λᵀ K Λ`` for the dense block of the other terms."""
    KL = _lam_cols(lams, terms, K)
    off = 0
    for t, L in zip(terms, lams):
        q = t.m * t.k
        if t.k == 1:
            KL[off:off + q] *= L[0, 0]
        else:
            KL[off:off + q] = _lam_t(L, KL[off:off + q])
        off += q
    return KL
