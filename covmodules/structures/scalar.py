"""Scalar multiple of the identity."""

import torch

from ..base import Structure
from ..capabilities import DiagonalView, RepeatedBlock
from ..transforms import ExpPow2
from ..validation import check_size


class ScalarMatrix(Structure):
    r"""Scaled identity :math:`\sigma^2 \mathbf{I}_n` (iid effects or residuals).

    Parameter ``sigma^2 = exp(2 x)``, default ``x = 0`` (``sigma^2 = 1``).

    Example::

        >>> import torch
        >>> from covmodules import ScalarMatrix
        >>> ScalarMatrix(2)(torch.tensor([0.5]))
        tensor([[2.7183, 0.0000],
                [0.0000, 2.7183]])
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.add_param("sigma^2", 0.0, ExpPow2())

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return torch.diag(nat[0].expand(self.n))

    def _jacobian(self, nat):
        return torch.eye(self.n, dtype=nat.dtype, device=nat.device)[None]

    def _matmul(self, nat, W):
        return nat[0] * W

    def _vjp(self, nat, G):
        return torch.diagonal(G).sum()[None]

    def _dv_matmul(self, nat, W, transpose=False):
        return W[None]

    def diagonal_view(self):
        """``σ² 1``, constant; ``∂/∂σ² = Σ_i d_i``."""
        return DiagonalView(lambda nat: nat[0].expand(self.n), lambda nat, d: d.sum()[None],
                            constant=True)

    def repeated_block_view(self):
        """``σ² I_n = I_n ⊗ σ²``: the block is ``ScalarMatrix(1)`` on the same parameter."""
        return RepeatedBlock(self.n, ScalarMatrix(1))
