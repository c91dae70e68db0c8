r"""torchmetrics metrics for REML models.

:class:`REMLStatistics` accumulates the sufficient statistics of the REML log-likelihood over
batches of whole groups (``V`` block diagonal over them):

.. math::

    \log|V| = \sum_i \log|V_i|,\quad A = \sum_i X_i^T V_i^{-1} X_i,\quad
    b = \sum_i X_i^T V_i^{-1} y_i,\quad c = \sum_i y_i^T V_i^{-1} y_i,

    -2 l_R = \log|V| + \log|A| + c - b^T A^{-1} b + (n - p) \log 2\pi .

Every state is a sum (``dist_reduce_fx="sum"``), so the statistics of batches on different
devices or processes add up to those of all the data.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric

__all__ = ["REMLStatistics"]


class REMLStatistics(Metric):
    """REML (or ML) log-likelihood, on R's scale, of all the groups seen by :meth:`update`.

    ``update(V, y, X)`` takes one batch of whole groups: its covariance ``V`` (n_i × n_i),
    response and fixed-effects design. ``compute()`` returns the log-likelihood with the GLS
    estimate of the fixed effects from all batches; columns of ``X`` aliased in the pooled
    ``A`` (e.g. levels absent from the data) are left out, as the REML engine does.

    Example::

        >>> import torch
        >>> metric = REMLStatistics()
        >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> X = torch.ones(3, 1, dtype=torch.float64)
        >>> metric.update(torch.eye(1, dtype=torch.float64), y[:1], X[:1])
        >>> metric.update(torch.eye(2, dtype=torch.float64), y[1:], X[1:])
        >>> round(float(metric.compute()), 6)     # = -reml_loss(ScalarMatrix(3), y, X)
        -4.720517
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_fixed: int | None = None, method: str = "reml", **kwargs):
        super().__init__(**kwargs)
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        self.method = method
        p = 0 if num_fixed is None else int(num_fixed)
        zero = torch.zeros((), dtype=torch.float64)
        self.add_state("logdet", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("A", default=torch.zeros(p, p, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("b", default=torch.zeros(p, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("c", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("n", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, V: torch.Tensor, y: torch.Tensor, X: torch.Tensor) -> None:
        V, y, X = (t.detach().to(torch.float64) for t in (V, y, X))
        L = torch.linalg.cholesky(V)
        Xs = torch.linalg.solve_triangular(L, X, upper=False)
        ys = torch.linalg.solve_triangular(L, y[:, None], upper=False)[:, 0]
        if self.A.shape != (X.shape[1], X.shape[1]):
            if self.A.numel():
                raise ValueError(f"X has {X.shape[1]} columns; earlier batches had "
                                 f"{self.A.shape[0]}")
            self.A, self.b = X.new_zeros(X.shape[1], X.shape[1]), X.new_zeros(X.shape[1])
        self.logdet += 2 * torch.log(L.diagonal()).sum()
        self.A += Xs.T @ Xs
        self.b += Xs.T @ ys
        self.c += ys @ ys
        self.n += y.shape[0]

    def compute(self) -> torch.Tensor:
        keep = _independent(self.A)
        A, b = self.A[keep][:, keep], self.b[keep]
        LA = torch.linalg.cholesky(A)
        quad = self.c - (torch.linalg.solve_triangular(LA, b[:, None], upper=False) ** 2).sum()
        p = len(keep)
        if self.method == "reml":
            core = self.logdet + 2 * torch.log(LA.diagonal()).sum() + quad
            return -0.5 * core - 0.5 * (self.n - p) * math.log(2 * math.pi)
        return -0.5 * (self.logdet + quad) - 0.5 * self.n * math.log(2 * math.pi)


def _independent(A: torch.Tensor, tol: float = 1e-7) -> list[int]:
    """Columns of ``A = XᵀV⁻¹X`` not aliased with earlier ones (pivoted Cholesky in order)."""
    keep: list[int] = []
    L = A.new_zeros(A.shape)
    for j in range(A.shape[0]):
        r = L[j, keep]
        d = float(A[j, j] - r @ r)
        if A[j, j] > 0 and d > tol ** 2 * float(A[j, j]):
            L[j, j] = d ** 0.5
            L[j + 1:, j] = (A[j + 1:, j] - L[j + 1:, keep] @ r) / L[j, j]
            keep.append(j)
    return keep
