r"""Random effects over a block-diagonal structured residual: multi-environment field trials.

``V = Σ_t Z_t G_t Z_tᵀ + R`` with ``R = diag(R_1, ..., R_B)`` over consecutive rows (one block
per trial; each block a Kronecker structure ``A ⊗ B + s I`` or diagonal, read from the
capability views). One term may be an **environment term** ``G = I_L ⊗ Σ`` (``L`` genotypes,
``Σ`` ``E x E`` over environments; ``Z``'s columns genotype-major, column ``j E + e``) whose
environment-``e`` columns all fall in the rows of one block. With ``Σ = Λ Λᵀ + diag(ψ)`` (a
factor-analytic ``Σ``: its loadings and specific variances; a diagonal ``Σ``: ``Λ = 0``; any
other: ``Λ`` its Cholesky factor, ``ψ = 0``),

.. math::

    V = R^* + C C^T, \qquad R^* = \operatorname{diag}_b(R_b + Z_b \Psi_b Z_b^T), \qquad
    C = [Z (I_L \otimes \Lambda),\; Z_t L_t, \dots],

``L_t L_tᵀ = G_t`` for every other term. Level 1 is one low-rank update per block
(``L |E_b|`` columns) over its Kronecker factor, level 2 one update with ``L k + Σ_t q_t``
columns over the block factor (:mod:`.factors`): for a ``FA(k)`` model of ``E`` trials the
mixed-model equations are ``E`` systems of size ``L`` and one of size ``L k``, not ``L E``,
and no ``N x N`` (nor trial-sized dense) matrix is formed.

**Gradient.** With the level-1 corrections ``E_b = R_b⁻¹ C_b L_{M_b}^{-T}`` (``R_b^{*-1} =
R_b⁻¹ - E_b E_bᵀ``), ``H = R^{*-1} C L_M^{-T}`` and ``T = V⁻¹ X L_A^{-T}`` (REML),

.. math:: \bar G = \tfrac12(P - Py\,Py^T)
          = \tfrac12\big[\operatorname{diag}_b(R_b^{-1} - E_b E_b^T) - W W^T\big],
          \qquad W = [H,\; T,\; Py].

Block ``b``'s residual parameters get ``⟨Ḡ_bb, ∂R_b⟩`` from the Kronecker kernel
(:meth:`~.kronecker.KroneckerFactor.cotangents`) with columns ``[E_b, W_b]``; the environment
term's ``Σ`` gets ``S_ef = Σ_j (Zᵀ Ḡ Z)_{(j,e),(j,f)}``; every other term ``Z_tᵀ Ḡ Z_t``. The AI
matrix is the solvers' common one (structured ``dV`` products, whitened by this factor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import MixedModel
from .base import GLSState, Solver, UnsupportedStructure, additive_pieces
from .factors import BlockFactor, DiagonalFactor, LowRankFactor
from .kronecker import EigenCache, KroneckerFactor
from .woodbury import root

__all__ = ["MultiEnvironmentSolver"]


@dataclass
class _Block:
    """A diagonal block of the residual: its rows, structure and (for an environment term)
    dense ``Z_b``: columns ``a L + j`` for environment ``envs[a]`` and genotype ``j``."""

    rows: slice
    kind: str                       # "kron" or "diag"
    view: object
    params: slice                   # of the model's flat parameters
    part: int                       # blocks of one diagonal residual share a part
    envs: list = field(default_factory=list)
    Z: torch.Tensor | None = None
    cache: EigenCache = field(default_factory=EigenCache)

    def factor(self, nat):
        if self.kind == "kron":
            factors, s = self.view.values(nat[self.params])
            return KroneckerFactor(factors, s, self.cache)
        d = self.view.values(nat[self.params])
        size = self.rows.stop - self.rows.start
        return DiagonalFactor(d if d.shape[0] == size else d[self.rows])


class MultiEnvironmentSolver(Solver):
    """Random terms over a block-diagonal Kronecker / diagonal residual (module docstring)."""

    name = "met"

    def __init__(self, model):
        super().__init__(model)
        if not isinstance(model, MixedModel) or not model.term_names:
            raise UnsupportedStructure("needs a MixedModel with random terms")
        terms = [(name, G, off) for name, G, off in additive_pieces(model) if name is not None]
        self.n = model.shape[0]
        self.env, env_rows = self._environment_term(terms)
        self.blocks = self._residual_blocks(model._modules["residual"],
                                            sum(G.num_params for _, G, _ in terms), env_rows)
        self._assign_environments(env_rows)
        if all(b.kind == "diag" for b in self.blocks) and self.env is None:
            raise UnsupportedStructure("a diagonal residual without an environment term is the "
                                       "Woodbury solver's")
        self.others = [(name, G, off, model.z_matmul(name, torch.eye(
            G.shape[0], dtype=torch.float64))) for name, G, off in terms
            if self.env is None or name != self.env[0]]

    # ------------------------------------------------------------------ structure
    def _environment_term(self, terms):
        """``(name, G, offset, Σ module, E, L, level, values)`` of the first ``I_L ⊗ Σ`` term
        whose rows each touch one environment, and the environment of each row (-1: none)."""
        for name, G, off in terms:
            view = G.repeated_block_view()
            if view is None:
                continue
            E = view.block.shape[0]
            groups = self.model.term_groups(name, E)
            if groups is None:
                continue
            level, values = groups
            nonzero = values != 0
            if bool((nonzero.sum(1) > 1).any()):
                continue
            env = torch.where(nonzero.any(1), nonzero.to(torch.int8).argmax(1), -1)
            env = torch.where(level >= 0, env, -1)
            return (name, G, off, view.block, E, view.count, level, values), env
        return None, torch.full((self.n,), -1)

    def _residual_blocks(self, R, off, env_rows):
        def absolute(params):
            return slice(off + params.start, off + params.stop)

        view = R.block_diagonal_view()
        if view is not None:
            out = []
            for i, (module, rows, params) in enumerate(view.blocks):
                kron, diag = module.kronecker_view(), module.diagonal_view()
                if kron is None and diag is None:
                    raise UnsupportedStructure("each residual block must be a Kronecker "
                                               "structure or diagonal")
                out.append(_Block(rows, "kron" if kron else "diag", kron or diag,
                                  absolute(params), i))
            return out
        whole = slice(0, R.num_params)
        if R.kronecker_view() is not None:
            return [_Block(slice(0, self.n), "kron", R.kronecker_view(), absolute(whole), 0)]
        if R.diagonal_view() is None:
            raise UnsupportedStructure("the residual must be block diagonal, a Kronecker "
                                       "structure or diagonal")
        return [_Block(rows, "diag", R.diagonal_view(), absolute(whole), 0)
                for rows in _runs(env_rows)]

    def _assign_environments(self, env_rows):
        """Each environment's block (the environment term is dropped to level 2 as a
        general term when an environment spans blocks) and the blocks' dense ``Z_b``."""
        if self.env is None:
            return
        name, G, off, block, E, L, level, values = self.env
        where = {}
        for b, blk in enumerate(self.blocks):
            for e in torch.unique(env_rows[blk.rows]).tolist():
                if e >= 0:
                    where.setdefault(e, set()).add(b)
        if any(len(bs) > 1 for bs in where.values()):
            self.env = None
            return
        for e, (b,) in sorted(where.items()):
            self.blocks[b].envs.append(e)
        for blk in self.blocks:
            if not blk.envs:
                continue
            rows = torch.arange(blk.rows.start, blk.rows.stop)
            local = torch.full((E,), -1, dtype=torch.long)
            local[torch.tensor(blk.envs)] = torch.arange(len(blk.envs))
            e = env_rows[rows]
            seen = e >= 0
            Z = torch.zeros(len(rows), len(blk.envs) * L, dtype=torch.float64)
            Z[seen.nonzero()[:, 0], local[e[seen]] * L + level[rows][seen]] = \
                values[rows[seen], e[seen]].to(torch.float64)
            blk.Z = Z

    @property
    def cost(self) -> float:
        q1 = max([b.Z.shape[1] for b in self.blocks if b.Z is not None] or [0])
        q2 = sum(G.shape[0] for _, G, _, _ in self.others) + (
            0 if self.env is None else self.env[5] * self.env[4])
        return self.n * (q1 ** 2 + q2 ** 2) + len(self.blocks) * q1 ** 3 + q2 ** 3

    # --------------------------------------------------------------- factorisation
    def _sigma_parts(self, nat):
        """``(Λ, ψ)`` of the environment term's ``Σ`` at ``nat``."""
        _, G, off, block, E, *_ = self.env
        part = nat[off:off + G.num_params]
        low_rank, diagonal = block.low_rank_diagonal_view(), block.diagonal_view()
        if low_rank is not None:
            return low_rank.values(part)
        if diagonal is not None:
            return part.new_zeros(E, 0), diagonal.values(part)
        return root(block._evaluate(part)), part.new_zeros(E)

    def factorize(self, nat):
        columns, factors = [], []
        if self.env is not None:
            Lam, psi = self._sigma_parts(nat)
            _, _, _, _, E, L, level, values = self.env
            k = Lam.shape[1]
            if k:
                C = nat.new_zeros(self.n, L, k)
                seen = level >= 0
                C[seen, level[seen]] = values[seen].to(nat) @ Lam
                columns.append(C.reshape(self.n, L * k))
        for blk in self.blocks:
            base = blk.factor(nat)
            if blk.Z is not None:
                Zb = blk.Z.to(nat)
                Zw = base.whiten(Zb)
                scale = psi[blk.envs].clamp(min=0).sqrt().repeat_interleave(L)
                f = LowRankFactor(base, Zb * scale, Zw * scale)
                f.K = base.inner(Zw, Zw)                         # Z_bᵀ R_b⁻¹ Z_b
                factors.append(f)
            else:
                factors.append(base)
        for name, G, off, Zt in self.others:
            columns.append(Zt.to(nat) @ root(G._evaluate(nat[off:off + G.num_params])))
        level1 = BlockFactor(factors, [b.rows.stop - b.rows.start for b in self.blocks])
        if not columns or sum(c.shape[1] for c in columns) == 0:
            return level1
        return LowRankFactor(level1, torch.cat(columns, 1))

    # -------------------------------------------------------------------- gradient
    def natural_gradient(self, nat, state: GLSState):
        top = state.factor
        level1 = top.base if isinstance(top, LowRankFactor) else top
        W = [state.Py[:, None]]
        if top is not level1:
            W.append(top.correction())
        if state.method == "reml":
            W.append(top.unwhiten(state.low_rank_x()))
        W = torch.cat(W, 1)
        out = torch.zeros_like(nat)
        corrections = [f.correction() if isinstance(f, LowRankFactor) else None
                       for f in level1.factors]
        self._residual_gradient(nat, W, level1, corrections, out)
        if self.env is not None:
            self._environment_gradient(nat, W, level1, corrections, out)
        for name, G, off, Zt in self.others:
            Y = self.model.zt_matmul(name, W)
            Gt = -Y @ Y.T
            for blk, f in zip(self.blocks, level1.factors):
                Zb = Zt[blk.rows].to(nat)
                if bool((Zb != 0).any()):
                    w = f.whiten(Zb)
                    Gt += f.inner(w, w)
            out[off:off + G.num_params] += G._vjp(nat[off:off + G.num_params], 0.5 * Gt)
        return out

    def _residual_gradient(self, nat, W, level1, corrections, out):
        diagonal = {}
        for blk, f, Eb in zip(self.blocks, level1.factors, corrections):
            Wb = W[blk.rows] if Eb is None else torch.cat([Eb, W[blk.rows]], 1)
            base = f.base if Eb is not None else f
            if blk.kind == "kron":
                grads, trace = base.cotangents(base.rotate(Wb))
                out[blk.params] += blk.view.vjp(nat[blk.params], grads, trace)
            else:
                diagonal.setdefault(blk.part, (blk, []))[1].append(
                    0.5 * (1 / base.r - (Wb * Wb).sum(1)))
        for blk, parts in diagonal.values():
            out[blk.params] += blk.view.vjp(nat[blk.params], torch.cat(parts))

    def _environment_gradient(self, nat, W, level1, corrections, out):
        name, G, off, block, E, L, _, _ = self.env
        Y = self.model.zt_matmul(name, W).reshape(L, E, -1)
        S = -torch.einsum("jec,jfc->ef", Y, Y)
        for blk, f, Eb in zip(self.blocks, level1.factors, corrections):
            if Eb is None:
                continue
            ZE = blk.Z.to(nat).T @ Eb
            a = len(blk.envs)
            K = (f.K - ZE @ ZE.T).reshape(a, L, a, L)                # Z_bᵀ R*_b⁻¹ Z_b
            idx = torch.tensor(blk.envs)
            S[idx[:, None], idx[None, :]] += torch.einsum("ajbj->ab", K)
        part = nat[off:off + G.num_params]
        out[off:off + G.num_params] += block._vjp(part, 0.5 * S)


def _runs(env_rows: torch.Tensor) -> list[slice]:
    """Consecutive rows of one environment each (rows of none join the current run); one
    run when an environment's rows are not consecutive."""
    starts, current, seen = [0], None, set()
    for i, e in enumerate(env_rows.tolist()):
        if e < 0 or e == current:
            continue
        if current is not None:
            starts.append(i)
        if e in seen:
            return [slice(0, len(env_rows))]
        seen.add(e)
        current = e
    ends = starts[1:] + [len(env_rows)]
    return [slice(a, b) for a, b in zip(starts, ends)]
