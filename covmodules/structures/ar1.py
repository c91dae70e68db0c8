"""First-order autoregressive covariance on equally spaced positions."""

import torch

from ..base import Structure
from ..transforms import ExpPow2, correlation
from ..validation import check_size


def lag_matrix(n: int, dtype, device) -> torch.Tensor:
    """``|i - j|`` for ``i, j < n`` as a float matrix."""
    i = torch.arange(n, dtype=dtype, device=device)
    return (i[:, None] - i[None, :]).abs()


class AR1Matrix(Structure):
    r"""AR(1) covariance :math:`V_{ij} = \sigma^2 \rho^{|i-j|}`.

    Parameters ``sigma^2 = exp(2 x1)`` and ``rho = 2 sigmoid(x2) - 1``; defaults ``x = 0``
    (``sigma^2 = 1``, ``rho = 0``). The derivative is finite everywhere, ``rho = 0`` included.

    Example::

        >>> import torch
        >>> from covmodules import AR1Matrix
        >>> AR1Matrix(2)(torch.tensor([1.0, 1.0]))   # [[e^2, e^2 tanh(1/2)], ...]
        tensor([[7.3891, 3.4146],
                [3.4146, 7.3891]])
    """

    def __init__(self, n: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.add_param("sigma^2", 0.0, ExpPow2())
        self.add_param("rho", 0.0, correlation(-1.0))

    @property
    def shape(self):
        return (self.n, self.n)

    def _correlation_and_derivative(self, rho):
        lag = lag_matrix(self.n, rho.dtype, rho.device)
        R = torch.pow(rho, lag)
        dR = lag * torch.pow(rho, (lag - 1).clamp(min=0))
        return R, dR

    def _evaluate(self, nat):
        return nat[0] * torch.pow(nat[1], lag_matrix(self.n, nat.dtype, nat.device))

    def _jacobian(self, nat):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([R, nat[0] * dR])

    def _vjp(self, nat, G):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([(G * R).sum(), nat[0] * (G * dR).sum()])

    def _dv_matmul(self, nat, W, transpose=False):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([R @ W, nat[0] * (dR @ W)])
