r"""Factor-analytic covariance: ``k`` common factors plus specific variances.

.. math:: \mathbf{V} = \boldsymbol{\Lambda}\boldsymbol{\Lambda}^\top
          + \operatorname{diag}(\psi_0, \dots, \psi_{n-1}), \qquad
          \frac{\partial \mathbf{V}}{\partial \lambda_{ab}}
          = \mathbf{e}_a \boldsymbol{\lambda}_b^\top + \boldsymbol{\lambda}_b \mathbf{e}_a^\top,
          \qquad
          \frac{\partial \mathbf{V}}{\partial \psi_k} = \mathbf{e}_k \mathbf{e}_k^\top,

with :math:`\boldsymbol{\Lambda}` ``n x k`` lower trapezoidal (:math:`\lambda_{ij} = 0` for
``i < j``), which removes the rotational non-identifiability of the loadings (ASReml ``fa``).
"""

import torch

from ..base import Structure
from ..capabilities import LowRankDiagonalView
from ..natural import covariance_summary
from ..transforms import ExpPow2, Identity
from ..validation import check_size
from ._triangular import (fill, index_tensors, outer_dv_matmul, outer_jacobian, outer_vjp,
                          tril_index)
from .diagonal import diagonal_dv_matmul, diagonal_jacobian


class FactorAnalyticMatrix(Structure):
    r"""Factor-analytic covariance :math:`\boldsymbol{\Lambda}\boldsymbol{\Lambda}^\top + \Psi`.

    Parameters ``lambda[i,j]`` (``i >= j``, ``j < k``, column-major, identity transform;
    defaults ``1`` on ``i == j`` and ``0`` elsewhere, since all-zero loadings are a stationary
    point), then ``psi[i] = exp(2 x_i)`` (defaults ``x_i = 0``). Requires ``1 <= k <= n``.

    Example::

        >>> from covmodules import FactorAnalyticMatrix
        >>> V = FactorAnalyticMatrix(3, 1)
        >>> V.param_names
        ['lambda[0,0]', 'lambda[1,0]', 'lambda[2,0]', 'psi[0]', 'psi[1]', 'psi[2]']
        >>> V.set_params({"lambda[1,0]": 0.5, "lambda[2,0]": -1.0})
        >>> V().detach()
        tensor([[ 2.0000,  0.5000, -1.0000],
                [ 0.5000,  1.2500, -0.5000],
                [-1.0000, -0.5000,  2.0000]], dtype=torch.float64)
    """

    def __init__(self, n: int, k: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.k = check_size(k, "k")
        if self.k > self.n:
            raise ValueError(f"k must be <= n = {self.n}, got {self.k}")
        self._rows, self._cols = tril_index(self.n, self.k)
        for i, j in zip(self._rows, self._cols):
            self.add_param(f"lambda[{i},{j}]", 1.0 if i == j else 0.0, Identity(),
                               "loading")
        for i in range(self.n):
            self.add_param(f"psi[{i}]", 0.0, ExpPow2())

    @property
    def shape(self):
        return (self.n, self.n)

    def _parts(self, nat):
        rows, cols = index_tensors(self._rows, self._cols, nat.device)
        loadings = fill(nat[:len(self._rows)], rows, cols, (self.n, self.k))
        return loadings, nat[len(self._rows):], rows, cols

    def _evaluate(self, nat):
        loadings, psi, _, _ = self._parts(nat)
        return loadings @ loadings.T + torch.diag(psi)

    def natural_scale(self, nat):
        """Variances ``sigma^2[i]``, SDs ``sd[i]`` and correlations ``rho[i,j]`` of ``V``."""
        return covariance_summary(self._evaluate(nat))

    def _jacobian(self, nat):
        loadings, psi, rows, cols = self._parts(nat)
        return torch.cat([outer_jacobian(loadings, rows, cols), diagonal_jacobian(psi)])

    def _vjp(self, nat, G):
        loadings, _, rows, cols = self._parts(nat)
        return torch.cat([outer_vjp(loadings, G, rows, cols), torch.diagonal(G)])

    def _dv_matmul(self, nat, W, transpose=False):
        loadings, _, rows, cols = self._parts(nat)
        return torch.cat([outer_dv_matmul(loadings, W, rows, cols), diagonal_dv_matmul(W)])

    def low_rank_diagonal_view(self):
        """``Λ Λᵀ + diag(ψ)``: the loadings and the specific variances."""
        return LowRankDiagonalView(lambda nat: self._parts(nat)[:2])
