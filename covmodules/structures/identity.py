"""Identity matrix (no parameters)."""

import torch

from ..base import Structure
from ..capabilities import DiagonalView, RepeatedBlock
from ..validation import check_size


class IdentityMatrix(Structure):
    r"""The ``n x n`` identity matrix :math:`\mathbf{I}_n`; it has no parameters.

    Example::

        >>> from covmodules import IdentityMatrix
        >>> IdentityMatrix(2)()
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.float64)
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return torch.eye(self.n, dtype=nat.dtype, device=nat.device)

    def _matmul(self, nat, W):
        return W

    def _jacobian(self, nat):
        return nat.new_zeros(0, self.n, self.n)

    def _dv_matmul(self, nat, W, transpose=False):
        return W.new_zeros(0, self.n, W.shape[1])

    def diagonal_view(self):
        """Ones, constant; no parameters to differentiate."""
        return DiagonalView(lambda nat: nat.new_ones(self.n), lambda nat, d: d.new_zeros(0),
                            constant=True)

    def repeated_block_view(self):
        """``I_n = I_n ⊗ I_1``."""
        return RepeatedBlock(self.n, IdentityMatrix(1))
