r"""The Kronecker solver: ``V = A_1 ⊗ ... ⊗ A_d (+ s I)`` through the factors' eigendecompositions.

With ``A_i = Q_i Λ_i Q_iᵀ`` (``n_i x n_i``) and ``Q = Q_1 ⊗ ... ⊗ Q_d``,

.. math:: V = Q\,D\,Q^T, \qquad D_{a_1 \dots a_d} = \lambda^{(1)}_{a_1} \cdots \lambda^{(d)}_{a_d} + s,

so ``log|V| = Σ log D`` and the whitening ``F = D^{-1/2} Qᵀ`` maps a column of length
``N = Π n_i``, read row-major as an ``n_1 x ... x n_d`` array, to ``D^{-1/2}`` times its mode
products with every ``Q_iᵀ``: ``Σ n_i³`` for the eigendecompositions and ``N Σ n_i`` per
column as one matrix product per factor (:func:`kron_matmul`), never an ``N x N`` matrix.
The solver reads the model's :class:`~covmodules.capabilities.KroneckerView`
(:meth:`~covmodules.CovarianceModule.kronecker_view`): a ``KroneckerProduct`` of square
factors (nested products give more than two factors, ``A ⊗ (B ⊗ C)``), or a ``Sum`` of one
and constant diagonals (``ScalarMatrix``, ``IdentityMatrix``: the nugget ``s I``) in any order,
optionally as the residual of a ``MixedModel`` without random terms.

**Reuse across evaluations.** A factor that changed only by a positive scale (a variance
moved, its correlations not) keeps its eigenvectors, and while every factor keeps its
eigenvectors the rotated data ``Qᵀ [X y]`` are reused: the start-value search and the step
halvings of AI-REML, which move variances alone, then cost ``O(N p)`` per evaluation.

**Gradient.** In the eigenbasis the cotangent ``½(P - Py Pyᵀ)`` is ``½(D⁻¹ - W Wᵀ)``, the
columns of ``W`` being ``u = D^{-1/2} r_w`` (``Qᵀ P y``) and ``T = D^{-1/2} X_w L_A^{-T}``
(``Qᵀ V⁻¹ X L_A^{-T}``, absent for ML). Contracted with every factor but ``i``, as
``KroneckerProduct`` hands its operands, with ``Λ_{-i}`` the product of the other factors'
eigenvalues and ``W_c^{(i)}`` the mode-``i`` unfolding (``n_i x N/n_i``) of column ``c``:

.. math::

    \bar A_i = Q_i\,\tfrac12\Big[\operatorname{diag}_a\Big(\sum_{\text{other axes}}
               \frac{\Lambda_{-i}}{D}\Big) - \sum_c W_c^{(i)} \Lambda_{-i} W_c^{(i)T}\Big] Q_i^T,
    \qquad \bar s = \tfrac12\Big[\sum D^{-1} - \lVert W\rVert^2\Big]

(:meth:`KroneckerFactor.cotangents`, ``N n_i`` per column); the view maps the ``Ā_i``
(through each factor's own ``_vjp``) and ``s̄ = tr Ḡ`` to the parameters. Eigenvectors are
never differentiated, so repeated eigenvalues (identity, compound-symmetric factors) are
harmless.

**AI matrix.** ``Qᵀ ∂V/∂θ_k Q = Λ_1 ⊗ .. ⊗ M_k ⊗ .. ⊗ Λ_d`` with ``M_k = Q_iᵀ ∂A_i/∂θ_k Q_i``
(``n_i³`` from the factor's Jacobian; ``c Λ_i`` without a product when ``∂A_i/∂θ_k = c A_i``),
so ``U_k = Qᵀ ∂V/∂θ_k P y`` is one mode product with ``Qᵀ P y = D^{-1/2} r_w``
(:func:`mode_products`, ``N n_i``) and ``AI = ½ Uᵀ P U`` never leaves the eigenbasis. The
gradient at the same point then reads ``⟨Ḡ, ∂V/∂θ_k⟩ = ⟨Q_iᵀ Ā_i Q_i, M_k⟩ + s̄ ∂s/∂θ_k``
(:meth:`KroneckerSolver.gradient`). A factor module may bring its own eigendecomposition
(``_eigh``, e.g. AR(1)'s from its tridiagonal inverse).

**Data layout.** Row ``i n + j`` of ``y`` and ``X`` is grid cell ``(i, j)``: row-major, the
first factor indexes grid rows. :func:`complete_grid` puts plot data into that order and
**completes the grid** where plots are missing: each missing cell gets ``y = 0`` and its own
indicator column in ``X`` (named ``missing[row,col]``). Error contrasts of the completed data
are exactly those of the observed data, and ``|X_fᵀX_f| = |X_oᵀX_o|``, so the REML
log-likelihood (R's scale), the BLUE of the original columns and its covariance equal those
of the observed data; ``P y`` is zero at the missing cells and the indicator estimates are the
GLS predictions of the missing plots.

Example::

    >>> import torch
    >>> from covmodules import AR1Matrix, KroneckerProduct, ScalarMatrix, Sum
    >>> from covmodules.reml import REML
    >>> V = Sum(field=KroneckerProduct(row=AR1Matrix(10), col=AR1Matrix(8)),
    ...         nugget=ScalarMatrix(80))
    >>> V.fix("field/col/sigma^2")           # only the product of the two scales is identified
    >>> y = torch.randn(80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> REML(V, y).solver.name
    'kronecker'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .base import (Factor, GLSState, NotPositiveDefiniteError, Solver,
                   UnsupportedStructure, gls)

__all__ = ["KroneckerSolver", "KroneckerFactor", "EigenCache", "kron_matmul", "mode_products",
           "GridData", "complete_grid"]


def kron_matmul(Qs, B: torch.Tensor) -> torch.Tensor:
    """``(Q_1 ⊗ ... ⊗ Q_d) B`` for square ``Q_i`` and ``B`` of shape ``(N, k)``: one matrix
    product per factor on the ``(k, n_1, ..., n_d)`` array, ``2 N k Σ n_i`` flops.

    >>> Qa, Qb = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    >>> B = torch.randn(6, 4, dtype=torch.float64)
    >>> torch.allclose(kron_matmul([Qa, Qb], B), torch.kron(Qa, Qb) @ B)
    True
    """
    sizes, k = [Q.shape[0] for Q in Qs], B.shape[1]
    N = B.shape[0]
    T = B.T.contiguous()                                          # (k, n_1 ... n_d)
    for i, Q in enumerate(Qs):
        pre, post = k * math.prod(sizes[:i]), math.prod(sizes[i + 1:])
        if post == 1:                                             # last axis: one GEMM
            T = T.reshape(pre, sizes[i]) @ Q.T
        else:                                                     # batched GEMMs
            T = torch.matmul(Q, T.reshape(pre, sizes[i], post))
    return T.reshape(k, N).T


def mode_products(M: torch.Tensor, T: torch.Tensor, i: int) -> torch.Tensor:
    """``[M_j ×_i T]_j``: each of the ``(k, n_i, n_i)`` matrices ``M`` applied along axis ``i``
    of the grid array ``T`` (``n_1 x ... x n_d``), flattened to ``(k, N)``; ``2 k N n_i``
    flops.

    >>> M, T = torch.randn(4, 2, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    >>> torch.allclose(mode_products(M, T, 1)[1], torch.kron(torch.eye(3), M[1]) @ T.reshape(-1))
    True
    """
    k, n_i, N = M.shape[0], T.shape[i], T.numel()
    pre, post = math.prod(T.shape[:i]), math.prod(T.shape[i + 1:])
    if post == 1:                                                 # last axis: one GEMM
        out = T.reshape(pre, n_i) @ M.reshape(k * n_i, n_i).T
        return out.reshape(pre, k, n_i).transpose(0, 1).reshape(k, N)
    return torch.matmul(M[:, None], T.reshape(pre, n_i, post)).reshape(k, N)


class EigenCache:
    """The last eigendecomposition of each factor, and data rotated by those eigenvectors.

    :meth:`eigh` returns the cached eigenvectors when a factor is a positive multiple of the
    cached matrix (to rounding), so the rotations of the data (:meth:`rotated`) stay valid.
    """

    def __init__(self):
        self.eig, self.rotations, self.basis = {}, [], None

    def eigh(self, i: int, M: torch.Tensor, decompose=torch.linalg.eigh):
        """``(λ, Q)`` of factor ``i``'s value ``M``: ``decompose(M)`` unless cached."""
        hit = self.eig.get(i)
        if hit is not None and hit[0].shape == M.shape:
            M0, lam, Q = hit
            c = (M * M0).sum() / (M0 * M0).sum()
            level = 16 * torch.finfo(M.dtype).eps * float(M.abs().max())
            if float(c) > 0 and float((M - c * M0).abs().max()) <= level:
                return lam * c, Q
        lam, Q = decompose(M)
        self.eig[i] = (M, lam, Q)
        return lam, Q

    def rotated(self, Qs, B: torch.Tensor) -> torch.Tensor:
        """``Qᵀ B``, remembered while the eigenvectors ``Qs`` stay (``B`` is kept with it, so
        its storage is not reused by another tensor meanwhile)."""
        if self.basis is None or len(self.basis) != len(Qs) \
                or any(a is not b for a, b in zip(self.basis, Qs)):
            self.basis, self.rotations = list(Qs), []
        key = _storage_key(B)
        for known, _, value in self.rotations:
            if known == key:
                return value
        value = kron_matmul([Q.T for Q in Qs], B)
        self.rotations.append((key, B, value))
        return value


def _storage_key(B: torch.Tensor):
    """Identity of a tensor's values: storage, layout and version (``y`` and ``y[:, None]``
    share one)."""
    return (B.data_ptr(), B.shape[0], B.numel(), B.stride()[0], B._version, B.dtype, B.device)


class KroneckerFactor(Factor):
    """``V = Q D Qᵀ``, ``Q = Q_1 ⊗ ... ⊗ Q_d``, ``D = λ_1 ∘ ... ∘ λ_d + s``; ``F = D^{-1/2} Qᵀ``.

    ``factors``: the square ``A_i``; ``cache``: an :class:`EigenCache` to reuse, and ``data``
    the tensors (``y``, ``X``) whose rotations it remembers; ``eigh``: ``(i, A_i) → (λ, Q)``
    (by default ``torch.linalg.eigh``).
    """

    def __init__(self, factors, s, cache: EigenCache | None = None, data=(), eigh=None):
        if not all(bool(torch.isfinite(A).all()) for A in factors):
            raise NotPositiveDefiniteError("a Kronecker factor is not finite at these "
                                           "parameters; try other start values")
        self.cache, self.data = cache, {_storage_key(t) for t in data}
        self.derivatives = None        # KroneckerSolver.eigen_derivatives at one point
        eigh = eigh or (lambda i, A: torch.linalg.eigh(A))
        pairs = [cache.eigh(i, A, lambda M, i=i: eigh(i, M)) if cache is not None else eigh(i, A)
                 for i, A in enumerate(factors)]
        self.lams, self.Qs = [p[0] for p in pairs], [p[1] for p in pairs]
        self.factors = factors
        self.sizes = tuple(A.shape[0] for A in factors)
        self.D = self.product() + s
        if not bool((self.D > 0).all()) or not bool(torch.isfinite(self.D).all()):
            raise NotPositiveDefiniteError(
                f"V = A_1 ⊗ ... ⊗ A_d + s I is not positive definite (smallest eigenvalue "
                f"{float(self.D.min()):.3g}); try other start values")
        self.root = self.D.sqrt().reshape(-1, 1)
        self.rows = self.D.numel()
        self.logdet = torch.log(self.D).sum()

    def product(self, skip: int | None = None) -> torch.Tensor:
        """``λ_1 ∘ ... ∘ λ_d`` as an ``n_1 x ... x n_d`` array (factor ``skip`` left out: ones)."""
        d, out = len(self.lams), None
        for i, lam in enumerate(self.lams):
            if i == skip:
                continue
            shaped = lam.reshape([-1 if j == i else 1 for j in range(d)])
            out = shaped if out is None else out * shaped
        return out.expand(self.sizes)

    def whiten(self, B):
        if self.cache is not None and _storage_key(B) in self.data:
            return self.cache.rotated(self.Qs, B) / self.root
        return kron_matmul([Q.T for Q in self.Qs], B) / self.root

    def unwhiten(self, W):
        return kron_matmul(self.Qs, W / self.root)

    def rotate(self, B: torch.Tensor) -> torch.Tensor:
        """``Qᵀ B``: columns in the eigenbasis (the input of :meth:`cotangents`)."""
        return kron_matmul([Q.T for Q in self.Qs], B)

    def cotangents(self, W: torch.Tensor, eigenbasis: bool = False):
        """``([Ā_1, ..., Ā_d], t)`` of ``Ḡ = ½ Q (D⁻¹ - W Wᵀ) Qᵀ`` for eigenbasis columns ``W``
        ``(N, c)`` (module docstring): ``Ā_i`` in the original basis (``Q_iᵀ Ā_i Q_i`` with
        ``eigenbasis``), ``t = tr Ḡ``."""
        d, c = len(self.sizes), W.shape[1]
        Wt = W.T.reshape(c, *self.sizes)
        Dinv = 1 / self.D
        grads = []
        for i, (Q, n_i) in enumerate(zip(self.Qs, self.sizes)):
            other = self.product(skip=i)
            axes = tuple(j for j in range(d) if j != i)
            diag = (Dinv * other).sum(axes) if axes else Dinv
            U = Wt.movedim(i + 1, 0)                             # (n_i, c, other axes)
            weighted = (U * other.movedim(i, 0)[:, None]).reshape(n_i, -1)
            G = torch.diag(diag) - weighted @ U.reshape(n_i, -1).T
            grads.append(0.5 * G if eigenbasis else 0.5 * (Q @ G @ Q.T))
        return grads, 0.5 * (Dinv.sum() - (W * W).sum())


class KroneckerSolver(Solver):
    """``A_1 ⊗ ... ⊗ A_d (+ σ² I)``: eigendecompositions of the factors (module docstring)."""

    name = "kronecker"

    def __init__(self, model):
        super().__init__(model)
        self.view = model.kronecker_view()
        if self.view is None:
            raise UnsupportedStructure("not a Kronecker product of square factors (plus "
                                       "constant diagonals σ² I), nor a MixedModel without "
                                       "random terms whose residual is one")
        self.cache = EigenCache()

    @property
    def cost(self) -> float:
        N = math.prod(self.view.sizes)
        return sum(n ** 3 for n in self.view.sizes) + 8 * N * sum(self.view.sizes)

    def factorize(self, nat, data=()):
        factors, s = self.view.values(nat)
        return KroneckerFactor(factors, s, self.cache, data,
                               lambda i, A: self.view.eigh(nat, i, A))

    def state(self, free, y, X, method) -> GLSState:
        """:meth:`Solver.state` with the rotations of ``y`` and ``X`` remembered."""
        with torch.no_grad():
            nat = self.model.build_params(free)
            y, X = y.to(nat.dtype), X.to(nat.dtype)
            return gls(self.factorize(nat, (y, X)), y, X, method)

    def eigen_derivatives(self, nat, factor: KroneckerFactor):
        """``([(rows, M_i, scaled, c_i)], ds)``: ``M_i[j] = Q_iᵀ ∂A_i/∂θ_k Q_i`` for the free
        parameters ``k = rows[j]`` of factor ``i`` (``n_i³`` each), except those that only scale
        it, ``∂A_i/∂θ_k = c A_i`` (a variance): ``k = scaled[j]``, ``Q_iᵀ ∂A_i/∂θ_k Q_i =
        c_i[j] Λ_i``; ``ds = [∂s/∂θ_k]_k`` over all. Remembered on ``factor`` for the
        gradient and AI matrix at one point."""
        memo = factor.derivatives
        if memo is not None and torch.equal(memo[0], nat):
            return memo[1], memo[2]
        free = torch.zeros(len(nat), dtype=torch.bool, device=nat.device)
        free[self.model._free_index_tensor(nat.device)] = True
        parts = []
        for i, (Q, A) in enumerate(zip(factor.Qs, factor.factors)):
            start, J = self.view.jacobian(nat, i)                        # ∂A_i/∂θ
            rows = torch.arange(start, start + len(J), device=nat.device)
            J, rows = J[free[rows]], rows[free[rows]]
            c = (J * A).sum((1, 2)) / (A * A).sum().clamp(min=torch.finfo(A.dtype).tiny)
            scale = (J - c[:, None, None] * A).abs().amax((1, 2)) <= 1e-10 * J.abs().amax((1, 2))
            M = torch.matmul(Q.T, torch.matmul(J[~scale], Q))
            parts.append((rows[~scale], M, rows[scale], c[scale]))
        zeros = [torch.zeros(n, n, dtype=nat.dtype, device=nat.device) for n in factor.sizes]
        ds = self.view.vjp(nat, zeros, torch.ones((), dtype=nat.dtype, device=nat.device))
        factor.derivatives = (nat, parts, ds)
        return parts, ds

    def average_information(self, free, state: GLSState) -> torch.Tensor:
        """``½ Uᵀ P U`` in the eigenbasis: ``Qᵀ ∂V/∂θ_k Q`` is ``Λ_1 ⊗ .. Q_iᵀ ∂A_i Q_i .. ⊗ Λ_d``
        (``∂s/∂θ_k I`` for the nugget), applied to ``Qᵀ P y``: ``n_i³ + N n_i`` per
        parameter of factor ``i``, no pass of ``Q`` over the data."""
        with torch.no_grad():
            nat, f = self.model.build_params(free), state.factor
            parts, ds = self.eigen_derivatives(nat, f)
            p = (state.rw / f.root[:, 0]).reshape(f.sizes)              # Qᵀ P y on the grid
            columns, whole = {}, (f.product() * p).reshape(-1)          # k: Qᵀ ∂V/∂θ_k P y
            for i, (rows, M, scaled, c) in enumerate(parts):
                columns.update(zip(rows.tolist(), mode_products(M, p * f.product(skip=i), i)))
                columns.update((k, ck * whole) for k, ck in zip(scaled.tolist(), c))
            p = p.reshape(-1)
            U = [(columns[k] + ds[k] * p if k in columns else ds[k] * p) * d
                 for k, d in zip(self.model._free_index_tensor(p.device).tolist(),
                                 self.model.trans_grad(free))]
            if not U:
                return p.new_zeros(0, 0)
            return 0.5 * state.project_whitened(torch.stack(U, 1) / f.root)

    def gradient(self, free, state: GLSState) -> torch.Tensor:
        """:meth:`Solver.gradient`; after :meth:`average_information` at the same point, from
        its eigenbasis derivatives: ``⟨Ḡ, ∂V/∂θ_k⟩ = ⟨G_i, Q_iᵀ ∂A_i/∂θ_k Q_i⟩ + t ∂s/∂θ_k``
        with ``G_i`` the eigenbasis cotangents, no rotation back nor the factors' ``_vjp``."""
        with torch.no_grad():
            free = None if free is None else free.detach()
            nat, f = self.model.build_params(free), state.factor
            if f.derivatives is None or not torch.equal(f.derivatives[0], nat):
                return super().gradient(free, state)
            parts, ds = self.eigen_derivatives(nat, f)
            grads, trace = f.cotangents(self._columns(state), eigenbasis=True)
            g = trace * ds
            for G, lam, (rows, M, scaled, c) in zip(grads, f.lams, parts):
                g[rows] += (M * G).sum((1, 2))
                g[scaled] += c * (G.diagonal() * lam).sum()
            return self.model.to_free(g, free)

    def natural_gradient(self, nat, state: GLSState):
        grads, trace = state.factor.cotangents(self._columns(state))
        return self.view.vjp(nat, grads, trace)

    @staticmethod
    def _columns(state: GLSState) -> torch.Tensor:
        """The eigenbasis columns ``W`` of the cotangent ``½(D⁻¹ - W Wᵀ)`` (module docstring)."""
        f = state.factor
        W = state.rw[:, None] / f.root
        if state.method == "reml":
            W = torch.cat([W, state.low_rank_x() / f.root], 1)
        return W


@dataclass(frozen=True)
class GridData:
    """Plot data on a completed ``m x n`` grid in row-major order (see :func:`complete_grid`).

    ``y`` and ``X`` have ``m n`` rows; ``cells[i]`` is the grid row of data row ``i``;
    ``missing`` lists the grid rows completed with ``y = 0`` and an indicator column.
    """

    y: torch.Tensor
    X: torch.Tensor
    x_names: list[str]
    cells: torch.Tensor
    missing: torch.Tensor
    shape: tuple[int, int]


def complete_grid(row, col, y, X=None, x_names=None, shape=None) -> GridData:
    """Put plot data in grid order (row-major) and complete missing plots.

    ``row``, ``col``: integer coordinates of each plot (any origin; the grid starts at their
    minima); ``shape``: ``(m, n)``, by default the coordinates' extents. Each missing cell gets
    ``y = 0``, zeros in ``X`` and its own indicator column ``missing[row,col]``; the REML
    fit of the completed data equals that of the observed plots (module docstring).

    Example::

        >>> import torch
        >>> g = complete_grid([1, 1, 2], [1, 2, 2], torch.tensor([1.0, 2.0, 3.0]))
        >>> g.y.tolist(), g.x_names, g.shape
        ([1.0, 2.0, 0.0, 3.0], ['(Intercept)', 'missing[2,1]'], (2, 2))
    """
    r, c = (np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v) for v in (row, col))
    if r.ndim != 1 or r.shape != c.shape or not (np.issubdtype(r.dtype, np.integer)
                                                  and np.issubdtype(c.dtype, np.integer)):
        raise ValueError("row and col must be 1-D integer coordinates of equal length")
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if y.shape != (len(r),):
        raise ValueError(f"y must have one value per plot ({len(r)}), got {tuple(y.shape)}")
    if X is None:
        X = torch.ones(len(r), 1, dtype=y.dtype, device=y.device)
        x_names = x_names or ["(Intercept)"]
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X), dtype=y.dtype)
    if X.dim() != 2 or X.shape[0] != len(r):
        raise ValueError(f"X must have one row per plot ({len(r)}), got {tuple(X.shape)}")
    names = list(x_names) if x_names is not None else [f"x{j}" for j in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise ValueError(f"x_names must name the {X.shape[1]} columns of X, got {len(names)}")
    r0, c0 = int(r.min()), int(c.min())
    m, n = shape if shape is not None else (int(r.max()) - r0 + 1, int(c.max()) - c0 + 1)
    i, j = r - r0, c - c0
    if (i >= m).any() or (j >= n).any():
        raise ValueError(f"coordinates fall outside the {m} x {n} grid")
    cells = torch.as_tensor(i * n + j, dtype=torch.long)
    if torch.unique(cells).numel() != len(cells):
        raise ValueError("two plots share a grid cell")
    observed = torch.zeros(m * n, dtype=torch.bool)
    observed[cells] = True
    missing = (~observed).nonzero()[:, 0]
    y_full = y.new_zeros(m * n)
    y_full[cells] = y
    X_full = X.new_zeros(m * n, X.shape[1] + len(missing))
    X_full[cells, :X.shape[1]] = X
    X_full[missing, X.shape[1] + torch.arange(len(missing))] = 1
    names += [f"missing[{int(k) // n + r0},{int(k) % n + c0}]" for k in missing]
    return GridData(y_full, X_full, names, cells, missing, (m, n))
