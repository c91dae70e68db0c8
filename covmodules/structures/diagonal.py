r"""Diagonal covariance: a separate variance at each of ``n`` positions.

.. math:: \mathbf{V} = \operatorname{diag}(\sigma^2_0, \dots, \sigma^2_{n-1}), \qquad
          \frac{\partial \mathbf{V}}{\partial \sigma^2_k} = \mathbf{e}_k \mathbf{e}_k^\top.

The ``(n, n, n)`` Jacobian is almost all zeros: the vector-Jacobian product is the diagonal
of the cotangent and ``dV/dσ²_k @ W`` is row ``k`` of ``W`` in row ``k``, so neither forms it.
"""

import torch

from ..base import Structure
from ..capabilities import DiagonalView
from ..transforms import ExpPow2
from ..validation import check_size


def diagonal_jacobian(nat: torch.Tensor) -> torch.Tensor:
    """``(n, n, n)`` derivatives of ``diag(nat)``."""
    n = nat.shape[0]
    J = nat.new_zeros(n, n, n)
    i = torch.arange(n, device=nat.device)
    J[i, i, i] = 1
    return J


def diagonal_dv_matmul(W: torch.Tensor) -> torch.Tensor:
    """``[e_k e_kᵀ @ W]_k``, shape ``(n, n, r)``."""
    n = W.shape[0]
    out = W.new_zeros(n, n, W.shape[1])
    i = torch.arange(n, device=W.device)
    out[i, i] = W
    return out


class DiagonalMatrix(Structure):
    r"""Heterogeneous variances :math:`\operatorname{diag}(\sigma^2_0, \dots, \sigma^2_{n-1})`.

    Parameters ``sigma^2[i] = exp(2 x_i)`` (alias ``sigma^2_i``, torch-openreml's name),
    defaults ``x_i = 0`` (``V = I``).

    Example::

        >>> from covmodules import DiagonalMatrix
        >>> V = DiagonalMatrix(3)
        >>> V.set_param("sigma^2[1]", 2.5)
        >>> V().diagonal().tolist()
        [1.0, 2.5, 1.0]
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        for i in range(self.n):
            self.add_param(f"sigma^2[{i}]", 0.0, ExpPow2(), alias=f"sigma^2_{i}")

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return torch.diag(nat)

    def _jacobian(self, nat):
        return diagonal_jacobian(nat)

    def _vjp(self, nat, G):
        return torch.diagonal(G)

    def _dv_matmul(self, nat, W, transpose=False):
        return diagonal_dv_matmul(W)

    def diagonal_view(self):
        """``diag(σ²)``; ``∂/∂σ²_k = d_k``."""
        return DiagonalView(lambda nat: nat, lambda nat, d: d)
