r"""Covariance layers: a neural-network mean with a structured covariance, trained end to end.

A network gives the mean :math:`f(x)`, a covariance layer gives :math:`V(\theta)`, and the loss
of a batch is the Gaussian marginal negative log-likelihood (no fixed effects profiled out)

.. math:: -\log N(y; f(x), V) = \tfrac12\left[\log|V| + r^T V^{-1} r + n\log 2\pi\right],
          \qquad r = y - f(x),

the ML loss of ``r`` with no fixed effects: one template (:meth:`CovarianceLayer.nll`,
:mod:`.base`) over the :mod:`covmodules.linalg` solvers and factors. Its cotangents are
:math:`\partial/\partial V = \tfrac12(V^{-1} - \alpha\alpha^T)` and
:math:`\partial/\partial f = -\alpha`, :math:`\alpha = V^{-1} r`. ``V`` is block diagonal over
groups, so the loss of a batch of *whole* groups is a sum over its groups, the batch losses add
up to the full-data loss, and no batch needs an ``N x N`` matrix:

- :class:`RandomIntercept` (:mod:`.intercept`): :math:`V_g = \sigma_u^2 11^T + \sigma_e^2 I`,
  closed form per group, ``O(N)``.
- :class:`GroupedCovariance` (:mod:`.grouped`): :math:`V_g = S[p_g, p_g] + \sigma^2 I`, one
  ``T x T`` structure ``S`` (e.g. AR(1) over time) at the rows' positions; the grouped solver.
- :class:`KroneckerCovariance` (:mod:`.grouped`): :math:`V_g = A \otimes B + \sigma^2 I` on a
  grid; the Kronecker solver's factor when every group is a complete grid, else the grouped
  solver.
- :class:`DeepKernel` (:mod:`.kernel`): :math:`V = \Phi\Phi^T + \sigma^2 I`, the ``Gram`` of
  network features :math:`\Phi` (``n x d``) plus a nugget; the Woodbury factor, :math:`O(n d^2)`.

Batches of whole groups come from :class:`~covmodules.sampling.GroupBatchSampler`.

Each layer owns covariance modules (``nn.Parameter``\ s on the free scale), so its parameters
train with the network's under any torch optimiser. The algebra runs in float64 whatever the
network's dtype: inputs are cast at the boundary, the loss is float64, predictions come back in
the mean's dtype.

**REML** with the network's last-layer features as ``X``: :meth:`CovarianceLayer.reml` is the
library's :class:`~covmodules.reml.REML` objective of the batch's covariance module
(:meth:`~CovarianceLayer.batch_model`), differentiable in the layer's parameters, ``y`` and ``X``.

**Prediction**: for a row of a group ``g`` seen in training, at position ``t``,
:math:`f(x) + \sum_j S[t, p_j] (V_g^{-1} r_g)_j` with ``r_g`` the group's training residuals at
the fitted parameters (:meth:`~CovarianceLayer.fit_blups`); for a random intercept this is
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

from ..sampling import GroupBatchSampler
from .base import CovarianceLayer, gaussian_nll
from .grouped import GroupedCovariance, KroneckerCovariance
from .intercept import RandomIntercept
from .kernel import DeepKernel

__all__ = ["CovarianceLayer", "RandomIntercept", "GroupedCovariance", "KroneckerCovariance",
           "DeepKernel", "GroupBatchSampler", "gaussian_nll"]
