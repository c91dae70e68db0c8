r"""Equicorrelation: a correlation matrix with one common off-diagonal correlation.

.. math:: \mathbf{R} = (1 - \rho) \mathbf{I}_n + \rho \mathbf{J}_n, \qquad
          \frac{\partial \mathbf{R}}{\partial \rho} = \mathbf{J}_n - \mathbf{I}_n.

Its eigenvalues are ``1 + (n - 1) rho`` (once) and ``1 - rho``, so it is positive definite
exactly for ``-1/(n - 1) < rho < 1``; the transform maps the real line onto that interval:
``rho = -1/(n-1) + (1 + 1/(n-1)) sigmoid(x)`` (``2 sigmoid(x) - 1`` for ``n <= 2``).
"""

import torch

from ..base import Structure
from ..transforms import Chain, correlation
from ..validation import check_size


def equicorrelation_transform(n: int) -> Chain:
    """The correlation transform onto ``(-1/(n-1), 1)`` (``(-1, 1)`` for ``n = 1``)."""
    return correlation(-1.0 / (n - 1) if n > 1 else -1.0)


def equicorrelation(rho: torch.Tensor, n: int) -> torch.Tensor:
    """``(1 - rho) I + rho J`` in the dtype and device of ``rho``."""
    eye = torch.eye(n, dtype=rho.dtype, device=rho.device)
    return rho * torch.ones_like(eye) + (1 - rho) * eye


def off_diagonal_ones(like: torch.Tensor) -> torch.Tensor:
    """``J - I`` shaped, typed and placed like the square matrix ``like``."""
    return torch.ones_like(like) - torch.eye(like.shape[0], dtype=like.dtype, device=like.device)


def off_diagonal_matmul(W: torch.Tensor) -> torch.Tensor:
    """``(J - I) @ W``."""
    return W.sum(0, keepdim=True) - W


class EquicorrelationMatrix(Structure):
    r"""Equicorrelation matrix :math:`(1 - \rho)\mathbf{I}_n + \rho \mathbf{J}_n`.

    Parameter ``rho`` in ``(-1/(n-1), 1)``, default ``x = 0``.

    Example::

        >>> from covmodules import EquicorrelationMatrix
        >>> R = EquicorrelationMatrix(3)
        >>> R.set_param("rho", 0.5)
        >>> R().detach()
        tensor([[1.0000, 0.5000, 0.5000],
                [0.5000, 1.0000, 0.5000],
                [0.5000, 0.5000, 1.0000]], dtype=torch.float64)
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.add_param("rho", 0.0, equicorrelation_transform(self.n))

    @property
    def shape(self):
        return (self.n, self.n)

    def _evaluate(self, nat):
        return equicorrelation(nat[0], self.n)

    def _jacobian(self, nat):
        return off_diagonal_ones(nat.new_empty(self.n, self.n))[None]

    def _vjp(self, nat, G):
        return (G.sum() - torch.diagonal(G).sum())[None]

    def _dv_matmul(self, nat, W, transpose=False):
        return off_diagonal_matmul(W)[None]
