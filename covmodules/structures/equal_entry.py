r"""A matrix of equal entries (rectangular allowed).

.. math:: \mathbf{V} = \sigma^2 \mathbf{J}_{n \times m}, \qquad
          \frac{\partial \mathbf{V}}{\partial \sigma^2} = \mathbf{J}_{n \times m},

so ``dV/dσ² @ W`` repeats the column sums of ``W`` in every row.
"""

import torch

from ..base import Structure
from ..transforms import ExpPow2
from ..validation import check_size


class EqualEntryMatrix(Structure):
    r"""All entries equal to :math:`\sigma^2` (``n x m``, ``m = n`` by default).

    Parameter ``sigma^2 = exp(2 x)``, default ``x = 0``.

    Example::

        >>> from covmodules import EqualEntryMatrix
        >>> V = EqualEntryMatrix(2, 3)
        >>> V.set_param("sigma^2", 2.0)
        >>> V().detach()
        tensor([[2., 2., 2.],
                [2., 2., 2.]], dtype=torch.float64)
    """

    def __init__(self, n: int, m: int | None = None):
        super().__init__()
        self.n = check_size(n, "n")
        self.m = self.n if m is None else check_size(m, "m")
        self.add_param("sigma^2", 0.0, ExpPow2())

    @property
    def shape(self):
        return (self.n, self.m)

    def _evaluate(self, nat):
        return nat[0] * torch.ones(self.n, self.m, dtype=nat.dtype, device=nat.device)

    def _jacobian(self, nat):
        return torch.ones(1, self.n, self.m, dtype=nat.dtype, device=nat.device)

    def _vjp(self, nat, G):
        return G.sum()[None]

    def _dv_matmul(self, nat, W, transpose=False):
        rows = self.m if transpose else self.n
        return W.sum(0, keepdim=True).repeat(rows, 1)[None]
