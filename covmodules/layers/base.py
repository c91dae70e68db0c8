r"""The covariance layers' base: input checks, one ``nll`` / ``fit_blups`` template, REML.

Every layer's loss is the ML loss of the residuals ``r = y - mean`` with no fixed effects,
``-l = ½[log|V| + rᵀV⁻¹r] + n/2 log 2π``: :meth:`CovarianceLayer.nll` checks the data, takes
``r`` and asks the layer for ``-l`` of its batch (:meth:`CovarianceLayer._neg_loglik`), by
default a :mod:`covmodules.linalg` solver's loss of the batch's covariance module (closed-form
backward for the covariance parameters, ``∂/∂r = V⁻¹ r``, which reaches the network through
``mean``); a layer whose structure the solvers cannot batch as cheaply gives its own (a linalg
factor under :class:`~covmodules.linalg.base.NegLogLik`, or a closed form).
:meth:`CovarianceLayer.fit_blups` stores what prediction needs from ``V⁻¹ r``, by default the
same solver's ``P y``.
"""

from __future__ import annotations

import abc
import itertools

import numpy as np
import torch
from torch import nn

from ..base import CovarianceModule
from ..checks import Checks
from ..linalg import DenseSolver, Solver
from ..reml import REML
from ..validation import as_data, check_size

__all__ = ["CovarianceLayer", "gaussian_nll"]

def gaussian_nll(covariance: CovarianceModule, y, mean, reduction: str = "sum") -> torch.Tensor:
    r"""``-log N(y; mean, V)`` with ``V`` the dense matrix of any covariance module (Cholesky).

    Example::

        >>> import torch
        >>> from covmodules import ScalarMatrix, gaussian_nll
        >>> y = torch.tensor([1.0, -1.0])
        >>> round(gaussian_nll(ScalarMatrix(2), y, torch.zeros(2)).item(), 6)   # 1 + log 2π
        2.837877
    """
    _check_reduction(reduction)
    y, mean = _response(y, mean)
    n = y.shape[0]
    if covariance.shape != (n, n):
        raise ValueError(f"the covariance has shape {covariance.shape} but y has length {n}")
    free = covariance._registered_free().to(torch.float64)
    return _reduce(ml_loss(DenseSolver(covariance), free, y - mean), n, reduction)


def matrix64(module: CovarianceModule) -> torch.Tensor:
    """``module``'s matrix evaluated in float64 from its parameters (of any dtype); gradients
    reach them through the closed-form backward."""
    return module(module._registered_free().to(torch.float64)).to(torch.float64)


def ml_loss(solver: Solver, free: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``-l`` of residuals ``r`` without fixed effects, differentiable in ``free`` and ``r``."""
    return solver.loss(free, r, r.new_zeros(r.shape[0], 0), "ml")


# ------------------------------------------------------------------------- input checks
def _response(y, mean) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` and ``mean`` as finite float64 vectors of one length on ``mean``'s device, the
    graph kept (the checks of :func:`covmodules.validation.as_data`, as for REML's data)."""
    mean = as_data(mean, "mean", 1)
    y = as_data(y, "y", 1, mean.device)
    if y.shape != mean.shape:
        raise ValueError(f"y has {y.shape[0]} rows but mean has {mean.shape[0]}")
    if y.shape[0] == 0:
        raise ValueError("y and mean are empty: a batch needs at least one row")
    return y, mean


def integers(values, n: int, name: str) -> torch.Tensor:
    """``values`` as ``n`` integer codes (a long tensor); ``TypeError`` for other dtypes."""
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(np.asarray(values))
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer codes, got {values.dtype}")
    if values.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one per row, got {tuple(values.shape)}")
    return values.long()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _reduce(total: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    return total / n if reduction == "mean" else total


# ------------------------------------------------------------------------------ the base
class CovarianceLayer(nn.Module, abc.ABC):
    """Base of the covariance layers: owned covariance modules, group codes, the loss, REML.

    A layer's covariance modules are its children; ``variance_components`` lists their
    parameters by ``<child>/<name>`` on the natural scale. Grouped layers take integer group
    codes ``0..num_levels-1``; with ``group_sizes`` (rows per level in the training data) a
    batch that holds only part of a group raises ``ValueError`` in training mode.

    A subclass says what indexes a batch (:meth:`_index`: group codes and positions, or
    features), the batch's ``-l`` (:meth:`_neg_loglik`: the solver's :func:`ml_loss`, or a
    closed form) and how to store BLUP weights (:meth:`_store`).
    """

    num_levels: int

    # ------------------------------------------------------------------- the template
    def nll(self, y, mean, *index, reduction: str = "sum") -> torch.Tensor:
        """``-log N(y; mean, V)`` of a batch (``"sum"`` or per-row ``"mean"``), float64.

        ``index`` is what the layer's :meth:`batch_model` takes: group codes (and positions)
        of a batch of whole groups, or the network's features.
        """
        _check_reduction(reduction)
        y, mean = _response(y, mean)
        n = y.shape[0]
        return _reduce(self._neg_loglik(y - mean, *self._index(n, *index, whole=True)), n,
                       reduction)

    @torch.no_grad()
    def fit_blups(self, y, mean, *index) -> torch.Tensor:
        """Store and return what :meth:`predict` needs from ``V⁻¹ (y - mean)`` of the
        training data (``index`` as for :meth:`nll`; groups need not be whole)."""
        y, mean = _response(y, mean)
        return self._store(y - mean, *self._index(y.shape[0], *index, whole=False))

    @abc.abstractmethod
    def _index(self, n: int, *index, whole: bool) -> tuple:
        """The checked batch index of ``n`` rows; ``whole``: groups must be whole (training)."""

    @abc.abstractmethod
    def _store(self, r: torch.Tensor, *index) -> torch.Tensor:
        """Store the BLUP weights of the training residuals ``r`` (from ``V⁻¹ r``); return
        them."""

    @abc.abstractmethod
    def _neg_loglik(self, r: torch.Tensor, *index) -> torch.Tensor:
        """``-l`` of the batch's residuals ``r``, differentiable in the parameters and ``r``
        (:func:`ml_loss` of the batch's solver, or a closed form)."""

    # ------------------------------------------------------------- owned covariances
    def covariances(self) -> dict[str, CovarianceModule]:
        """The owned covariance modules by child name, in parameter order."""
        return {k: m for k, m in self.named_children() if isinstance(m, CovarianceModule)}

    @property
    def variance_components(self) -> dict[str, float]:
        """Every covariance parameter (free and fixed) by ``<child>/<name>``, natural scale."""
        return {f"{k}/{p}": v for k, m in self.covariances().items() for p, v in m.params.items()}

    def free_params(self) -> torch.Tensor:
        """The owned modules' free parameters in flat order; gradients reach them."""
        return torch.cat([m._registered_free() for m in self.covariances().values()])

    def _free64(self) -> torch.Tensor:
        """:meth:`free_params` in float64 (the algebra's dtype; gradients reach the layer)."""
        return self.free_params().to(torch.float64)

    def _mirror(self, model: CovarianceModule) -> CovarianceModule:
        """Copy the layer's parameters and fixed flags onto ``model`` and put it in float64 on
        the layer's device. ``model``'s flat parameters are the layer's, in order and on the
        same free scale (it is built from copies of the layer's modules or fresh ones of the
        same classes)."""
        raws, fixed = [], []
        for m in self.covariances().values():
            fixed += [len(raws) + i for i in m.fixed_param_index]
            raws += m._raw_tensors()
        names = model.param_names
        if len(names) != len(raws):
            raise ValueError(f"the batch model has {len(names)} parameters, the layer "
                             f"{len(raws)}")
        with torch.no_grad():
            for target, source in zip(model._raw_tensors(), raws):
                target.copy_(source)
        for i in sorted(set(fixed) - set(model.fixed_param_index)):
            model.fix(names[i])
        for i in sorted(set(model.fixed_param_index) - set(fixed)):
            model.free(names[i])
        device = next(self.buffers()).device
        if any(t.device != device or (t.is_floating_point() and t.dtype != torch.float64)
               for t in itertools.chain(model.parameters(), model.buffers())):
            model = model.to(device=device, dtype=torch.float64)
        return model

    # ------------------------------------------------------------------- group codes
    def _init_groups(self, num_levels: int, group_sizes) -> None:
        self.num_levels = check_size(num_levels, "num_levels")
        if group_sizes is not None:
            group_sizes = integers(group_sizes, self.num_levels, "group_sizes")
            if bool((group_sizes < 0).any()):
                raise ValueError("group_sizes must be non-negative")
        self.register_buffer("group_sizes", group_sizes)
        self.register_buffer("seen", torch.zeros(self.num_levels, dtype=torch.bool))

    def _codes(self, groups, n: int) -> torch.Tensor:
        codes = integers(groups, n, "groups").to(self.seen.device)
        if n == 0:
            raise ValueError("groups is empty: a batch needs at least one row")
        if (int(codes.min()) < 0 or int(codes.max()) >= self.num_levels):
            raise ValueError(f"groups must be codes in 0..{self.num_levels - 1}, got values in "
                             f"{int(codes.min())}..{int(codes.max())}")
        return codes

    def _batch_codes(self, groups, n: int) -> torch.Tensor:
        """Group codes of a batch; in training mode, checked to hold whole groups."""
        codes = self._codes(groups, n)
        if self.group_sizes is not None and self.training:
            count = torch.bincount(codes, minlength=self.num_levels)
            split = torch.nonzero((count > 0) & (count != self.group_sizes))[:, 0]
            if split.numel():
                g = int(split[0])
                raise ValueError(
                    f"the batch holds part of {split.numel()} group(s), e.g. group {g} with "
                    f"{int(count[g])} of its {int(self.group_sizes[g])} rows: batches must hold "
                    "whole groups (see GroupBatchSampler)")
        return codes

    def _new_or_unseen(self, groups, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes clamped to ``0..num_levels-1`` and whether each row's group was seen."""
        codes = integers(groups, n, "groups").to(self.seen.device)
        inside = (codes >= 0) & (codes < self.num_levels)
        codes = codes.clamp(0, self.num_levels - 1)
        return codes, inside & self.seen[codes]

    # -------------------------------------------------------------------------- REML
    @abc.abstractmethod
    def batch_model(self, *index) -> CovarianceModule:
        """The batch's covariance module at the layer's current values (dense reference, REML)."""

    def reml_objective(self, y, X, *index, reduction: str = "sum", solver=None,
                       checks: Checks | None = None) -> REML:
        """The :class:`~covmodules.reml.REML` objective of the batch with fixed effects ``X``
        (its data checks and the design ``checks``, :class:`~covmodules.checks.Checks`).

        ``objective.state(layer.free_params().detach()).beta`` is the GLS estimate.
        """
        return REML(self.batch_model(*index), y, X, reduction=reduction, solver=solver,
                    checks=checks)

    def reml(self, y, X, *index, reduction: str = "sum", solver=None,
             checks: Checks | None = None) -> torch.Tensor:
        """Minus the REML log-likelihood of the batch with ``X`` (e.g. last-layer features).

        Differentiable in the layer's parameters, ``y`` and ``X``; the solver is chosen from
        the batch model's structure unless ``solver`` names one.
        """
        objective = self.reml_objective(y, X, *index, reduction=reduction, solver=solver,
                                        checks=checks)
        return objective.loss(self.free_params())
