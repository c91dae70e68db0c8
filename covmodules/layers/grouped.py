r"""One structure within each group: :math:`V_g = S[p_g, p_g] + \sigma^2 I`, and its separable
special case :math:`V_g = A \otimes B + \sigma^2 I` on a grid.

The loss of a :class:`GroupedCovariance` batch is the ML loss of its residuals through the
grouped solver (:class:`~covmodules.linalg.GroupedSolver`: one batched Cholesky per block size,
``Σ_g n_g³/3``, closed-form backward), built from the batch's group codes and positions and the
layer's one float64 ``S + σ² I_T`` (:meth:`~covmodules.linalg.GroupedSolver.within_groups`: no
batch model, no new modules per batch). A :class:`KroneckerCovariance` batch of ``F`` complete
grids shares one ``V = A ⊗ B + σ² I`` for ``F`` independent residual grids ``r_f``; with the
Kronecker solver's factor (:class:`~covmodules.linalg.kronecker.KroneckerFactor`,
``V = Q D Qᵀ``, ``Q = Q_a ⊗ Q_b``, ``D = λ_a λ_bᵀ + σ²``) the loss is
``½[F log|V| + Σ_f ‖D^{-1/2} Qᵀ r_f‖²] + ½ F mn log 2π``, computed by the solvers' "state
forward, closed-form backward" (:class:`~covmodules.linalg.base.NegLogLik`) over
``(A, B, σ²)``; with ``α_f = V⁻¹ r_f`` read as ``m x n`` matrices,

.. math::

    \bar A = \tfrac12\Big[F\,Q_a \operatorname{diag}(D^{-1}\lambda_b) Q_a^T
              - \sum_f \alpha_f B \alpha_f^T\Big], \quad
    \bar B = \tfrac12\Big[F\,Q_b \operatorname{diag}(\lambda_a^T D^{-1}) Q_b^T
              - \sum_f \alpha_f^T A \alpha_f\Big], \quad
    \bar s = \tfrac12\Big[F \sum D^{-1} - \sum_f \lVert\alpha_f\rVert^2\Big],

``m³ + n³ + F mn(m + n)`` in all. (The solvers take one response: the ``F`` grids as one
``(I_F ⊗ A) ⊗ B + σ² I`` would cost ``(F m)³``, six times slower for forty ``10 x 10``
grids; any other batch goes through the grouped solver.) Prediction for a row of group ``g`` at
position ``t``: :math:`f(x) + \sum_j S[t, p_j] (V_g^{-1} r_g)_j`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..base import CovarianceModule
from ..singular import check_distinct_rows, grouped_row_classes
from ..linalg import GroupedSolver
from ..linalg.base import NegLogLik
from ..linalg.kronecker import KroneckerFactor
from ..linalg.statistics import GLSStatistics
from ..operators.grouped import Grouped, default_positions
from ..operators.kronecker import KroneckerProduct
from ..operators.sum import Sum
from ..structures.scalar import ScalarMatrix
from ..validation import as_data
from .base import CovarianceLayer, integers, matrix64, ml_loss

__all__ = ["GroupedCovariance", "KroneckerCovariance"]


@dataclass
class GridState:
    """``-l`` of ``F`` residual grids under one Kronecker factor and ``α = V⁻¹ R`` ``(mn, F)``:
    what :class:`~covmodules.linalg.base.NegLogLik` reads (``Py`` is ``α`` flattened like
    ``R``)."""

    factor: KroneckerFactor
    alpha: torch.Tensor
    neg_loglik: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, R: torch.Tensor, m: int) -> "GridState":
        """The state of ``m x n`` grids ``R`` ``(mn, F)`` at ``values = [vec A, vec B, σ²]``."""
        A, B, s = _split(values, m, R.shape[0] // m)
        factor = KroneckerFactor([A, B], s)
        W = factor.whiten(R)
        neg = GLSStatistics.of_residuals(R.shape[1] * factor.logdet, (W * W).sum(),
                                         R.numel()).finish("ml").neg_loglik
        return cls(factor, factor.unwhiten(W), neg)

    @property
    def Py(self) -> torch.Tensor:
        return self.alpha.reshape(-1)

    def cotangent(self, values: torch.Tensor) -> torch.Tensor:
        """``[vec Ā, vec B̄, s̄]`` (module docstring)."""
        f, alpha = self.factor, self.alpha
        A, B, _ = _split(values, *f.sizes)
        F, Dinv = alpha.shape[1], 1 / f.D
        grids = alpha.T.reshape(F, A.shape[0], B.shape[0])
        (Qa, Qb), (la, lb) = f.Qs, f.lams
        gA = F * (Qa * (Dinv @ lb)) @ Qa.T - (grids @ B @ grids.mT).sum(0)
        gB = F * (Qb * (la @ Dinv)) @ Qb.T - (grids.mT @ A @ grids).sum(0)
        gs = F * Dinv.sum() - (alpha * alpha).sum()
        return 0.5 * torch.cat([gA.reshape(-1), gB.reshape(-1), gs[None]])


def _split(values: torch.Tensor, m: int, n: int):
    """``A (m x m)``, ``B (n x n)`` and ``σ²`` from ``[vec A, vec B, σ²]``."""
    return values[:m * m].reshape(m, m), values[m * m:-1].reshape(n, n), values[-1]


class GroupedCovariance(CovarianceLayer):
    r"""One structure within each group: :math:`V_g = S[p_g, p_g] + \sigma^2 I`.

    ``within`` is a ``T x T`` covariance module shared by all groups (``AR1Matrix(T)`` for
    AR(1) repeated measures, ``Sum(subject=EqualEntryMatrix(T), serial=AR1Matrix(T))`` for a
    random intercept plus AR(1), ...); row ``i`` of group ``g_i`` sits at position ``p_i``
    (a time point; by default its order within the group). ``nugget`` adds :math:`\sigma^2 I`
    (parameter ``nugget/sigma^2``). A batch is indexed by ``(groups, positions=None)``; its
    loss is the grouped solver's (:class:`~covmodules.linalg.GroupedSolver`: one batched
    Cholesky per block size, closed-form backward reaching ``S`` through the gather of its
    entries).

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix, GroupedCovariance
        >>> layer = GroupedCovariance(AR1Matrix(3), num_levels=2)
        >>> y = torch.tensor([1.0, 0.5, 2.0, -1.0])
        >>> g, t = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 2, 0])   # groups, times
        >>> V = layer.batch_model(g, t)()
        >>> ref = torch.distributions.MultivariateNormal(torch.zeros(4, dtype=V.dtype), V)
        >>> torch.isclose(layer.nll(y, torch.zeros(4), g, t), -ref.log_prob(y.double())).item()
        True
        >>> sorted(layer.variance_components)
        ['nugget/sigma^2', 'within/rho', 'within/sigma^2']
    """

    def __init__(self, within: CovarianceModule, num_levels: int, nugget: bool = True,
                 group_sizes=None):
        super().__init__()
        if not isinstance(within, CovarianceModule):
            raise TypeError(f"within must be a CovarianceModule, got {type(within).__name__}")
        if within.shape[0] != within.shape[1]:
            raise ValueError(f"within must be square, got shape {within.shape}")
        self.within = within
        self.register_module("nugget", ScalarMatrix(1) if nugget else None)
        self._init_groups(num_levels, group_sizes)
        self.register_buffer("blup_weights",
                             torch.zeros(self.num_levels, within.shape[0], dtype=torch.float64))

    @property
    def size(self) -> int:
        """``T``, the number of positions."""
        return self.within.shape[0]

    def _positions(self, positions, codes: torch.Tensor) -> torch.Tensor:
        n = codes.shape[0]
        if positions is None:
            pos = torch.from_numpy(default_positions(codes.cpu().numpy()))
        else:
            pos = integers(positions, n, "positions")
        pos = pos.to(codes.device)
        if n and (int(pos.min()) < 0 or int(pos.max()) >= self.size):
            raise ValueError(f"positions must lie in 0..{self.size - 1} (within is "
                             f"{self.size} x {self.size}), got {int(pos.min())}..{int(pos.max())}")
        if self.nugget is None:      # two rows of a group at one position: V_g is singular
            check_distinct_rows(grouped_row_classes(codes, pos, self.within))
        return pos

    def _index(self, n, groups, positions=None, *, whole):
        codes = self._batch_codes(groups, n) if whole else self._codes(groups, n)
        return codes, self._positions(positions, codes)

    def _structure(self) -> CovarianceModule:
        """``S + σ² I_T`` (``S`` without a nugget) in float64 at the layer's values: the flat
        parameters of every batch, built once from a copy of ``within`` and reused."""
        cached = self.__dict__.get("_structure64")
        if cached is None or cached[0] is not self.within or cached[1] is not self.nugget:
            within = copy.deepcopy(self.within).to(torch.float64)
            model = within if self.nugget is None else Sum(within=within,
                                                           nugget=ScalarMatrix(self.size))
            self.__dict__["_structure64"] = cached = (self.within, self.nugget, model)
        return self._mirror(cached[2])

    def _model(self, codes, pos) -> CovarianceModule:
        """``Grouped(within) (+ σ² I)`` of checked codes and positions, at the layer's values."""
        structure = self._structure()
        within = structure if self.nugget is None else structure.operand_modules[0]
        model = Grouped(within, groups=codes, positions=pos)
        if self.nugget is not None:
            model = Sum(within=model, nugget=ScalarMatrix(codes.shape[0]))
        return self._mirror(model)

    def _solver(self, codes, pos):
        """The grouped solver of the batch, built from its rows and :meth:`_structure` (no
        batch model)."""
        structure = self._structure()
        if self.nugget is None:
            return GroupedSolver.within_groups(structure, structure, codes, pos)
        within, nugget = structure.operand_modules
        return GroupedSolver.within_groups(structure, within, codes, pos, nugget)

    def _neg_loglik(self, r, codes, pos):
        return ml_loss(self._solver(codes, pos), self._free64(), r)

    def _solve(self, r, codes, pos):
        """``V⁻¹ r`` of the batch (the solver's ``P y`` without fixed effects; no autograd)."""
        free = self._free64().detach()
        return self._solver(codes, pos).state(free, r, r.new_zeros(r.shape[0], 0), "ml").Py

    def _store(self, r, codes, pos):
        alpha = self._solve(r, codes, pos)
        self.blup_weights.zero_().index_put_((codes, pos), alpha.to(self.blup_weights),
                                             accumulate=True)
        self.seen.copy_(torch.bincount(codes, minlength=self.num_levels) > 0)
        return self.blup_weights.clone()

    def predict(self, mean, groups, positions) -> torch.Tensor:
        """``mean + Σ_j S[t, p_j] (V_g⁻¹ r_g)_j`` for seen groups; ``mean`` for any other code."""
        flat = as_data(mean, "mean", 1)
        codes, seen = self._new_or_unseen(groups, flat.shape[0])
        t = integers(positions, flat.shape[0], "positions").to(codes.device)
        if bool(((t < 0) | (t >= self.size)).any()):
            raise ValueError(f"positions must lie in 0..{self.size - 1}")
        with torch.no_grad():
            S = matrix64(self.within)
            add = (self.blup_weights[codes].to(S) * S[t]).sum(1)
        add = torch.where(seen, add, 0.0).to(mean.dtype)
        return mean + add.reshape(mean.shape)

    def batch_model(self, groups, positions=None) -> CovarianceModule:
        """``Grouped(within) (+ σ² I)`` of the batch, at the layer's values."""
        return self._model(*self._index(len(groups), groups, positions, whole=True))

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"


class KroneckerCovariance(GroupedCovariance):
    r"""A separable field on an ``m x n`` grid per group: :math:`V_g = A \otimes B + \sigma^2 I`.

    Position ``p = i n + j`` is grid cell ``(i, j)`` (``A`` over rows, ``B`` over columns).
    When every group of a batch is a complete grid the loss goes through the Kronecker
    solver's factor, the eigendecompositions of ``A`` and ``B`` (:class:`GridState`,
    ``m³ + n³ + mn(m + n)`` per grid); otherwise it is :class:`GroupedCovariance`'s. Only the
    product of the two scales is identified: when both ``row`` and ``col`` have a free
    ``sigma^2``, ``col``'s is fixed at its current value.

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix, KroneckerCovariance
        >>> layer = KroneckerCovariance(AR1Matrix(2), AR1Matrix(3), num_levels=1)
        >>> y = torch.arange(6.0)
        >>> V = layer.batch_model(torch.zeros(6, dtype=torch.long), torch.arange(6))()
        >>> ref = torch.distributions.MultivariateNormal(torch.zeros(6, dtype=V.dtype), V)
        >>> nll = layer.nll(y, torch.zeros(6), torch.zeros(6, dtype=torch.long), torch.arange(6))
        >>> torch.isclose(nll, -ref.log_prob(y.double())).item()
        True
    """

    def __init__(self, row: CovarianceModule, col: CovarianceModule, num_levels: int,
                 nugget: bool = True, group_sizes=None):
        within = KroneckerProduct(row=row, col=col)
        row, col = within.operand_modules
        if "sigma^2" in row.free_param_names and "sigma^2" in col.free_param_names:
            col.fix("sigma^2")
        super().__init__(within, num_levels, nugget, group_sizes)

    def _grids(self, codes, pos):
        """``(F, T)`` row of each (group, position) when every group is a complete grid."""
        local = torch.unique(codes, return_inverse=True)[1]
        F = int(local.max()) + 1
        if codes.numel() != F * self.size:
            return None
        grid = torch.full((F, self.size), -1, dtype=torch.long, device=codes.device)
        grid[local, pos] = torch.arange(codes.numel(), device=codes.device)
        return None if bool((grid < 0).any()) else grid

    def _values(self):
        """``[vec A, vec B, σ²]`` in float64, differentiable in the layer's parameters."""
        A, B = (matrix64(op) for op in self.within.operand_modules)
        s = matrix64(self.nugget)[0] if self.nugget is not None else A.new_zeros(1)
        return torch.cat([A.reshape(-1), B.reshape(-1), s])

    def _neg_loglik(self, r, codes, pos):
        grid = self._grids(codes, pos)
        if grid is None:
            return super()._neg_loglik(r, codes, pos)
        R, m = r[grid].T, self.within.operand_modules[0].shape[0]
        fixed = R.detach()
        return NegLogLik.apply(self._values(), R.reshape(-1), R.new_zeros(R.numel(), 0),
                               lambda values: GridState.of(values, fixed, m),
                               lambda values, state: state.cotangent(values))

    def _solve(self, r, codes, pos):
        grid = self._grids(codes, pos)
        if grid is None:
            return super()._solve(r, codes, pos)
        alpha = torch.empty_like(r)
        m = self.within.operand_modules[0].shape[0]
        alpha[grid.T] = GridState.of(self._values(), r[grid].T, m).alpha
        return alpha
