r"""Compound symmetry: a common variance and a common covariance.

.. math:: \mathbf{V} = \sigma^2 \mathbf{R}, \quad
          \mathbf{R} = (1 - \rho) \mathbf{I}_n + \rho \mathbf{J}_n, \qquad
          \frac{\partial \mathbf{V}}{\partial \sigma^2} = \mathbf{R}, \quad
          \frac{\partial \mathbf{V}}{\partial \rho} = \sigma^2 (\mathbf{J}_n - \mathbf{I}_n).

Positive definite for ``sigma^2 > 0`` and ``-1/(n - 1) < rho < 1`` (see
:mod:`~covmodules.structures.equicorrelation`); nlme's ``corCompSymm`` times a variance.
"""

import torch

from ..base import Structure
from ..transforms import ExpPow2
from ..validation import check_size
from .equicorrelation import (equicorrelation, equicorrelation_transform, off_diagonal_matmul,
                              off_diagonal_ones)


class CompoundSymmetricMatrix(Structure):
    r"""Compound symmetric covariance :math:`\sigma^2 [(1 - \rho)\mathbf{I} + \rho \mathbf{J}]`.

    Parameters ``sigma^2 = exp(2 x1)`` and ``rho`` in ``(-1/(n-1), 1)``; defaults ``x = 0``.

    Example::

        >>> from covmodules import CompoundSymmetricMatrix
        >>> V = CompoundSymmetricMatrix(2)
        >>> V.set_params({"sigma^2": 2.0, "rho": 0.25})
        >>> V().detach()
        tensor([[2.0000, 0.5000],
                [0.5000, 2.0000]], dtype=torch.float64)
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.add_param("sigma^2", 0.0, ExpPow2())
        self.add_param("rho", 0.0, equicorrelation_transform(self.n))

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return nat[0] * equicorrelation(nat[1], self.n)

    def _jacobian(self, nat):
        R = equicorrelation(nat[1], self.n)
        return torch.stack([R, nat[0] * off_diagonal_ones(R)])

    def _vjp(self, nat, G):
        R = equicorrelation(nat[1], self.n)
        return torch.stack([(G * R).sum(), nat[0] * (G.sum() - torch.diagonal(G).sum())])

    def _dv_matmul(self, nat, W, transpose=False):
        JW = off_diagonal_matmul(W)
        return torch.stack([W + nat[1] * JW, nat[0] * JW])
