r"""Banded Toeplitz (stationary) covariance, positive definite by construction.

The correlations are those of a moving average of order ``q = bands``,
:math:`x_i = \sum_{j=0}^{q} \theta_j \varepsilon_{i-j}` with :math:`\theta_0 = 1` and free
:math:`\theta_1, \dots, \theta_q`:

.. math:: c_h = \sum_{j=0}^{q-h} \theta_j \theta_{j+h}, \qquad r_h = c_h / c_0 \ (h \le q),
          \quad r_h = 0 \ (h > q), \qquad V_{ij} = \sigma^2 r_{|i-j|}.

Why it is positive definite for every real ``theta``: with
:math:`\mathbf{C}` the ``n x (n + q)`` banded Toeplitz matrix mapping
:math:`(\varepsilon_{1-q}, \dots, \varepsilon_n)` to :math:`(x_1, \dots, x_n)`,
:math:`\mathbf{V} = \sigma^2 \mathbf{C}\mathbf{C}^\top / c_0`. The last ``n`` columns of
:math:`\mathbf{C}` form a unit lower triangular matrix (the leading coefficient
:math:`\theta_0 = 1`), so :math:`\mathbf{C}` has full row rank and
:math:`\mathbf{C}\mathbf{C}^\top` is positive definite; :math:`c_0 \ge 1 > 0`.

Closed-form derivatives, for :math:`k \ge 1`:

.. math:: \frac{\partial c_h}{\partial \theta_k} = \theta_{k-h} [k \ge h]
          + \theta_{k+h} [k + h \le q], \qquad
          \frac{\partial r_h}{\partial \theta_k}
          = \frac{c_0 \, \partial c_h / \partial \theta_k - 2 \theta_k c_h}{c_0^2},

and :math:`\partial \mathbf{V} / \partial \theta_k = \sigma^2 \sum_{h=1}^{q}
(\partial r_h / \partial \theta_k) \mathbf{B}_h` with :math:`\mathbf{B}_h` the indicator of
lag ``h``; products with :math:`\mathbf{B}_h` are shifts, so ``dV @ W`` costs ``O(q² n r)``.
"""

import torch

from ..base import Structure
from ..transforms import ExpPow2, Identity
from ..validation import check_size


class ToeplitzMatrix(Structure):
    r"""Banded stationary covariance :math:`\sigma^2 r_{|i-j|}` with MA(``bands``) correlations.

    Parameters ``sigma^2 = exp(2 x)`` then ``theta[1]``, ..., ``theta[bands]`` (identity
    transform); defaults ``0`` (``V = I``). Requires ``1 <= bands < n``.

    Example::

        >>> from covmodules import ToeplitzMatrix
        >>> V = ToeplitzMatrix(4, bands=1)
        >>> V.set_param("theta[1]", 1.0)          # MA(1) with theta = 1: r_1 = 1/2
        >>> V().detach()
        tensor([[1.0000, 0.5000, 0.0000, 0.0000],
                [0.5000, 1.0000, 0.5000, 0.0000],
                [0.0000, 0.5000, 1.0000, 0.5000],
                [0.0000, 0.0000, 0.5000, 1.0000]], dtype=torch.float64)
    """

    def __init__(self, n: int, bands: int):
        super().__init__()
        self.n = check_size(n, "n")
        self.bands = check_size(bands, "bands")
        if self.bands >= self.n:
            raise ValueError(f"bands must be < n = {self.n}, got {self.bands}")
        self.add_param("sigma^2", 0.0, ExpPow2())
        for k in range(1, self.bands + 1):
            self.add_param(f"theta[{k}]", 0.0, Identity())

    @property
    def shape(self):
        return (self.n, self.n)

    def _lags(self, device):
        i = torch.arange(self.n, device=device)
        return (i[:, None] - i[None, :]).abs()

    def _ma(self, nat):
        """MA coefficients ``theta_0..theta_q`` and autocovariances ``c_0..c_q``."""
        q = self.bands
        t = torch.cat([nat.new_ones(1), nat[1:]])
        c = torch.stack([(t[:q + 1 - h] * t[h:]).sum() for h in range(q + 1)])
        return t, c

    def _pad(self, x):
        """Extend the last axis (lags ``0..q``) with zeros to lags ``0..n-1``."""
        return torch.cat([x, x.new_zeros(*x.shape[:-1], self.n - self.bands - 1)], -1)

    def _correlations_and_derivatives(self, nat):
        """``r_h`` (``q + 1``) and ``dr_h / dtheta_k`` (``q x (q + 1)``)."""
        q = self.bands
        t, c = self._ma(nat)
        dc = t.new_zeros(q + 1, q + 1)
        for h in range(q + 1):
            dc[h, h:] += t[:q + 1 - h]
            dc[h, :q + 1 - h] += t[h:]
        dc = dc[:, 1:].T
        dr = (c[0] * dc - 2 * t[1:, None] * c[None, :]) / c[0] ** 2
        return c / c[0], dr

    def _evaluate(self, nat):
        _, c = self._ma(nat)
        return nat[0] * self._pad(c / c[0])[self._lags(nat.device)]

    def _jacobian(self, nat):
        r, dr = self._correlations_and_derivatives(nat)
        lags = self._lags(nat.device)
        return torch.cat([self._pad(r)[lags][None], nat[0] * self._pad(dr)[:, lags]])

    def _vjp(self, nat, G):
        r, dr = self._correlations_and_derivatives(nat)
        s = G.new_zeros(self.n).index_add_(0, self._lags(G.device).flatten(), G.flatten())
        s = s[:self.bands + 1]
        return torch.cat([(r * s).sum()[None], nat[0] * (dr @ s)])

    def _dv_matmul(self, nat, W, transpose=False):
        r, dr = self._correlations_and_derivatives(nat)
        shifted = [W]
        for h in range(1, self.bands + 1):
            S = torch.zeros_like(W)
            S[:-h] += W[h:]
            S[h:] += W[:-h]
            shifted.append(S)
        BW = torch.stack(shifted)
        return torch.cat([torch.einsum("h,hnr->nr", r, BW)[None],
                          nat[0] * torch.einsum("kh,hnr->knr", dr, BW)])
