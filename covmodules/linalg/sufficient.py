r"""The mixed-model equations on sufficient statistics: crossed terms with ``R = σ² I``.

For the models of :mod:`.mme` with a residual ``σ² I`` (any residual whose diagonal view is
constant), lme4's and MixedModels.jl's formulation: with ``B = [X, y]``, the sums

.. math:: B^T B, \qquad Z^T B, \qquad Z^T Z \ \text{(the blocks of the pattern)}, \qquad n

are formed once in ``O(n Σ_t k_t²)``; after that an evaluation costs nothing in ``n``. Every
vector the likelihood needs lies in the span of ``[B, Z]``, so it is kept as its coefficients
``c = (a; g)``, ``u = B a + Z g``, and

.. math::

    Z^T u = Z^T B\, a + Z^T Z\, g, \qquad u^T u' = a^T B^T B a' + a^T (Z^T B)^T g'
    + g^T Z^T u', \qquad V^{-1} = σ^{-2}(I - Z Λ M^{-1} Λ^T Z^T σ^{-2})

give the whitening ``F c = (c ; Zᵀu ; L_M⁻¹ Λᵀ Zᵀ u / σ²)`` (``Zᵀu`` kept for the inner
products) with ``⟨F c, F c'⟩ = uᵀu'/σ² - (L_M⁻¹ΛᵀZᵀu)ᵀ(L_M⁻¹ΛᵀZᵀu')/σ⁴ = uᵀV⁻¹u'`` and ``log|V| = n log σ² + log|M|``. The residual's
gradient needs only ``tr V⁻¹ = (n - q + tr M⁻¹)/σ²`` and the squared norms of ``P y`` and of
the REML term's columns, the terms' gradients the level sums ``Zᵀ P y``, and the AI matrix's
``dV/dθ P y`` are ``Z (I ⊗ ∂S/∂θ) Zᵀ P y`` (coefficients ``g``) or ``∂σ²/∂θ P y``.

The sums are sums over rows, so data split over processes in any way (crossed designs do not
split by groups) give the exact full-data likelihood after one reduction of the sums:
:class:`~covmodules.crossed.CrossedREML` passes the reductions in.

``y`` is replaced by its residual from the (full-data) OLS fit before the sums are formed, an
exact change of ``y`` within the span of ``X`` that keeps ``yᵀy`` from cancelling digits
when ``y`` is far from zero (a shift of ``y`` moves only ``b̂``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..structures.block_design import block_matmul, block_rmatmul
from .base import Factor, GLSState, Solver, UnsupportedStructure, gls
from .blocked import Pattern
from .mme import MMESolver, _lam, _lam_t, _read

__all__ = ["SufficientSolver", "SufficientFactor", "SufficientState"]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class Sums:
    """``Bᵀ B`` (``(p+1)²``), ``Zᵀ B`` (``q x (p+1)``), the unit ``Zᵀ Z`` blocks of the pattern
    (term 0's diagonal blocks, the pair blocks, the dense rest) and ``n``, over all rows."""

    BtB: torch.Tensor
    ZtB: torch.Tensor
    unit: tuple
    n: int
    numel: int                  # numbers in the one reduction


@dataclass
class SufficientState(GLSState):
    """A :class:`~.base.GLSState` in coefficients (``Xw``, ``rw``: whitened coefficients), with
    ``Py`` on this process's rows and ``coef`` its coefficients ``(a; g)``."""

    coef: torch.Tensor = None

    def solve_x(self) -> torch.Tensor:
        """``V⁻¹ X`` on this process's rows."""
        return self.factor.solver.rows(self.factor.unwhiten(self.Xw))


class SufficientFactor(Factor):
    """``V = σ² I + Z Λ Λᵀ Zᵀ`` acting on coefficients (see the module docstring)."""

    def __init__(self, solver: "SufficientSolver", s2: torch.Tensor, lams, M):
        self.solver, self.s2, self.lams, self.M = solver, s2, lams, M
        self.r = s2.reshape(1)
        self.logdet = solver.sums.n * torch.log(s2) + M.logdet

    def zt(self, C: torch.Tensor) -> torch.Tensor:
        """``Zᵀ u`` for coefficients ``C`` (``(p+1+q) x r``)."""
        P = self.solver.sums.BtB.shape[0]
        return self.solver.sums.ZtB @ C[:P] + self.solver.unit_matmul(C[P:])

    def gram(self, U: torch.Tensor, W: torch.Tensor, ztW: torch.Tensor) -> torch.Tensor:
        """``uᵀ w`` for coefficients ``U``, ``W`` and ``ztW = Zᵀ w`` (:meth:`zt`)."""
        sums = self.solver.sums
        P = sums.BtB.shape[0]
        return U[:P].T @ (sums.BtB @ W[:P] + sums.ZtB.T @ W[P:]) + U[P:].T @ ztW

    def _lam_t(self, x):
        return _blockwise(self.solver.terms, self.lams, x, _lam_t)

    def whiten(self, C):
        """``(c ; Zᵀu ; L_M⁻¹ΛᵀZᵀu/σ²)``: ``Zᵀu`` is kept, so no inner product forms it
        again (all three parts are linear in ``c``)."""
        if C.shape[0] != self.solver.size:
            raise ValueError(
                f"the sufficient-statistics solver works on coefficients in the span of "
                f"[X, y, Z] ({self.solver.size} rows), not on {C.shape[0]} data rows: "
                "products with other vectors of the rows (conditional variances, "
                "Satterthwaite df) need the rows' solver, e.g. solver='mme' in one process")
        z = self.zt(C)
        return torch.cat([C, z, self.M.solve_lower(self._lam_t(z) / self.s2)])

    def unwhiten(self, W):
        size, q = self.solver.size, self.solver.q
        out = W[:size] / self.s2
        P = self.solver.sums.BtB.shape[0]
        out[P:] -= _blockwise(self.solver.terms, self.lams,
                              self.M.solve_upper(W[size + q:]), _lam) / self.s2
        return out

    def inner(self, U, W):
        size, q = self.solver.size, self.solver.q
        return (self.gram(U[:size], W[:size], W[size:size + q]) / self.s2
                - U[size + q:].T @ W[size + q:])


def _blockwise(terms, lams, x, apply):
    """``apply(L_t, x_t)`` on each term's rows of ``x``."""
    parts, start = [], 0
    for t, L in zip(terms, lams):
        parts.append(apply(L, x[start:start + t.m * t.k]))
        start += t.m * t.k
    return torch.cat(parts)


class SufficientSolver(MMESolver):
    """The :mod:`.mme` solver evaluated on sufficient statistics (module docstring).

    Args:
        model: a :class:`~covmodules.MixedModel` of this process's rows: random terms ``I ⊗ S``
            on block designs whose level codes are the same on every process, residual
            ``σ² I``.
        reduce: the sum of a tensor over the processes (default: this process only).
        gather: the rows of a 2-D tensor of every process, concatenated (default: its own).

    Not chosen automatically (it is built with a pass over the data); name it with
    ``solver="sufficient"`` or use :class:`~covmodules.crossed.CrossedREML`.

    Example (the same log-likelihood as the mme solver on the rows)::

        >>> import torch
        >>> from covmodules import DesignMatrix, MixedModel, ScalarMatrix
        >>> from covmodules.reml import REML
        >>> g = torch.Generator().manual_seed(0)
        >>> a, b = torch.randint(0, 6, (40,), generator=g), torch.randint(0, 4, (40,), generator=g)
        >>> model = MixedModel(random={"a": (DesignMatrix(a.tolist()), ScalarMatrix(6)),
        ...                            "b": (DesignMatrix(b.tolist()), ScalarMatrix(4))},
        ...                    residual=ScalarMatrix(40))
        >>> y = torch.randn(40, generator=g, dtype=torch.float64) + a % 2
        >>> sums, rows = REML(model, y, solver="sufficient"), REML(model, y, solver="mme")
        >>> abs(sums.loglik() - rows.loglik()) < 1e-10
        True
    """

    name = "sufficient"
    automatic = False

    def __init__(self, model, reduce=_same, gather=_same):
        Solver.__init__(self, model)
        self.terms, self.residual = _read(model)
        if not all(view.constant for view, _ in self.residual):
            raise UnsupportedStructure("sufficient statistics need a residual σ² I (a constant "
                                       "diagonal)")
        self.reduce, self.n = reduce, model.shape[0]
        sizes = [(t.m, t.k) for t in self.terms]
        codes = torch.stack([t.codes for t in self.terms], 1)
        counts = reduce(torch.tensor([1.0] + [float(m * k) for m, k in sizes]
                                     + [float(m * k) ** 2 for m, k in sizes],
                                     dtype=torch.float64, device=codes.device))
        T = len(sizes)
        if bool((counts[1:T + 1] ** 2 != counts[T + 1:] * counts[0]).any()):
            raise ValueError("the processes' models differ in the levels or effects of their "
                             "random terms")
        every = gather(torch.unique(codes, dim=0))          # the code tuples of all rows
        tuples, index = torch.unique(torch.cat([every, codes]), dim=0, return_inverse=True)
        self.pattern = Pattern(list(tuples.T), sizes)
        # the pair of each of this process's rows in the pattern of all rows
        self.pattern.pair_of_row = [pairs[index[every.shape[0]:]]
                                    for pairs in self.pattern.pair_of_row]
        self.q = sum(m * k for m, k in sizes)
        self._unit, self._data, self.sums = None, None, None

    @property
    def cost(self) -> float:
        return super().cost + self.OVERHEAD * len(self.terms)

    @property
    def size(self) -> int:
        """Coefficients of a vector: ``p + 1 + q``."""
        return self.sums.BtB.shape[0] + self.q

    def sum_data(self, y: torch.Tensor, X: torch.Tensor) -> None:
        """The sums of ``[X, y - X b_OLS]`` over all processes (once per data set)."""
        key = [(t, t._version) for t in (y, X)]       # kept: no other tensor reuses them
        if self._data is not None and all(a is b and u == v for (a, u), (b, v)
                                          in zip(self._data, key)):
            return
        p = X.shape[1]
        first = self.reduce(torch.cat([(X.T @ X).reshape(-1), X.T @ y]))
        beta0 = torch.linalg.solve(first[:p * p].reshape(p, p), first[p * p:])
        B = torch.cat([X, (y - X @ beta0)[:, None]], 1)
        Kd, Kb, Kc = self._sums(torch.ones_like(y))
        ZtB = torch.cat([block_rmatmul(t.codes, t.values, t.m, B) for t in self.terms])
        parts = [B.T @ B, ZtB, Kd, *Kb, Kc, B.new_tensor(float(self.n))]
        flat = self.reduce(torch.cat([part.reshape(-1) for part in parts]))
        out, start = [], 0
        for part in parts:
            out.append(flat[start:start + part.numel()].reshape(part.shape))
            start += part.numel()
        BtB, ZtB, Kd, *Kb, Kc, n = out
        self.sums = Sums(BtB, ZtB, (Kd, Kb, Kc), int(n), flat.numel())
        self._unit, self._data, self._rows = (Kd, Kb, Kc), key, B
        self._beta0 = beta0

    def unit_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``Zᵀ Z x`` for ``x`` of shape ``(q, r)`` from the blocks of the pattern."""
        Kd, Kb, Kc = self.sums.unit
        t0, rest, p = self.terms[0], self.terms[1:], self.pattern
        q0, r = t0.m * t0.k, x.shape[1]
        x0, xs = x[:q0].reshape(t0.m, t0.k, r), x[q0:]
        top = Kd @ x0
        low = Kc @ xs
        for t, off, (j, l), b in zip(rest, p.offsets, p.pairs, Kb):
            xt = xs[off:off + t.m * t.k].reshape(t.m, t.k, r)
            top.index_add_(0, j, b @ xt[l])
            low[off:off + t.m * t.k] += x.new_zeros(t.m, t.k, r).index_add_(
                0, l, b.transpose(1, 2) @ x0[j]).reshape(-1, r)
        return torch.cat([top.reshape(q0, r), low])

    def coefficients(self, y: torch.Tensor, X: torch.Tensor):
        """The coefficients of ``y`` and of the columns of ``X``."""
        p = X.shape[1]
        C = X.new_zeros(self.size, p + 1)
        C[:p, :p] = torch.eye(p, dtype=X.dtype, device=X.device)
        C[:p, p] = self._beta0
        C[p, p] = 1.0
        return C[:, p], C[:, :p]

    def columns(self, B: torch.Tensor) -> torch.Tensor:
        """The coefficients of the fitted ``X`` (``B`` must be it)."""
        if B.shape != self._rows[:, :-1].shape:
            raise ValueError(f"expected the fitted X of shape {tuple(self._rows[:, :-1].shape)}, "
                             f"got {tuple(B.shape)}")
        return self.coefficients(B[:, 0], B)[1]

    def term_rows(self, name: str) -> slice:
        """The rows of random term ``name`` in ``Zᵀ u`` (and in ``g``)."""
        start = 0
        for t in self.terms:
            if t.name == name:
                return slice(start, start + t.m * t.k)
            start += t.m * t.k
        raise KeyError(f"no random term {name!r}")

    def term_columns(self, name: str, W: torch.Tensor) -> torch.Tensor:
        """The coefficients of ``Z_t W``: ``W`` in term ``name``'s block of ``g``."""
        out = W.new_zeros(self.size, W.shape[1])
        rows, P = self.term_rows(name), self.sums.BtB.shape[0]
        out[P + rows.start:P + rows.stop] = W
        return out

    def rows(self, C: torch.Tensor) -> torch.Tensor:
        """``u = B a + Z g`` on this process's rows, for coefficients ``C`` (``(size, r)``)."""
        P = self.sums.BtB.shape[0]
        out, start = self._rows @ C[:P], P
        for t in self.terms:
            out = out + block_matmul(t.codes, t.values, t.m, C[start:start + t.m * t.k])
            start += t.m * t.k
        return out

    def factorize(self, nat):
        r = self._r(nat)
        lams, M = self._factor_m(nat, r)
        return SufficientFactor(self, r[0], lams, M)

    def state(self, free, y, X, method):
        with torch.no_grad():
            nat = self.model.build_params(free)
            y, X = y.to(nat.dtype), X.to(nat.dtype)
            self.sum_data(y, X)
            yc, Xc = self.coefficients(y, X)
            s = gls(self.factorize(nat), yc, Xc, method, n=self.sums.n)
            fields = {name: getattr(s, name) for name in GLSState.__dataclass_fields__}
            fields["py"] = self.rows(s.Py[:, None])[:, 0]
            return SufficientState(**fields, coef=s.Py)

    def natural_gradient(self, nat, state: SufficientState):
        f, q = state.factor, self.q
        Sd, Sb, Sinv = f.M.selected_inverse()
        H = self._level_sums(1 / f.r, f.lams, Sd, Sb, Sinv)       # K = Zᵀ Z / σ²
        Py = state.coef[:, None]
        zp = f.zt(Py)
        trace = (self.sums.n - q + Sd.diagonal(dim1=1, dim2=2).sum()
                 + Sinv.diagonal().sum()) / f.s2 - f.gram(Py, Py, zp)[0, 0]
        zw = None
        if state.method == "reml":
            W = f.unwhiten(state.low_rank_x())
            zw = f.zt(W)
            trace = trace - f.gram(W, W, zw).diagonal().sum()
        out = self._term_gradients(nat, f.lams, H, [z[:, :, 0] for z in self._levels(zp)],
                                   [None] * len(H) if zw is None else self._levels(zw))
        for view, rows in self.residual:
            out[rows] = view.trace_vjp(nat[rows], 0.5 * trace, self.n)
        return out

    def _levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per term, the rows of ``x`` (``(q, r)``) as ``(m, k, r)`` level blocks."""
        out, start = [], 0
        for t in self.terms:
            out.append(x[start:start + t.m * t.k].reshape(t.m, t.k, -1))
            start += t.m * t.k
        return out

    def average_information(self, free, state: SufficientState) -> torch.Tensor:
        """``½ Uᵀ P U`` with ``U`` in coefficients: ``Z (I ⊗ ∂S/∂θ) Zᵀ P y`` for a term's
        parameters, ``∂σ²/∂θ P y`` for the residual's."""
        with torch.no_grad():
            nat = self.model.build_params(free)
            f, P = state.factor, self.sums.BtB.shape[0]
            U = nat.new_zeros(nat.shape[0], self.size)
            start = P
            for t, zp in zip(self.terms, self._levels(f.zt(state.coef[:, None]))):
                rows = slice(t.offset, t.offset + t.num_params)
                dS = t.block._dv_matmul(nat[rows], zp[:, :, 0].T)        # (K, k, m)
                U[rows, start:start + t.m * t.k] = dS.transpose(1, 2).reshape(dS.shape[0], -1)
                start += t.m * t.k
            for view, rows in self.residual:
                slope = view.vjp(nat[rows], nat.new_full((self.n,), 1 / self.n))
                U[rows] = slope[:, None] * state.coef
            U = self.model.to_free(U, free)
            return 0.5 * state.project(U.T)
