r"""Heterogeneous-variance correlation structures (glmmTMB's ``cs`` and ``toep``).

.. math:: \mathbf{V} = \mathbf{D} \mathbf{R}(\rho) \mathbf{D}, \qquad
          \mathbf{D} = \operatorname{diag}(\sigma_0, \dots, \sigma_{n-1}),

with one variance ``sigma^2[i] = exp(2 x_i)`` per position and ``R`` the compound-symmetric
correlation ``(1 - rho) I + rho J`` (``rho`` in ``(-1/(n-1), 1)``) or a Toeplitz correlation
``R_ij = rho[|i - j|]`` with one correlation per lag in ``(-1, 1)`` (glmmTMB: positive
definiteness is not guaranteed by the parameters, only needed at the estimates). Derivatives
come from autograd on the construction (:class:`~covmodules.SimpleMatrix`).
"""

from functools import partial

import torch

from ..transforms import ExpPow2, correlation
from ..validation import check_size
from .equicorrelation import equicorrelation, equicorrelation_transform
from .simple import SimpleMatrix

__all__ = ["HeterogeneousCSMatrix", "HeterogeneousToeplitzMatrix"]


def _variances(n: int) -> dict:
    return {f"sigma^2[{i}]": (0.0, ExpPow2()) for i in range(n)}


def _scaled(theta: torch.Tensor, R: torch.Tensor, n: int) -> torch.Tensor:
    sd = theta[:n].sqrt()
    return sd[:, None] * R * sd[None, :]


def _cs(theta: torch.Tensor, n: int) -> torch.Tensor:
    return _scaled(theta, equicorrelation(theta[n], n), n)


def _toeplitz(theta: torch.Tensor, n: int) -> torch.Tensor:
    lag = torch.arange(n, device=theta.device)
    lag = (lag[:, None] - lag[None, :]).abs()
    r = torch.cat([torch.ones(1, dtype=theta.dtype, device=theta.device), theta[n:]])
    return _scaled(theta, r[lag], n)


class HeterogeneousCSMatrix(SimpleMatrix):
    r"""``D [(1 - rho) I + rho J] D``: one variance per position, one common correlation.

    >>> V = HeterogeneousCSMatrix(2)
    >>> V.set_param("sigma^2[1]", 4.0); V.set_param("rho", 0.5)
    >>> V().detach().round(decimals=12).tolist()
    [[1.0, 1.0], [1.0, 4.0]]
    """

    def __init__(self, n: int):
        n = check_size(n, "n")
        super().__init__(partial(_cs, n=n), (n, n),
                         {**_variances(n), "rho": (0.0, equicorrelation_transform(n))})


class HeterogeneousToeplitzMatrix(SimpleMatrix):
    r"""``D R D`` with ``R_ij = rho[|i - j|]``: one variance per position, one correlation
    per lag (``rho[1]``, ..., ``rho[n-1]``).

    >>> V = HeterogeneousToeplitzMatrix(3)
    >>> V.set_param("rho[1]", 0.5)
    >>> V().detach()[0]
    tensor([1.0000, 0.5000, 0.0000], dtype=torch.float64)
    """

    def __init__(self, n: int):
        n = check_size(n, "n")
        lags = {f"rho[{h}]": (0.0, correlation()) for h in range(1, n)}
        super().__init__(partial(_toeplitz, n=n), (n, n), {**_variances(n), **lags})
