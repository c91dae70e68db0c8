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

import torch
from torchmetrics import Metric

from covmodules.design import independent_columns
from covmodules.linalg.dense import DenseFactor
from covmodules.linalg.statistics import GLSStatistics

__all__ = ["REMLStatistics"]


class REMLStatistics(Metric):
    """REML (or ML) log-likelihood, on R's scale, of all the groups seen by :meth:`update`.

    ``update(V, y, X)`` takes one batch of whole groups: its covariance ``V`` (n_i × n_i),
    response and fixed-effects design, and adds its
    :class:`~covmodules.linalg.statistics.GLSStatistics`. ``compute()`` finishes their sum:
    the log-likelihood with the GLS estimate of the fixed effects from all batches; columns of
    ``X`` aliased in the pooled ``A`` (e.g. levels absent from the data) are left out, as the
    REML engine does (:func:`covmodules.design.independent_columns`).

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
        stats = GLSStatistics.of(DenseFactor(V), y, X)
        if self.A.shape != stats.A.shape:
            if self.A.numel():
                raise ValueError(f"X has {X.shape[1]} columns; earlier batches had "
                                 f"{self.A.shape[0]}")
            self.A, self.b = torch.zeros_like(stats.A), torch.zeros_like(stats.b)
        self.logdet += stats.logdet
        self.A += stats.A
        self.b += stats.b
        self.c += stats.c
        self.n += stats.n

    def compute(self) -> torch.Tensor:
        keep = independent_columns(self.A)
        total = GLSStatistics(self.logdet, self.A[keep][:, keep], self.b[keep], self.c, self.n)
        return -total.finish(self.method).neg_loglik
