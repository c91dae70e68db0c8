r"""Random intercepts of a categorical feature: :math:`V_g = \sigma_u^2 11^T + \sigma_e^2 I`.

With :math:`d_g = \sigma_e^2 + n_g\sigma_u^2` and :math:`s_g = 1^T r_g` the loss is closed form
per group, ``O(N)``: :math:`\log|V_g| = (n_g - 1)\log\sigma_e^2 + \log d_g`,
:math:`r_g^T V_g^{-1} r_g = (r_g^T r_g - \sigma_u^2 s_g^2 / d_g) / \sigma_e^2`, and the BLUP is
:math:`\hat u_g = \sigma_u^2 1^T V_g^{-1} r_g = \sigma_u^2 s_g / d_g`. So is its gradient, with
:math:`\alpha = V^{-1} r = (r - \hat u_g) / \sigma_e^2` (the cotangent of ``r``):

.. math::

    \frac{\partial(-l)}{\partial\sigma_u^2} = \tfrac12 \sum_g \Big(\frac{n_g}{d_g}
        - \frac{s_g^2}{d_g^2}\Big), \qquad
    \frac{\partial(-l)}{\partial\sigma_e^2} = \tfrac12 \Big[\sum_g \Big(\frac{n_g - 1}{\sigma_e^2}
        + \frac{1}{d_g}\Big) - \alpha^T\alpha\Big],

taken by the solvers' "state forward, closed-form backward"
(:class:`~covmodules.linalg.base.NegLogLik`). The solvers handle this ``V`` too (Woodbury with
one column of ``Z`` per group, or grouped), but in ``O(n q)`` and ``Σ_g n_g³`` with per-batch
set-up: on LMMNN-sized batches (10 to 40 groups, 1,000 to 3,000 rows) two to four times slower
for the loss and its backward, and about a hundred times slower for the BLUPs of 80,000
training rows. So this layer keeps its closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..linalg.base import NegLogLik
from ..linalg.statistics import GLSStatistics
from ..model import MixedModel
from ..structures.block_design import BlockDesignMatrix
from ..structures.scalar import ScalarMatrix
from ..validation import as_data
from .base import CovarianceLayer, matrix64

__all__ = ["RandomIntercept"]


@dataclass
class InterceptState:
    """``-l`` of a batch's residuals at ``values = [σ_u², σ_e²]`` and what the gradient needs
    (the level counts ``n_g``, sums ``s_g`` and ``d_g`` of the groups present); ``Py`` is
    ``α = V⁻¹ r``, what :class:`~covmodules.linalg.base.NegLogLik` reads."""

    count: torch.Tensor
    s: torch.Tensor
    d: torch.Tensor
    Py: torch.Tensor
    neg_loglik: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, r: torch.Tensor, codes: torch.Tensor, num_levels: int
           ) -> "InterceptState":
        su, se = values
        count, s, d = level_sums(su, se, r, codes, num_levels)
        alpha = (r - (su * s / d)[codes]) / se
        present = count > 0
        count, s, d = count[present], s[present], d[present]
        logdet = (r.numel() - count.numel()) * torch.log(se) + torch.log(d).sum()
        quad = (r @ r - su * (s ** 2 / d).sum()) / se
        neg = GLSStatistics.of_residuals(logdet, quad, r.numel()).finish("ml").neg_loglik
        return cls(count, s, d, alpha, neg)

    def cotangent(self, values: torch.Tensor) -> torch.Tensor:
        """``[∂(-l)/∂σ_u², ∂(-l)/∂σ_e²]`` (module docstring)."""
        se, count, s, d, alpha = values[1], self.count, self.s, self.d, self.Py
        g_su = (count / d - (s / d) ** 2).sum()
        g_se = ((count - 1) / se + 1 / d).sum() - alpha @ alpha
        return 0.5 * torch.stack([g_su, g_se])


def level_sums(su, se, r, codes, num_levels: int):
    """``n_g``, ``s_g = 1ᵀ r_g`` and ``d_g = σ_e² + n_g σ_u²`` of every level."""
    count = torch.bincount(codes, minlength=num_levels).to(r.dtype)
    s = r.new_zeros(num_levels).index_add_(0, codes, r)
    return count, s, se + count * su


class RandomIntercept(CovarianceLayer):
    r"""Random intercepts of a categorical feature: :math:`V_g = \sigma_u^2 11^T + \sigma_e^2 I`.

    Parameters ``intercept/sigma^2`` (:math:`\sigma_u^2`) and ``residual/sigma^2``
    (:math:`\sigma_e^2`), each a ``ScalarMatrix(1)``. The loss, its gradients and the BLUPs
    :math:`\hat u_g = \sigma_u^2 s_g / (\sigma_e^2 + n_g \sigma_u^2)` are closed form per group,
    ``O(N)`` (see the module docstring). A batch is indexed by its group codes:
    ``nll(y, mean, groups)``, ``fit_blups(y, mean, groups)``, ``predict(mean, groups)``.

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

    def _values(self) -> torch.Tensor:
        """``[σ_u², σ_e²]`` in float64; gradients reach the layer's parameters."""
        return torch.cat([matrix64(self.intercept)[0], matrix64(self.residual)[0]])

    def _index(self, n, groups, *, whole):
        return (self._batch_codes(groups, n) if whole else self._codes(groups, n),)

    def _neg_loglik(self, r, codes):
        fixed = r.detach()
        return NegLogLik.apply(
            self._values(), r, r.new_zeros(r.shape[0], 0),
            lambda values: InterceptState.of(values, fixed, codes, self.num_levels),
            lambda values, state: state.cotangent(values))

    def _store(self, r, codes):
        su, se = self._values()
        count, s, d = level_sums(su, se, r, codes, self.num_levels)
        self.blup.copy_(su * s / d)
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
        Z = BlockDesignMatrix(local.cpu(), torch.ones(n, 1), q)
        model = MixedModel(random={"intercept": (Z, ScalarMatrix(q))}, residual=ScalarMatrix(n))
        return self._mirror(model)

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"
