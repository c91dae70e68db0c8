r"""Covariance layers: a neural-network mean with a structured covariance, trained end to end.

A network gives the mean :math:`f(x)`, a covariance layer gives :math:`V(\theta)`, and the loss
of a batch is the Gaussian marginal negative log-likelihood (no fixed effects profiled out)

.. math:: -\log N(y; f(x), V) = \tfrac12\left[\log|V| + r^T V^{-1} r + n\log 2\pi\right],
          \qquad r = y - f(x).

Its cotangents are :math:`\partial/\partial V = \tfrac12(V^{-1} - \alpha\alpha^T)` and
:math:`\partial/\partial f = -\alpha`, :math:`\alpha = V^{-1} r`. ``V`` is block diagonal over
groups, so the loss of a batch of *whole* groups is a sum over its groups, the batch losses add up
to the full-data loss, and no batch needs an ``N x N`` matrix:

- :class:`RandomIntercept`: :math:`V_g = \sigma_u^2 11^T + \sigma_e^2 I`. With
  :math:`d_g = \sigma_e^2 + n_g\sigma_u^2`, :math:`s_g = 1^T r_g`:
  :math:`\log|V_g| = (n_g - 1)\log\sigma_e^2 + \log d_g`,
  :math:`r_g^T V_g^{-1} r_g = (r_g^T r_g - \sigma_u^2 s_g^2 / d_g) / \sigma_e^2`; ``O(N)``.
- :class:`GroupedCovariance`: :math:`V_g = S[p_g, p_g] + \sigma^2 I`, one ``T x T`` structure
  ``S`` (e.g. AR(1) over time) at the rows' positions; batched Cholesky of the blocks.
- :class:`KroneckerCovariance`: :math:`V_g = A \otimes B + \sigma^2 I` on a complete grid;
  with :math:`A = Q_a \Lambda_a Q_a^T`, :math:`B = Q_b \Lambda_b Q_b^T`,
  :math:`V_g = (Q_a \otimes Q_b)(\Lambda_a \otimes \Lambda_b + \sigma^2)(Q_a \otimes Q_b)^T`.
- :class:`DeepKernel`: :math:`V = \Phi\Phi^T + \sigma^2 I`, the ``Gram`` of network features
  :math:`\Phi` (``n x d``) plus a nugget; Woodbury, :math:`O(n d^2)`.

Each layer owns covariance modules (``nn.Parameter``\ s on the free scale), so its parameters
train with the network's under any torch optimiser. The algebra runs in float64 whatever the
network's dtype: inputs are cast at the boundary, the loss is float64, predictions come back in
the mean's dtype.

**REML** with the network's last-layer features as ``X``: :meth:`CovarianceLayer.reml` is the
library's :class:`~covmodules.reml.REML` objective of the batch's covariance module
(:meth:`~CovarianceLayer.batch_model`), differentiable in the layer's parameters, ``y`` and ``X``.

**Prediction**: for a row of a group ``g`` seen in training, at position ``t``,
:math:`f(x) + \sum_j S[t, p_j] (V_g^{-1} r_g)_j` with ``r_g`` the group's training residuals at
the fitted parameters (:meth:`fit_blups`); for a random intercept this is
:math:`f(x) + \hat u_g`, :math:`\hat u_g = \sigma_u^2 s_g / d_g`. A new group gets :math:`f(x)`.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from covmodules import RandomIntercept
    >>> _ = torch.manual_seed(0)
    >>> x, g = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 1, 2])
    >>> y = x.sum(1) + torch.tensor([1.0, 1, -1, -1, -1, 0])
    >>> net, layer = nn.Linear(2, 1), RandomIntercept(num_levels=4)
    >>> opt = torch.optim.Adam([*net.parameters(), *layer.parameters()], lr=0.05)
    >>> for _ in range(200):
    ...     opt.zero_grad()
    ...     loss = layer.nll(y, net(x), g)
    ...     loss.backward()
    ...     opt.step()
    >>> loss.dtype, sorted(layer.variance_components)
    (torch.float64, ['intercept/sigma^2', 'residual/sigma^2'])
    >>> x_new = torch.randn(2, 2)
    >>> with torch.no_grad():
    ...     u = layer.fit_blups(y, net(x), g)                     # BLUPs from the training data
    ...     pred = layer.predict(net(x_new), torch.tensor([0, 3]))  # group 3 is new: mean alone
    ...     mean = net(x_new)
    >>> torch.equal(pred[1], mean[1]), torch.isclose(pred[0], mean[0] + u[0].float()).item()
    (True, True)
"""

from __future__ import annotations

import abc
import copy
import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .base import CovarianceModule
from .checks import Checks, check_distinct_rows, grouped_row_classes
from .linalg import NotPositiveDefiniteError
from .linalg.dense import cholesky
from .model import MixedModel
from .operators.gram import Gram
from .operators.grouped import Grouped, default_positions, size_class_blocks
from .operators.kronecker import KroneckerProduct
from .operators.sum import Sum
from .reml import REML
from .structures.design_matrix import DesignMatrix
from .structures.scalar import ScalarMatrix
from .validation import as_data, check_size

__all__ = ["CovarianceLayer", "RandomIntercept", "GroupedCovariance", "KroneckerCovariance",
           "DeepKernel", "GroupBatchSampler", "gaussian_nll"]

LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------- autograd functions
class InterceptNLL(torch.autograd.Function):
    r"""``½ Σ_g [log|V_g| + r_gᵀ V_g⁻¹ r_g]``, ``V_g = σ_u² 11ᵀ + σ_e² I``, in ``O(N)``.

    Backward: ``∂/∂r = α = (r - û_g) / σ_e²`` with ``û_g = σ_u² s_g / d_g``,
    ``∂/∂σ_u² = ½ Σ_g (n_g / d_g - s_g² / d_g²)``,
    ``∂/∂σ_e² = ½ [Σ_g ((n_g - 1) / σ_e² + 1 / d_g) - αᵀα]``.
    """

    @staticmethod
    def forward(ctx, r, su, se, codes, num_levels):
        count = torch.bincount(codes, minlength=num_levels).to(r.dtype)
        s = r.new_zeros(num_levels).index_add_(0, codes, r)
        d = se + count * su
        present = count > 0
        logdet = (r.numel() - int(present.sum())) * torch.log(se) + torch.log(d[present]).sum()
        quad = (r @ r - su * (s[present] ** 2 / d[present]).sum()) / se
        ctx.save_for_backward(r, su, se, codes, count, s, d)
        return 0.5 * (logdet + quad)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        r, su, se, codes, count, s, d = ctx.saved_tensors
        alpha = (r - (su * s / d)[codes]) / se
        present = count > 0
        n, s, d = count[present], s[present], d[present]
        g_su = 0.5 * (n / d - (s / d) ** 2).sum()
        g_se = 0.5 * (((n - 1) / se + 1 / d).sum() - alpha @ alpha)
        return grad * alpha, grad * g_su, grad * g_se, None, None


class BlockNLL(torch.autograd.Function):
    r"""``½ Σ_b [log|V_b| + r_bᵀ V_b⁻¹ r_b]`` for a stack of blocks ``V (B, m, m)``, ``r (B, m)``.

    Backward: ``½(V_b⁻¹ - α_b α_bᵀ)`` for ``V`` and ``α_b = V_b⁻¹ r_b`` for ``r``.
    """

    @staticmethod
    def forward(ctx, V, r):
        L = _cholesky(V)
        alpha = torch.cholesky_solve(r[..., None], L)[..., 0]
        ctx.save_for_backward(L, alpha)
        logdet = 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum()
        return 0.5 * (logdet + (r * alpha).sum())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        L, alpha = ctx.saved_tensors
        gV = gr = None
        if ctx.needs_input_grad[0]:
            outer = alpha[..., :, None] * alpha[..., None, :]
            gV = 0.5 * grad * (torch.cholesky_inverse(L) - outer)
        if ctx.needs_input_grad[1]:
            gr = grad * alpha
        return gV, gr


class KroneckerNLL(torch.autograd.Function):
    r"""``½ Σ_f [log|V| + r_fᵀ V⁻¹ r_f]``, ``V = A ⊗ B + s I``, residual grids ``R (F, m, n)``.

    With ``D_ij = λa_i λb_j + s``: ``log|V| = Σ log D`` and ``rᵀV⁻¹r = Σ (Q_aᵀ R Q_b)² / D``.
    Backward, ``α_f = Q_a ((Q_aᵀ R_f Q_b) / D) Q_bᵀ``: ``∂/∂R = α``,
    ``∂/∂A = ½[F Q_a diag(D⁻¹ λb) Q_aᵀ - Σ_f α_f B α_fᵀ]`` (and symmetrically for ``B``),
    ``∂/∂s = ½[F Σ D⁻¹ - Σ α²]``. Cost ``m³ + n³ + F mn(m + n)``.
    """

    @staticmethod
    def forward(ctx, A, B, s, R):
        Qa, Qb, la, lb, D = _kronecker_eigen(A, B, s)
        Rt = Qa.T @ R @ Qb
        ctx.save_for_backward(A, B, Qa, Qb, la, lb, D, Rt)
        return 0.5 * (R.shape[0] * torch.log(D).sum() + (Rt * Rt / D).sum())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        A, B, Qa, Qb, la, lb, D, Rt = ctx.saved_tensors
        F, Dinv = Rt.shape[0], 1 / D
        alpha = Qa @ (Rt * Dinv) @ Qb.T
        gA = 0.5 * grad * (F * (Qa * (Dinv @ lb)) @ Qa.T - (alpha @ B @ alpha.mT).sum(0))
        gB = 0.5 * grad * (F * (Qb * (la @ Dinv)) @ Qb.T - (alpha.mT @ A @ alpha).sum(0))
        gs = 0.5 * grad * (F * Dinv.sum() - (alpha * alpha).sum())
        return gA, gB, gs, grad * alpha


class DeepKernelNLL(torch.autograd.Function):
    r"""``½[log|V| + rᵀV⁻¹r]``, ``V = Φ Φᵀ + s I``, through ``M = I + ΦᵀΦ / s`` (``d x d``).

    ``log|V| = n log s + log|M|``, ``V⁻¹ = (I - Φ M⁻¹ Φᵀ / s) / s``, ``V⁻¹ Φ = Φ M⁻¹ / s``.
    Backward: ``∂/∂Φ = V⁻¹Φ - α (αᵀΦ)``, ``∂/∂s = ½[(n - d + tr M⁻¹) / s - αᵀα]``,
    ``∂/∂r = α``.
    """

    @staticmethod
    def forward(ctx, Phi, s, r):
        n, d = Phi.shape
        L = _cholesky(torch.eye(d, dtype=Phi.dtype, device=Phi.device) + Phi.T @ Phi / s)
        alpha = (r - Phi @ torch.cholesky_solve((Phi.T @ r)[:, None], L)[:, 0] / s) / s
        ctx.save_for_backward(Phi, s, L, alpha)
        return 0.5 * (n * torch.log(s) + 2 * torch.log(L.diagonal()).sum() + r @ alpha)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        Phi, s, L, alpha = ctx.saved_tensors
        n, d = Phi.shape
        Minv = torch.cholesky_inverse(L)
        g_phi = grad * (Phi @ Minv / s - torch.outer(alpha, alpha @ Phi))
        g_s = 0.5 * grad * ((n - d + Minv.trace()) / s - alpha @ alpha)
        return g_phi, g_s, grad * alpha


def _cholesky(V: torch.Tensor) -> torch.Tensor:
    return cholesky(V, "the covariance of a group is not positive definite at these "
                       "parameters (or singular up to rounding); add a nugget or start from "
                       "larger variances")


def _kronecker_eigen(A, B, s):
    la, Qa = torch.linalg.eigh(A)
    lb, Qb = torch.linalg.eigh(B)
    D = la[:, None] * lb[None, :] + s
    if not bool((D > 0).all()):
        raise NotPositiveDefiniteError("A ⊗ B + σ² I is not positive definite at these "
                                       "parameters; add a nugget or start from larger variances")
    return Qa, Qb, la, lb, D


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
    V = covariance().to(torch.float64)
    total = BlockNLL.apply(V[None], (y - mean)[None]) + 0.5 * n * LOG_2PI
    return _reduce(total, n, reduction)


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


def _integers(values, n: int, name: str) -> torch.Tensor:
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


# ------------------------------------------------------------------------------ layers
class CovarianceLayer(nn.Module, abc.ABC):
    """Base of the covariance layers: owned covariance modules, group codes, REML.

    A layer's covariance modules are its children; ``variance_components`` lists their
    parameters by ``<child>/<name>`` on the natural scale. Grouped layers take integer group
    codes ``0..num_levels-1``; with ``group_sizes`` (rows per level in the training data) a
    batch that holds only part of a group raises ``ValueError`` in training mode.
    """

    num_levels: int

    def _init_groups(self, num_levels: int, group_sizes) -> None:
        self.num_levels = check_size(num_levels, "num_levels")
        if group_sizes is not None:
            group_sizes = _integers(group_sizes, self.num_levels, "group_sizes")
            if bool((group_sizes < 0).any()):
                raise ValueError("group_sizes must be non-negative")
        self.register_buffer("group_sizes", group_sizes)
        self.register_buffer("seen", torch.zeros(self.num_levels, dtype=torch.bool))

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

    def _mirror(self, model: CovarianceModule) -> CovarianceModule:
        """Copy the layer's values and fixed flags onto ``model`` (same flat parameter order)."""
        sources = [(m, p) for m in self.covariances().values() for p in m.param_names]
        for target, (m, p) in zip(model.param_names, sources):
            model.set_param(target, m.get_param(p))
            if p in m.fixed_param_names:
                model.fix(target)
        return model

    def _codes(self, groups, n: int) -> torch.Tensor:
        codes = _integers(groups, n, "groups").to(self.seen.device)
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
        codes = _integers(groups, n, "groups").to(self.seen.device)
        inside = (codes >= 0) & (codes < self.num_levels)
        codes = codes.clamp(0, self.num_levels - 1)
        return codes, inside & self.seen[codes]

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


class RandomIntercept(CovarianceLayer):
    r"""Random intercepts of a categorical feature: :math:`V_g = \sigma_u^2 11^T + \sigma_e^2 I`.

    Parameters ``intercept/sigma^2`` (:math:`\sigma_u^2`) and ``residual/sigma^2``
    (:math:`\sigma_e^2`), each a ``ScalarMatrix(1)``. The loss, its gradients and the BLUPs
    :math:`\hat u_g = \sigma_u^2 s_g / (\sigma_e^2 + n_g \sigma_u^2)` are closed form per group,
    ``O(N)`` (see the module docstring).

    Args:
        num_levels: number of levels; ``groups`` are codes ``0..num_levels-1``.
        group_sizes: optional rows per level in the training data, to reject batches that
            split a group (in training mode).

    Example::

        >>> import torch
        >>> from covmodules import RandomIntercept
        >>> layer = RandomIntercept(num_levels=2)
        >>> y, g = torch.tensor([1.0, 3.0, -2.0]), torch.tensor([0, 0, 1])
        >>> V = layer.batch_model(g)()                     # dense σ_u² Z Zᵀ + σ_e² I
        >>> ref = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=V.dtype), V)
        >>> torch.isclose(layer.nll(y, torch.zeros(3), g), -ref.log_prob(y.double())).item()
        True
        >>> layer.fit_blups(y, torch.zeros(3), g).tolist()       # σ_u² s_g / (σ_e² + n_g σ_u²)
        [1.3333333333333333, -1.0]
    """

    def __init__(self, num_levels: int, group_sizes=None):
        super().__init__()
        self.intercept = ScalarMatrix(1)
        self.residual = ScalarMatrix(1)
        self._init_groups(num_levels, group_sizes)
        self.register_buffer("blup", torch.zeros(self.num_levels, dtype=torch.float64))

    def _variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.intercept()[0, 0].to(torch.float64),
                self.residual()[0, 0].to(torch.float64))

    def nll(self, y, mean, groups, reduction: str = "sum") -> torch.Tensor:
        """``-log N(y; mean, V)`` of a batch of whole groups (``"sum"`` or per-row ``"mean"``)."""
        _check_reduction(reduction)
        y, mean = _response(y, mean)
        n = y.shape[0]
        codes = self._batch_codes(groups, n)
        su, se = self._variances()
        total = InterceptNLL.apply(y - mean, su, se, codes, self.num_levels)
        return _reduce(total + 0.5 * n * LOG_2PI, n, reduction)

    @torch.no_grad()
    def fit_blups(self, y, mean, groups) -> torch.Tensor:
        """Store and return the BLUPs of all levels from the training data (zero if absent)."""
        y, mean = _response(y, mean)
        codes = self._codes(groups, y.shape[0])
        su, se = self._variances()
        count = torch.bincount(codes, minlength=self.num_levels).to(torch.float64)
        s = y.new_zeros(self.num_levels).index_add_(0, codes, y - mean)
        self.blup.copy_(su * s / (se + count * su))
        self.seen.copy_(count > 0)
        return self.blup.clone()

    def predict(self, mean, groups) -> torch.Tensor:
        """``mean + û_g`` for groups seen by :meth:`fit_blups`; ``mean`` for any other code."""
        flat = as_data(mean, "mean", 1)
        codes, seen = self._new_or_unseen(groups, flat.shape[0])
        add = torch.where(seen, self.blup[codes], 0.0).to(mean.dtype)
        return mean + add.reshape(mean.shape)

    def batch_model(self, groups) -> MixedModel:
        """``MixedModel`` ``σ_u² Z Zᵀ + σ_e² I`` of the batch, at the layer's values."""
        n = len(groups)
        codes = self._batch_codes(groups, n)
        local = torch.unique(codes, return_inverse=True)[1]
        q = int(local.max()) + 1
        model = MixedModel(random={"intercept": (DesignMatrix(local), ScalarMatrix(q))},
                           residual=ScalarMatrix(n))
        return self._mirror(model)

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"


class GroupedCovariance(CovarianceLayer):
    r"""One structure within each group: :math:`V_g = S[p_g, p_g] + \sigma^2 I`.

    ``within`` is a ``T x T`` covariance module shared by all groups (``AR1Matrix(T)`` for
    AR(1) repeated measures, ``Sum(subject=EqualEntryMatrix(T), serial=AR1Matrix(T))`` for a
    random intercept plus AR(1), ...); row ``i`` of group ``g_i`` sits at position ``p_i``
    (a time point; by default its order within the group). ``nugget`` adds :math:`\sigma^2 I`
    (parameter ``nugget/sigma^2``). The blocks of a batch are padded to size classes and
    factorised by one batched Cholesky each; the loss's backward is closed form
    (:class:`BlockNLL`) and reaches ``S`` through the gather of its entries.

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
            pos = _integers(positions, n, "positions")
        pos = pos.to(codes.device)
        if n and (int(pos.min()) < 0 or int(pos.max()) >= self.size):
            raise ValueError(f"positions must lie in 0..{self.size - 1} (within is "
                             f"{self.size} x {self.size}), got {int(pos.min())}..{int(pos.max())}")
        if self.nugget is None:      # two rows of a group at one position: V_g is singular
            check_distinct_rows(grouped_row_classes(codes, pos, self.within))
        return pos

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.within().to(torch.float64)
        nugget = (self.nugget()[0, 0].to(torch.float64) if self.nugget is not None
                  else S.new_zeros(()))
        return S, nugget

    @staticmethod
    def _blocks(codes, pos):
        """Per size class ``(rows, positions, valid)``, each ``(groups, m)``, on ``codes``' device."""
        local = torch.unique(codes, return_inverse=True)[1].cpu().numpy()
        return [tuple(torch.from_numpy(a).to(codes.device) for a in block)
                for block in size_class_blocks(local, pos.cpu().numpy())]

    @staticmethod
    def _system(S, nugget, r, rows, pos, valid):
        """Padded blocks ``V`` (padding: identity) and residuals ``R`` (padding: zero)."""
        pairs = valid[:, :, None] & valid[:, None, :]
        V = S[pos[:, :, None], pos[:, None, :]].masked_fill(~pairs, 0.0)
        V = V + torch.diag_embed(torch.where(valid, nugget, 1.0))
        return V, torch.where(valid, r[rows], 0.0)

    def _neg_loglik(self, r, codes, pos) -> torch.Tensor:
        """``½ Σ_g [log|V_g| + r_gᵀ V_g⁻¹ r_g]`` of the batch."""
        S, nugget = self._matrices()
        return sum(BlockNLL.apply(*self._system(S, nugget, r, *block))
                   for block in self._blocks(codes, pos))

    def _solve(self, r, codes, pos) -> torch.Tensor:
        """``V⁻¹ r`` of every row (no autograd)."""
        S, nugget = self._matrices()
        alpha = torch.empty_like(r)
        for rows, p, valid in self._blocks(codes, pos):
            V, R = self._system(S, nugget, r, rows, p, valid)
            a = torch.cholesky_solve(R[..., None], _cholesky(V))[..., 0]
            alpha[rows[valid]] = a[valid]
        return alpha

    def nll(self, y, mean, groups, positions=None, reduction: str = "sum") -> torch.Tensor:
        """``-log N(y; mean, V)`` of a batch of whole groups (``"sum"`` or per-row ``"mean"``)."""
        _check_reduction(reduction)
        y, mean = _response(y, mean)
        n = y.shape[0]
        codes = self._batch_codes(groups, n)
        total = self._neg_loglik(y - mean, codes, self._positions(positions, codes))
        return _reduce(total + 0.5 * n * LOG_2PI, n, reduction)

    @torch.no_grad()
    def fit_blups(self, y, mean, groups, positions=None) -> torch.Tensor:
        """Store and return ``V_g⁻¹ r_g`` of the training data by (group, position)."""
        y, mean = _response(y, mean)
        codes = self._codes(groups, y.shape[0])
        pos = self._positions(positions, codes)
        alpha = self._solve(y - mean, codes, pos)
        self.blup_weights.zero_().index_put_((codes, pos), alpha.to(self.blup_weights),
                                             accumulate=True)
        self.seen.copy_(torch.bincount(codes, minlength=self.num_levels) > 0)
        return self.blup_weights.clone()

    def predict(self, mean, groups, positions) -> torch.Tensor:
        """``mean + Σ_j S[t, p_j] (V_g⁻¹ r_g)_j`` for seen groups; ``mean`` for any other code."""
        flat = as_data(mean, "mean", 1)
        codes, seen = self._new_or_unseen(groups, flat.shape[0])
        t = _integers(positions, flat.shape[0], "positions").to(codes.device)
        if bool(((t < 0) | (t >= self.size)).any()):
            raise ValueError(f"positions must lie in 0..{self.size - 1}")
        with torch.no_grad():
            S = self.within().to(torch.float64)
            add = (self.blup_weights[codes].to(S) * S[t]).sum(1)
        add = torch.where(seen, add, 0.0).to(mean.dtype)
        return mean + add.reshape(mean.shape)

    def batch_model(self, groups, positions=None) -> CovarianceModule:
        """``Grouped(within) (+ σ² I)`` of the batch, at the layer's values."""
        n = len(groups)
        codes = self._batch_codes(groups, n)
        pos = self._positions(positions, codes)
        model = Grouped(copy.deepcopy(self.within), groups=codes, positions=pos)
        if self.nugget is not None:
            model = Sum(within=model, nugget=ScalarMatrix(n))
        return self._mirror(model)

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"


class KroneckerCovariance(GroupedCovariance):
    r"""A separable field on an ``m x n`` grid per group: :math:`V_g = A \otimes B + \sigma^2 I`.

    Position ``p = i n + j`` is grid cell ``(i, j)`` (``A`` over rows, ``B`` over columns).
    When every group of a batch is a complete grid the loss uses the eigendecompositions of
    ``A`` and ``B`` (:class:`KroneckerNLL`, ``m³ + n³ + mn(m + n)`` per group); otherwise it
    falls back to :class:`GroupedCovariance`'s blocks. Only the product of the two scales is
    identified: when both ``row`` and ``col`` have a free ``sigma^2``, ``col``'s is fixed at
    its current value.

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

    def _factors(self):
        A, B = (op().to(torch.float64) for op in self.within.operand_modules)
        return A, B, self._matrices()[1]

    def _neg_loglik(self, r, codes, pos):
        grid = self._grids(codes, pos)
        if grid is None:
            return super()._neg_loglik(r, codes, pos)
        A, B, nugget = self._factors()
        return KroneckerNLL.apply(A, B, nugget, r[grid].reshape(-1, A.shape[0], B.shape[0]))

    def _solve(self, r, codes, pos):
        grid = self._grids(codes, pos)
        if grid is None:
            return super()._solve(r, codes, pos)
        A, B, nugget = self._factors()
        Qa, Qb, _, _, D = _kronecker_eigen(A, B, nugget)
        R = r[grid].reshape(-1, A.shape[0], B.shape[0])
        alpha = torch.empty_like(r)
        alpha[grid.reshape(-1)] = (Qa @ ((Qa.T @ R @ Qb) / D) @ Qb.T).reshape(-1)
        return alpha


class DeepKernel(CovarianceLayer):
    r"""Deep kernel: :math:`V = \Phi\Phi^T + \sigma^2 I`, the Gram of network features.

    ``Φ`` (``n x d``, the network's features) enters the loss with its gradient, so the network
    learns the kernel; ``nugget/sigma^2`` is the noise. The loss uses Woodbury in
    ``O(n d²)`` (:class:`DeepKernelNLL`); :meth:`batch_model` is the same ``V`` as a module,
    ``Sum(kernel=Gram(Φ), nugget=ScalarMatrix(n))``. The likelihood couples all rows, so the
    loss of a mini-batch is that batch's own marginal likelihood (a stochastic approximation).
    Prediction at new rows: ``f(x) + φ(x)ᵀ w``, ``w = Φᵀ V⁻¹ r`` from the training data.

    Example::

        >>> import torch
        >>> from covmodules import DeepKernel
        >>> layer = DeepKernel(num_features=2)
        >>> phi = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])    # network features
        >>> y = torch.tensor([1.0, 2.0, 0.0])
        >>> V = layer.batch_model(phi)()
        >>> ref = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=V.dtype), V)
        >>> torch.isclose(layer.nll(y, torch.zeros(3), phi), -ref.log_prob(y.double())).item()
        True
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = check_size(num_features, "num_features")
        self.nugget = ScalarMatrix(1)
        self.register_buffer("weights", torch.zeros(self.num_features, dtype=torch.float64))

    def _features(self, features, n: int | None) -> torch.Tensor:
        """``features`` as a finite float64 ``(n, num_features)`` matrix (any ``n`` if None)."""
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError("features must be a floating-point tensor")
        rows = "n" if n is None else n
        n = features.shape[0] if n is None and features.dim() == 2 else n
        if features.shape != (n, self.num_features):
            raise ValueError(f"features must have shape ({rows}, {self.num_features}), "
                             f"got {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or inf values")
        return features.to(torch.float64)

    def nll(self, y, mean, features, reduction: str = "sum") -> torch.Tensor:
        """``-log N(y; mean, ΦΦᵀ + σ² I)`` of a batch (``"sum"`` or per-row ``"mean"``)."""
        _check_reduction(reduction)
        y, mean = _response(y, mean)
        n = y.shape[0]
        phi = self._features(features, n)
        total = DeepKernelNLL.apply(phi, self.nugget()[0, 0].to(torch.float64), y - mean)
        return _reduce(total + 0.5 * n * LOG_2PI, n, reduction)

    def batch_model(self, features) -> CovarianceModule:
        """``Sum(kernel=Gram(Φ), nugget=ScalarMatrix(n))`` at the layer's nugget (Φ detached)."""
        phi = self._features(features, None).detach()
        model = Sum(kernel=Gram(phi), nugget=ScalarMatrix(phi.shape[0]))
        return self._mirror(model)

    @torch.no_grad()
    def fit_blups(self, y, mean, features) -> torch.Tensor:
        """Store and return ``w = Φᵀ V⁻¹ (y - mean)`` of the training data."""
        y, mean = _response(y, mean)
        phi = self._features(features, y.shape[0])
        s = self.nugget()[0, 0].to(torch.float64)
        L = _cholesky(torch.eye(self.num_features, dtype=phi.dtype, device=phi.device)
                      + phi.T @ phi / s)
        b = phi.T @ (y - mean)
        # Φᵀ V⁻¹ r = (b - ΦᵀΦ M⁻¹ b / s) / s = M⁻¹ b / s
        self.weights.copy_(torch.cholesky_solve(b[:, None], L)[:, 0] / s)
        return self.weights.clone()

    def predict(self, mean, features) -> torch.Tensor:
        """``mean + φ(x)ᵀ w``."""
        flat = as_data(mean, "mean", 1)
        phi = self._features(features, flat.shape[0])
        return mean + (phi @ self.weights.to(phi)).to(mean.dtype).reshape(mean.shape)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}"


class GroupBatchSampler(torch.utils.data.Sampler):
    """Batches of whole groups: each item is a tensor of the row indices of ``groups_per_batch``
    groups (the last batch may hold fewer).

    Use with ``DataLoader(TensorDataset(...), sampler=GroupBatchSampler(...), batch_size=None)``:
    each batch is then one fancy-indexing of the tensors. Shuffled per epoch from ``seed`` and
    the epoch (``set_epoch``, as Lightning calls it; otherwise counted per iteration).

    Example::

        >>> from covmodules import GroupBatchSampler
        >>> sampler = GroupBatchSampler([0, 1, 0, 2, 1], groups_per_batch=2, shuffle=False)
        >>> [b.tolist() for b in sampler]
        [[0, 2, 1, 4], [3]]
    """

    def __init__(self, groups, groups_per_batch: int, shuffle: bool = True, seed: int = 0):
        codes = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
        if codes.ndim != 1 or codes.dtype.kind not in "iu":
            raise TypeError("groups must be a 1-D sequence of integer codes")
        if len(codes) and codes.min() < 0:
            raise ValueError("groups must be non-negative codes")
        self.groups_per_batch = check_size(groups_per_batch, "groups_per_batch")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = np.argsort(codes, kind="stable")
        sizes = np.bincount(codes)
        self._rows = [torch.from_numpy(rows)
                      for rows in np.split(order, np.cumsum(sizes)[:-1]) if len(rows)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self._rows) / self.groups_per_batch)

    def __iter__(self):
        G = len(self._rows)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(G, generator=generator)
        else:
            perm = torch.arange(G)
        self.epoch += 1
        for start in range(0, G, self.groups_per_batch):
            yield torch.cat([self._rows[j] for j in perm[start:start + self.groups_per_batch]])
