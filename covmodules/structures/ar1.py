"""First-order autoregressive covariance on equally spaced positions."""

import numpy as np
import torch

from ..base import Structure
from ..transforms import ExpPow2, correlation
from ..validation import check_size


def lag_index(n: int, device) -> torch.Tensor:
    """``|i - j|`` for ``i, j < n`` as a long matrix."""
    i = torch.arange(n, device=device)
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
        """``ρ^|i-j|`` and ``|i-j| ρ^(|i-j|-1)``: ``n`` powers gathered into ``n x n``."""
        k = torch.arange(self.n, dtype=rho.dtype, device=rho.device)
        lag = lag_index(self.n, rho.device)
        return torch.pow(rho, k)[lag], (k * torch.pow(rho, (k - 1).clamp(min=0)))[lag]

    def _evaluate(self, nat):
        k = torch.arange(self.n, dtype=nat.dtype, device=nat.device)
        return nat[0] * torch.pow(nat[1], k)[lag_index(self.n, nat.device)]

    def _jacobian(self, nat):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([R, nat[0] * dR])

    def _vjp(self, nat, G):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([(G * R).sum(), nat[0] * (G * dR).sum()])

    def _dv_matmul(self, nat, W, transpose=False):
        R, dR = self._correlation_and_derivative(nat[1])
        return torch.stack([R @ W, nat[0] * (dR @ W)])

    def _eigh(self, nat, V):
        """Eigenpairs ``(μ_j, q_j)`` of the tridiagonal ``T = (1 - ρ²) R⁻¹ = tridiag(-ρ; 1,
        1 + ρ², ..., 1 + ρ², 1; -ρ)`` (LAPACK ``stevd``, ``O(n²)``): ``λ_j = σ² (1 - ρ²) / μ_j``.
        Those carry a relative error of about ``ε cond(R) / 4``, ``cond(R) ≈ ((1 + |ρ|) /
        (1 - |ρ|))²``, in the largest ``λ`` (a dense ``eigh`` has it in the smallest); beyond
        ``|ρ| = 0.98`` (``cond > 10⁴``) the Rayleigh quotients ``q_jᵀ V q_j`` (``n³``) replace
        them. ``V``'s own ``eigh`` off the CPU.

        >>> import torch
        >>> ar1, nat = AR1Matrix(5), torch.tensor([2.0, 0.6], dtype=torch.float64)
        >>> V = ar1._evaluate(nat)
        >>> lam, Q = ar1._eigh(nat, V)
        >>> torch.allclose((Q * lam) @ Q.T, V), torch.allclose(Q.T @ Q, torch.eye(5).double())
        (True, True)
        """
        if V.device.type != "cpu":
            return torch.linalg.eigh(V)
        from scipy.linalg import eigh_tridiagonal

        from ..threads import numpy_blas_like_torch

        rho = float(nat[1])
        d = np.full(self.n, 1 + rho * rho)
        d[0] = d[-1] = 1.0 if self.n > 1 else (1 - rho) * (1 + rho)
        with numpy_blas_like_torch():
            mu, vectors = eigh_tridiagonal(d, np.full(self.n - 1, -rho), lapack_driver="stevd")
        Q = torch.from_numpy(vectors).to(V.dtype)
        if abs(rho) > 0.98:
            return ((V @ Q) * Q).sum(0), Q
        return torch.from_numpy(float(nat[0]) * (1 - rho) * (1 + rho) / mu).to(V.dtype), Q
