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

import functools
from dataclasses import dataclass, field

import torch

from .base import (Factor, GLSState, NotPositiveDefiniteError, Solver, UnsupportedStructure,
                   mixed_model_pieces)
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
            part = nat[self.params]
            factors, s = self.view.values(part)
            return KroneckerFactor(factors, s, self.cache,
                                   eigh=lambda i, A: self.view.eigh(part, i, A))
        d = self.view.values(nat[self.params])
        size = self.rows.stop - self.rows.start
        return DiagonalFactor(d if d.shape[0] == size else d[self.rows])


class MultiEnvironmentSolver(Solver):
    """Random terms over a block-diagonal Kronecker / diagonal residual (module docstring)."""

    name = "met"

    def __init__(self, model):
        super().__init__(model)
        terms = [(name, G, off) for name, G, off in mixed_model_pieces(model)
                 if name is not None]
        self.n = model.shape[0]
        self.env, env_rows = self._environment_term(terms)
        self.blocks = self._residual_blocks(model._modules["residual"],
                                            sum(G.num_params for _, G, _ in terms), env_rows)
        self._require_environments()                      # before any per-block Z is formed
        self._assign_environments(env_rows)
        self._require_environments()
        if self.env is not None:
            _, _, _, _, E, _, level, values = self.env
            rows = (env_rows >= 0).nonzero()[:, 0]
            self._env_entries = (rows, level[rows] * E + env_rows[rows],
                                 values[rows, env_rows[rows]])
        self.others = [(name, G, off, model.z_matmul(name, torch.eye(
            G.shape[0], dtype=torch.float64))) for name, G, off in terms
            if self.env is None or name != self.env[0]]

    # ------------------------------------------------------------------ structure
    def _require_environments(self):
        if all(b.kind == "diag" for b in self.blocks) and (self.env is None
                                                            or self.env[4] < 2):
            raise UnsupportedStructure("a diagonal residual without a term over two or more "
                                       "environments is the Woodbury / mme solvers'")

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
        """Per block ``n_b q_b (q_b + Σ n_i)`` and ``q_b³`` (level 1), ``(k L)³`` (level 2),
        ``n q_t² + q_t³`` for the other terms."""
        out = 0.0
        for blk in self.blocks:
            n_b, q_b = blk.rows.stop - blk.rows.start, 0 if blk.Z is None else blk.Z.shape[1]
            sides = sum(blk.view.sizes) if blk.kind == "kron" else 1
            out += n_b * (q_b + 1) * (q_b + sides) + q_b ** 3
        if self.env is not None:
            with torch.no_grad():
                k = self._sigma_parts(self.model.build_params())[0].shape[1]
            out += (k * self.env[5]) ** 3
        q = sum(G.shape[0] for _, G, _, _ in self.others)
        return out + self.n * q ** 2 + q ** 3

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
        factors = []
        if self.env is not None:
            Lam, psi = self._sigma_parts(nat)
            L = self.env[5]
        for blk in self.blocks:
            base = blk.factor(nat)
            if blk.Z is not None:
                Zb = blk.Z.to(nat)
                Zw = base.whiten(Zb)
                scale = psi[blk.envs].clamp(min=0).sqrt().repeat_interleave(L)
                f = LowRankFactor(base, Zb * scale, Zw * scale)
                f.K, f.Zw, f.scale = base.inner(Zw, Zw), Zw, scale      # K = Z_bᵀ R_b⁻¹ Z_b
                factors.append(f)
            else:
                factors.append(base)
        mid = BlockFactor(factors, [b.rows.stop - b.rows.start for b in self.blocks])
        if self.env is not None and Lam.shape[1]:
            mid = EnvironmentFactor(mid, [b.envs for b in self.blocks], Lam, L)
        columns = [Zt.to(nat) @ root(G._evaluate(nat[off:off + G.num_params]))
                   for name, G, off, Zt in self.others]
        if not columns or sum(c.shape[1] for c in columns) == 0:
            return mid
        return LowRankFactor(mid, torch.cat(columns, 1))

    # -------------------------------------------------------------------- gradient
    def natural_gradient(self, nat, state: GLSState):
        top = state.factor
        mid = top.base if isinstance(top, LowRankFactor) else top
        W = [state.Py[:, None]]
        if top is not mid:
            W.append(top.correction())
        if state.method == "reml":
            W.append(top.unwhiten(state.low_rank_x()))
        W = torch.cat(W, 1)
        out = torch.zeros_like(nat)
        env = mid if isinstance(mid, EnvironmentFactor) else None
        level1 = env.level1 if env is not None else mid
        self._residual_gradient(nat, W, level1, env, out)
        if self.env is not None:
            self._environment_gradient(nat, W, level1, env, out)
        for name, G, off, Zt in self.others:
            Y = self.model.zt_matmul(name, W)
            w = mid.whiten(Zt.to(nat))
            Gt = mid.inner(w, w) - Y @ Y.T                             # Z_tᵀ Ḡ Z_t
            out[off:off + G.num_params] += G._vjp(nat[off:off + G.num_params], 0.5 * Gt)
        return out

    def _residual_gradient(self, nat, W, level1, env, out):
        """``⟨Ḡ_bb, ∂R_b⟩``: ``Ḡ_bb = ½(R_b⁻¹ - Y_b A_b Y_bᵀ - W_b W_bᵀ)``, ``Y_b = R_b⁻¹ Z_b``."""
        diagonal = {}
        for b, (blk, f) in enumerate(zip(self.blocks, level1.factors)):
            base = f.base if blk.Z is not None else f
            if blk.kind == "kron":
                cols = base.rotate(W[blk.rows])
                if blk.Z is not None:                                  # Qᵀ Y_b = D^{-1/2} Z_w
                    cols = torch.cat([(f.Zw / base.root) @ root(_inner_a(f, env, b)), cols], 1)
                grads, trace = base.cotangents(cols)
                out[blk.params] += blk.view.vjp(nat[blk.params], grads, trace)
            else:
                cols = W[blk.rows]
                if blk.Z is not None:
                    cols = torch.cat([(f.Zw / base.root) @ root(_inner_a(f, env, b)), cols], 1)
                diagonal.setdefault(blk.part, (blk, []))[1].append(
                    0.5 * (1 / base.r - (cols * cols).sum(1)))
        for blk, parts in diagonal.values():
            out[blk.params] += blk.view.vjp(nat[blk.params], torch.cat(parts))

    def _environment_gradient(self, nat, W, level1, env, out):
        """``S_ef = Σ_j (Zᵀ Ḡ Z)_{(j,e),(j,f)}``, ``Zᵀ Ḡ Z = ½[Zᵀ V₂⁻¹ Z - (Zᵀ W)(Zᵀ W)ᵀ]``."""
        name, G, off, block, E, L, _, _ = self.env
        Y = self._env_zt(W).reshape(L, E, -1)
        S = -torch.einsum("jec,jfc->ef", Y, Y)
        J = W.new_zeros(E, L, env.q if env is not None else 0)      # Zᵀ V₂⁻¹ Z = K* - J Jᵀ
        for b, (blk, f) in enumerate(zip(self.blocks, level1.factors)):
            if blk.Z is None:
                continue
            a, idx = len(blk.envs), torch.tensor(blk.envs)
            K = _k_star(f).reshape(a, L, a, L)                         # Z_bᵀ R*_b⁻¹ Z_b
            S[idx[:, None], idx[None, :]] += torch.einsum("ajbj->ab", K)
            if env is not None:
                J[idx] = env.J[b].reshape(a, L, -1)
        S -= torch.einsum("ejc,fjc->ef", J, J)
        part = nat[off:off + G.num_params]
        out[off:off + G.num_params] += block._vjp(part, 0.5 * S)

    def _env_zt(self, W):
        """``Zᵀ W`` of the environment term (column ``j E + e``): one scatter-add."""
        rows, cols, vals = self._env_entries
        out = W.new_zeros(self.env[4] * self.env[5], W.shape[1])
        return out.index_add_(0, cols, vals.to(W)[:, None] * W[rows])


def _k_star(f: LowRankFactor) -> torch.Tensor:
    """``Z_bᵀ R*_b⁻¹ Z_b = K - K S M_b⁻¹ S K`` of a level-1 block factor."""
    low = torch.linalg.solve_triangular(f.LM, f.scale[:, None] * f.K, upper=False)
    return f.K - low.T @ low


def _inner_a(f: LowRankFactor, env, b: int) -> torch.Tensor:
    """``A_b`` with ``V₂⁻¹_bb = R_b⁻¹ - Y_b A_b Y_bᵀ``: ``S M_b⁻¹ S`` plus, with level 2,
    ``N_b M₂⁻¹ N_bᵀ``, ``N_b = (I - S M_b⁻¹ S K) Λ̃_b``."""
    B1 = torch.linalg.solve_triangular(f.LM, torch.diag(f.scale), upper=False)
    A = B1.T @ B1
    if env is not None:                         # N M₂⁻¹ Nᵀ = P Λ̃_b M₂⁻¹ Λ̃_bᵀ Pᵀ
        P = torch.eye(A.shape[0], dtype=A.dtype, device=A.device) - A @ f.K
        A = A + P @ env.spread(b, env.inverse) @ P.T
    return A


class EnvironmentFactor(Factor):
    r"""Level 2 of an environment term: ``V₂ = R* + C Cᵀ`` with ``C_b = Z_b Λ̃_b``,
    ``Λ̃_b = Λ_b ⊗ I_L`` (``Λ_b`` the loadings of block ``b``'s environments; columns
    ``c L + j``). From the level-1 factors alone: ``Ẑ_b = F_b Z_b``, ``K*_b = ⟨Ẑ_b, Ẑ_b⟩ =
    Z_bᵀ R*_b⁻¹ Z_b`` and ``M₂ = I + Σ_b Λ̃_bᵀ K*_b Λ̃_b`` (``k L`` square), so no ``N x kL``
    matrix is formed; ``J_b = K*_b Λ̃_b L_{M₂}^{-T}`` gives ``Zᵀ V₂⁻¹ Z``."""

    def __init__(self, level1: BlockFactor, envs, Lam: torch.Tensor, L: int):
        self.level1, self.L, self.k = level1, L, Lam.shape[1]
        self.q = self.k * L
        self.Lams = [Lam[e] for e in envs]
        self.offsets = [0] + torch.tensor(level1.whitened).cumsum(0).tolist()
        self.Zhat, M = {}, torch.eye(self.q, dtype=Lam.dtype, device=Lam.device)
        Ks = {}
        for b, f in enumerate(level1.factors):
            if not envs[b]:
                continue
            low = torch.linalg.solve_triangular(f.LM, f.scale[:, None] * f.K, upper=False)
            self.Zhat[b] = torch.cat([f.Zw, low])
            Ks[b] = f.K - low.T @ low
            M += self.sandwich(b, Ks[b])
        self.LM, info = torch.linalg.cholesky_ex(0.5 * (M + M.T))
        if int(info) != 0:
            raise NotPositiveDefiniteError("the level-2 equations are not positive definite")
        self.J = {b: torch.linalg.solve_triangular(self.LM, self.lift(b, K.T, True),
                                                   upper=False).T for b, K in Ks.items()}
        self.rows = level1.rows + self.q
        self.logdet = level1.logdet + 2 * torch.log(self.LM.diagonal()).sum()

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """``M₂⁻¹``."""
        return torch.cholesky_inverse(self.LM)

    def lift(self, b: int, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``Λ̃_b x`` (``x``: ``kL x c``), or ``Λ̃_bᵀ x`` (``x``: ``|E_b| L x c``)."""
        Lam, c = self.Lams[b], x.shape[1]
        if transpose:
            return (Lam.T @ x.reshape(Lam.shape[0], -1)).reshape(self.q, c)
        return (Lam @ x.reshape(self.k, -1)).reshape(Lam.shape[0] * self.L, c)

    def sandwich(self, b: int, K: torch.Tensor) -> torch.Tensor:
        """``Λ̃_bᵀ K Λ̃_b`` (``kL`` square) for ``K`` of size ``|E_b| L``, in ``|E_b|² k L²``."""
        Lam, L = self.Lams[b], self.L
        K4 = K.reshape(Lam.shape[0], L, Lam.shape[0], L)
        return torch.einsum("ec,ejfl,fd->cjdl", Lam, K4, Lam).reshape(self.q, self.q)

    def spread(self, b: int, M: torch.Tensor) -> torch.Tensor:
        """``Λ̃_b M Λ̃_bᵀ`` (``|E_b| L`` square) for ``M`` of size ``kL``."""
        Lam, L = self.Lams[b], self.L
        M4 = M.reshape(self.k, L, self.k, L)
        a = Lam.shape[0]
        return torch.einsum("ec,cjdl,fd->ejfl", Lam, M4, Lam).reshape(a * L, a * L)

    def _block(self, b, W):
        return W[self.offsets[b]:self.offsets[b + 1]]

    def whiten(self, B):
        top = self.level1.whiten(B)
        low = top.new_zeros(self.q, B.shape[1])
        for b, Zhat in self.Zhat.items():
            low += self.lift(b, self.level1.factors[b].inner(Zhat, self._block(b, top)), True)
        return torch.cat([top, torch.linalg.solve_triangular(self.LM, low, upper=False)])

    def unwhiten(self, W):
        top, low = W[:self.level1.rows].clone(), W[self.level1.rows:]
        x = torch.linalg.solve_triangular(self.LM.T, low, upper=True)
        for b, Zhat in self.Zhat.items():
            self._block(b, top).sub_(Zhat @ self.lift(b, x))
        return self.level1.unwhiten(top)

    def inner(self, U, W):
        r = self.level1.rows
        return self.level1.inner(U[:r], W[:r]) - U[r:].T @ W[r:]


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
