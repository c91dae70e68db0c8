r"""Additive GLS statistics: the one place the REML / ML log-likelihood is assembled.

For data split into blocks ``s`` with ``V`` block diagonal over them (groups, batches,
processes; one block for a single factorisation), everything the likelihood needs is a sum:

.. math::

    \log|V| = \sum_s \log|V_s|, \quad A = \sum_s X_s^T V_s^{-1} X_s, \quad
    b = \sum_s X_s^T V_s^{-1} y_s, \quad c = \sum_s y_s^T V_s^{-1} y_s, \quad n = \sum_s n_s,

and :meth:`GLSStatistics.finish` turns the total into ``b̂ = A⁻¹ b`` and

.. math::

    -l_R = \tfrac12\left[\log|V| + \log|A| + c - b^T \hat b\right] + \tfrac{n-p}{2}\log 2\pi,
    \qquad -l_{ML} = \tfrac12\left[\log|V| + c - b^T \hat b\right] + \tfrac n2 \log 2\pi

(R's scale: lme4, nlme, glmmTMB). Statistics add with ``+`` and across processes with
:meth:`GLSStatistics.all_reduce`.

Example (two blocks equal one)::

    >>> import torch
    >>> from covmodules.linalg.dense import DenseFactor
    >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> X = torch.ones(3, 1, dtype=torch.float64)
    >>> I = lambda n: torch.eye(n, dtype=torch.float64)
    >>> whole = GLSStatistics.of(DenseFactor(I(3)), y, X)
    >>> parts = GLSStatistics.of(DenseFactor(I(1)), y[:1], X[:1]) + \
    ...     GLSStatistics.of(DenseFactor(I(2)), y[1:], X[1:])
    >>> round(float(parts.finish("reml").neg_loglik), 6), float(whole.finish("reml").neg_loglik) \
    ...     == float(parts.finish("reml").neg_loglik)
    (4.720517, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["GLSStatistics", "Estimates", "NotPositiveDefiniteError"]


class NotPositiveDefiniteError(ValueError):
    """``V`` (or ``XᵀV⁻¹X``) is not positive definite at the given parameters."""


@dataclass
class Estimates:
    """What :meth:`GLSStatistics.finish` gives: ``b̂``, the Cholesky factor of ``A`` and ``-l``."""

    beta: torch.Tensor
    LA: torch.Tensor
    neg_loglik: torch.Tensor


@dataclass
class GLSStatistics:
    """``log|V|``, ``A = XᵀV⁻¹X``, ``b = XᵀV⁻¹y``, ``c = yᵀV⁻¹y`` and ``n`` of some rows."""

    logdet: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor

    @classmethod
    def of(cls, factor, y: torch.Tensor, X: torch.Tensor) -> "GLSStatistics":
        """The statistics of ``y``, ``X`` under a factorisation of their ``V``."""
        return cls.of_whitened(factor, factor.whiten(X), factor.whiten(y[:, None])[:, 0],
                               y.shape[0])

    @classmethod
    def of_whitened(cls, factor, Xw: torch.Tensor, yw: torch.Tensor, n: int
                    ) -> "GLSStatistics":
        """The statistics of ``n`` rows from their whitened ``F X`` and ``F y`` (see
        :class:`~.base.Factor`; ``F y`` may have more rows than ``y``)."""
        like = dict(dtype=yw.dtype, device=yw.device)
        return cls(torch.as_tensor(factor.logdet, **like), factor.inner(Xw, Xw),
                   factor.inner(Xw, yw[:, None])[:, 0],
                   factor.inner(yw[:, None], yw[:, None])[0, 0],
                   torch.tensor(float(n), **like))

    @classmethod
    def of_residuals(cls, logdet: torch.Tensor, quadratic: torch.Tensor, n: int
                     ) -> "GLSStatistics":
        """The statistics of ``n`` residuals with no fixed effects (``p = 0``): ``log|V|`` and
        ``rᵀV⁻¹r``; ``finish("ml")`` is then the Gaussian negative log-likelihood."""
        empty = quadratic.new_zeros(0)
        return cls(logdet, empty.reshape(0, 0), empty, quadratic,
                   torch.tensor(float(n), dtype=quadratic.dtype, device=quadratic.device))

    @classmethod
    def zeros(cls, p: int, dtype=torch.float64, device=None) -> "GLSStatistics":
        """The statistics of no rows (``p`` fixed effects)."""
        zero = torch.zeros((), dtype=dtype, device=device)
        return cls(zero, torch.zeros(p, p, dtype=dtype, device=device),
                   torch.zeros(p, dtype=dtype, device=device), zero.clone(), zero.clone())

    def __add__(self, other: "GLSStatistics") -> "GLSStatistics":
        return GLSStatistics(self.logdet + other.logdet, self.A + other.A, self.b + other.b,
                             self.c + other.c, self.n + other.n)

    def flat(self) -> torch.Tensor:
        """The statistics as one vector (``p² + p + 3`` numbers) for a reduction."""
        return torch.cat([self.A.reshape(-1), self.b, torch.stack([self.c, self.logdet,
                                                                   self.n])])

    @classmethod
    def from_flat(cls, flat: torch.Tensor, p: int) -> "GLSStatistics":
        A, b, (c, logdet, n) = flat[:p * p].reshape(p, p), flat[p * p:p * p + p], flat[-3:]
        return cls(logdet, A, b, c, n)

    def all_reduce(self, *extra: torch.Tensor):
        """The sum over the processes of ``torch.distributed`` (itself when not initialised),
        with any ``extra`` tensors summed in the same reduction: ``(statistics, *extra)``."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return (self, *extra) if extra else self
        parts = [self.flat()] + [e.reshape(-1).to(self.A) for e in extra]
        total = torch.cat(parts)
        dist.all_reduce(total)
        p = self.b.shape[0]
        out, offset = [GLSStatistics.from_flat(total[:p * p + p + 3], p)], p * p + p + 3
        for e in extra:
            out.append(total[offset:offset + e.numel()].reshape(e.shape).to(e.dtype))
            offset += e.numel()
        return tuple(out) if extra else out[0]

    def finish(self, method: str, residual=None) -> Estimates:
        """``b̂`` and ``-l`` (REML or ML, R's scale) of these statistics.

        ``residual(b̂)``, when given, returns ``rᵀV⁻¹r`` computed from the residuals
        themselves, which keeps the digits that ``c - bᵀb̂`` cancels when ``X`` fits ``y``
        closely (a single factorisation has them at hand)."""
        p = self.b.shape[0]
        if p == 0:                          # no fixed effects: nothing to estimate
            LA, beta = self.A, self.b
        else:
            LA, info = torch.linalg.cholesky_ex(0.5 * (self.A + self.A.T))
            if int(info) != 0:
                raise NotPositiveDefiniteError("XᵀV⁻¹X is not positive definite: X is rank "
                                               "deficient")
            beta = torch.cholesky_solve(self.b[:, None], LA)[:, 0]
        quad = self.c - self.b @ beta if residual is None else residual(beta)
        n = float(self.n)
        if method == "reml":
            neg = 0.5 * (self.logdet + 2 * torch.log(LA.diagonal()).sum() + quad) \
                + 0.5 * (n - p) * math.log(2 * math.pi)
        else:
            neg = 0.5 * (self.logdet + quad) + 0.5 * n * math.log(2 * math.pi)
        return Estimates(beta, LA, neg)
