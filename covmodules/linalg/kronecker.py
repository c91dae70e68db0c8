r"""The Kronecker solver: ``V = A ⊗ B (+ s I)`` through the eigendecompositions of the factors.

With ``A = Qa Λa Qaᵀ`` (``m x m``), ``B = Qb Λb Qbᵀ`` (``n x n``) and ``Q = Qa ⊗ Qb``,

.. math:: V = Q\,D\,Q^T, \qquad D_{ab} = \lambda^A_a \lambda^B_b + s,

so ``log|V| = Σ log D_ab`` and the whitening ``F = D^{-1/2} Qᵀ`` maps a column ``v`` of length
``N = mn``, read row-major as the ``m x n`` matrix ``v_mat``, to ``D^{-1/2} ∘ (Qaᵀ v_mat Qb)``:
``m³ + n³`` for the eigendecompositions and ``mn(m + n)`` per column, never an ``N x N``
matrix. The solver reads the model's :class:`~covmodules.capabilities.KroneckerView`
(:meth:`~covmodules.CovarianceModule.kronecker_view`): a ``KroneckerProduct(A, B)`` of square
factors, or a ``Sum`` of one and constant diagonals (``ScalarMatrix``, ``IdentityMatrix``:
the nugget ``s I``) in any order, optionally as the residual of a ``MixedModel`` without
random terms.

**Gradient.** In the eigenbasis the cotangent ``½(P - Py Pyᵀ)`` is
``½(D⁻¹ - T Tᵀ - u uᵀ)`` with ``u = D^{-1/2} r_w`` (``P y``, an ``m x n`` matrix ``U``) and
``T = D^{-1/2} X_w L_A^{-T}`` (``V⁻¹ X L_A^{-T}``; columns ``T_k``, absent for ML).
Contracting with ``B`` over the ``n`` axes, as ``KroneckerProduct`` hands its first operand,
and with ``A`` over the ``m`` axes for the second:

.. math::

    \bar A &= Q_a\,\tfrac12\Big[\operatorname{diag}_a\Big(\sum_b \frac{\lambda^B_b}{D_{ab}}\Big)
              - \sum_k T_k \Lambda_B T_k^T - U \Lambda_B U^T\Big] Q_a^T, \\
    \bar B &= Q_b\,\tfrac12\Big[\operatorname{diag}_b\Big(\sum_a \frac{\lambda^A_a}{D_{ab}}\Big)
              - \sum_k T_k^T \Lambda_A T_k - U^T \Lambda_A U\Big] Q_b^T, \qquad
    \bar s = \tfrac12\Big[\sum_{ab} D_{ab}^{-1} - \lVert T\rVert^2 - \lVert U\rVert^2\Big];

the view maps ``Ā``, ``B̄`` (through each factor's own ``_vjp``) and ``s̄ = tr Ḡ`` to the
parameters. Eigenvectors are never differentiated, so repeated eigenvalues (identity,
compound-symmetric factors) are harmless.

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

from dataclasses import dataclass

import numpy as np
import torch

from .base import (Factor, GLSState, NotPositiveDefiniteError, Solver,
                   UnsupportedStructure)

__all__ = ["KroneckerSolver", "KroneckerFactor", "GridData", "complete_grid"]


def kron_matmul(Qa: torch.Tensor, Qb: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(Qa ⊗ Qb) B`` for ``B`` of shape ``(mn, k)`` in ``mn(m + n) k``."""
    m, n, k = Qa.shape[1], Qb.shape[1], B.shape[1]
    C = (Qa @ B.reshape(m, n * k)).reshape(Qa.shape[0], n, k)
    return torch.matmul(Qb, C).reshape(Qa.shape[0] * Qb.shape[0], k)


class KroneckerFactor(Factor):
    """``V = (Qa ⊗ Qb) D (Qa ⊗ Qb)ᵀ`` with ``D = λa λbᵀ + s``; ``F = D^{-1/2} (Qa ⊗ Qb)ᵀ``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, s):
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise NotPositiveDefiniteError("a Kronecker factor is not finite at these "
                                           "parameters; try other start values")
        self.la, self.Qa = torch.linalg.eigh(A)
        self.lb, self.Qb = torch.linalg.eigh(B)
        self.D = self.la[:, None] * self.lb[None, :] + s
        if not bool((self.D > 0).all()) or not bool(torch.isfinite(self.D).all()):
            raise NotPositiveDefiniteError(
                f"V = A ⊗ B + s I is not positive definite (smallest eigenvalue "
                f"{float(self.D.min()):.3g}); try other start values")
        self.root = self.D.sqrt().reshape(-1, 1)
        self.logdet = torch.log(self.D).sum()

    def whiten(self, B):
        return kron_matmul(self.Qa.T, self.Qb.T, B) / self.root

    def unwhiten(self, W):
        return kron_matmul(self.Qa, self.Qb, W / self.root)


class KroneckerSolver(Solver):
    """``A ⊗ B (+ σ² I)``: eigendecompositions of the factors (see the module docstring)."""

    name = "kronecker"

    def __init__(self, model):
        super().__init__(model)
        self.view = model.kronecker_view()
        if self.view is None:
            raise UnsupportedStructure("not a Kronecker product A ⊗ B of square factors (plus "
                                       "constant diagonals σ² I), nor a MixedModel without "
                                       "random terms whose residual is one")

    @property
    def cost(self) -> float:
        m, n = self.view.sizes
        return m ** 3 + n ** 3 + 8 * m * n * (m + n)

    def factorize(self, nat):
        return KroneckerFactor(*self.view.values(nat))

    def natural_gradient(self, nat, state: GLSState):
        f = state.factor
        (m, n), la, lb = f.D.shape, f.la, f.lb
        U = (state.rw[:, None] / f.root).reshape(m, n)
        Ga = torch.diag((lb / f.D).sum(1)) - (U * lb) @ U.T
        Gb = torch.diag((la[:, None] / f.D).sum(0)) - U.T @ (la[:, None] * U)
        gs = (1 / f.D).sum() - (U * U).sum()
        if state.method == "reml":
            T = (state.low_rank_x() / f.root).reshape(m, n, -1)
            p = T.shape[2]
            Ga -= (T * lb[None, :, None]).reshape(m, n * p) @ T.reshape(m, n * p).T
            Tt = T.permute(1, 0, 2).reshape(n, m * p)
            Gb -= (T.permute(1, 0, 2) * la[None, :, None]).reshape(n, m * p) @ Tt.T
            gs -= (T * T).sum()
        Ga = 0.5 * (f.Qa @ Ga @ f.Qa.T)
        Gb = 0.5 * (f.Qb @ Gb @ f.Qb.T)
        return self.view.vjp(nat, Ga, Gb, 0.5 * gs)


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
