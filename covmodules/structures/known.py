r"""A known positive definite matrix times a variance (e.g. a genomic relationship matrix).

.. math:: \mathbf{V} = \sigma^2 \mathbf{K}, \qquad
          \frac{\partial \mathbf{V}}{\partial \sigma^2} = \mathbf{K}.
"""

import torch

from ..base import Structure
from ..transforms import ExpPow2
from ..validation import as_matrix


class KnownMatrix(Structure):
    r"""Scaled known matrix :math:`\sigma^2 \mathbf{K}` (pedigree / genomic relationships).

    ``K`` must be a finite, square, symmetric, positive definite matrix; it is kept as a
    buffer. Parameter ``sigma^2 = exp(2 x)``, default ``x = 0``.

    Example::

        >>> import torch
        >>> from covmodules import KnownMatrix
        >>> V = KnownMatrix(torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
        >>> V.set_param("sigma^2", 2.0)
        >>> V().detach()
        tensor([[2., 1.],
                [1., 2.]], dtype=torch.float64)
    """

    def __init__(self, K):
        super().__init__()
        K = as_matrix(K, "K", positive_definite=True)
        self.register_buffer("K", K.to(torch.float64).clone())
        self.add_param("sigma^2", 0.0, ExpPow2())

    @property
    def shape(self):
        return tuple(self.K.shape)

    def _evaluate(self, nat):
        return nat[0] * self.K.to(nat)

    def _jacobian(self, nat):
        return self.K.to(nat)[None]

    def _vjp(self, nat, G):
        return (G * self.K.to(G)).sum()[None]

    def _dv_matmul(self, nat, W, transpose=False):
        K = self.K.to(W)
        return ((K.T if transpose else K) @ W)[None]
