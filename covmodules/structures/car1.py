r"""Continuous-time AR(1) covariance on given, possibly unequally spaced, times.

.. math:: V_{ij} = \sigma^2 \phi^{|t_i - t_j|}, \qquad
          \frac{\partial V_{ij}}{\partial \phi} = \sigma^2 |t_i - t_j| \, \phi^{|t_i - t_j| - 1},

with ``0 < phi < 1`` the correlation at unit time distance (nlme's ``corCAR1``); the
``phi``-derivative is zero on the diagonal (distance 0).
"""

import torch

from ..base import Structure
from ..transforms import ExpPow2, Sigmoid
from ..validation import as_vector


class CAR1Matrix(Structure):
    r"""CAR(1) covariance :math:`\sigma^2 \phi^{|t_i - t_j|}` on the times ``times``.

    Parameters ``sigma^2 = exp(2 x1)`` and ``phi = sigmoid(x2)``; defaults ``x = 0``
    (``sigma^2 = 1``, ``phi = 1/2``). ``times`` (1-D, finite) is kept as a buffer.

    Example::

        >>> from covmodules import CAR1Matrix
        >>> V = CAR1Matrix([0.0, 1.0, 3.0])
        >>> V().detach()
        tensor([[1.0000, 0.5000, 0.1250],
                [0.5000, 1.0000, 0.2500],
                [0.1250, 0.2500, 1.0000]], dtype=torch.float64)
    """

    def __init__(self, times):
        super().__init__()
        times = as_vector(times, "times")
        if times.numel() == 0:
            raise ValueError("times must not be empty")
        self.register_buffer("times", times.to(torch.float64).clone())
        self.add_param("sigma^2", 0.0, ExpPow2())
        self.add_param("phi", 0.0, Sigmoid())

    @property
    def n(self) -> int:
        return self.times.numel()

    @property
    def shape(self):
        return (self.n, self.n)

    def _distances(self, nat):
        t = self.times.to(nat)
        return (t[:, None] - t[None, :]).abs()

    def _correlation_and_derivative(self, nat):
        D = self._distances(nat)
        phi = nat[1]
        dR = torch.where(D > 0, D * torch.pow(phi, D - 1), torch.zeros_like(D))
        return torch.pow(phi, D), dR

    def _evaluate(self, nat):
        return nat[0] * torch.pow(nat[1], self._distances(nat))

    def _jacobian(self, nat):
        R, dR = self._correlation_and_derivative(nat)
        return torch.stack([R, nat[0] * dR])

    def _vjp(self, nat, G):
        R, dR = self._correlation_and_derivative(nat)
        return torch.stack([(G * R).sum(), nat[0] * (G * dR).sum()])

    def _dv_matmul(self, nat, W, transpose=False):
        R, dR = self._correlation_and_derivative(nat)
        return torch.stack([R @ W, nat[0] * (dR @ W)])
