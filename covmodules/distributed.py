r"""Exact REML over data split into shards of whole groups: batches and processes (DDP).

With ``V`` block diagonal over groups, every REML quantity is a sum over groups (the
:class:`~covmodules.linalg.statistics.GLSStatistics` of the shards add up). A *shard* is the data of some whole groups with its own covariance
module (built for those rows, with the same parameter names as every other shard). Each
process holds one or more shards (its batches); with ``torch.distributed`` initialised the
sums are all-reduced, so every process holds the exact full-data quantities:

.. math::

    -2 l_R = \sum_s \log|V_s| + \log|A| + c - b^T A^{-1} b + (n - p)\log 2\pi, \quad
    A = \sum_s X_s^T V_s^{-1} X_s,\ b = \sum_s X_s^T V_s^{-1} y_s,\ c = \sum_s y_s^T V_s^{-1} y_s .

**Gradient.** The cotangent of ``-l`` is block diagonal, ``½(V_s⁻¹ - V_s⁻¹X_s A⁻¹X_sᵀV_s⁻¹ -
Py_s Py_sᵀ)`` with the *global* ``A`` and ``b̂`` in ``Py_s = V_s⁻¹(y_s - X_s b̂)``: each shard
contracts its own block (the solver's closed-form ``natural_gradient``). That is
``∂loss/∂stats · ∂stats_s/∂θ`` — two passes over the batches, the first without gradients
for the totals — so the gradient over several batches is exact, not an approximation.
:meth:`ShardedREML.loss`'s backward returns ``world_size ×`` this process's share, so DDP's
gradient averaging (Lightning ``strategy="ddp"``) yields the exact full-data gradient; what is
communicated per step is ``O(p² + K²)`` numbers, never data.

**AI matrix.** ``Uᵀ P U = Σ_s U_sᵀV_s⁻¹U_s - (Σ_s X_sᵀV_s⁻¹U_s)ᵀ A⁻¹ (Σ_s X_sᵀV_s⁻¹U_s)``
with ``U_s = dV_s/dθ · Py_s``: reduced the same way, so AI-REML takes identical steps on every
rank (:class:`ShardedREML` has the objective interface of :class:`covmodules.optim.AIREML`).

Example (two batches of whole subjects in one process equal the unsharded fit)::

    >>> import torch
    >>> from covmodules import AR1Matrix, Grouped, fit
    >>> from covmodules.distributed import ShardedREML
    >>> g = torch.Generator().manual_seed(0)
    >>> subject = torch.arange(40) // 5
    >>> y = torch.randn(40, generator=g, dtype=torch.float64)
    >>> whole = fit(Grouped(AR1Matrix(5), groups=subject), y)
    >>> shards = [(Grouped(AR1Matrix(5), groups=subject[rows]), y[rows], None)
    ...           for rows in (slice(0, 15), slice(15, 40))]
    >>> sharded = fit(ShardedREML(shards))
    >>> abs(sharded.loglik - whole.loglik) < 1e-10
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import CovarianceModule
from .checks import Checks, prepare
from .linalg import NotPositiveDefiniteError, identify, select_solver
from .linalg.base import GLSState, NegLogLik
from .linalg.statistics import GLSStatistics

__all__ = ["ShardedREML", "ShardedState", "world_size"]


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t)
    return t


@dataclass
class ShardedState:
    """Global GLS quantities plus, per local shard, the state its gradient contracts with."""

    shards: list[GLSState]
    LA: torch.Tensor
    beta: torch.Tensor
    neg_loglik: torch.Tensor
    method: str

    @property
    def cov_beta(self) -> torch.Tensor:
        return torch.cholesky_inverse(self.LA)


class ShardedREML:
    """The REML (or ML) objective of data split into shards of whole groups.

    Args:
        shards: this process's ``[(model, y, X), ...]``; ``model`` covers exactly the shard's
            rows, all models share parameter names and structure (e.g.
            ``Grouped(AR1Matrix(T), groups=shard_subjects)``); ``X`` ``None`` is an intercept.
            The first shard's model holds the registered parameters; the others are evaluated
            at them.
        x_names: names of the columns of ``X``.
        method: ``"reml"`` or ``"ml"``.
        solver: likelihood solver name for every shard (default: chosen from each shard's
            structure; the dense one factors any shard).
        checks: the design checks (:class:`~covmodules.checks.Checks`, default all), run on
            the whole data: the shards' data are validated as :class:`~covmodules.reml.REML`
            validates one data set (:func:`covmodules.checks.prepare`), and aliased columns of
            ``X``, the exact-fit check and the level counts are decided on sums over all
            shards and processes, so every process drops the same columns with the same
            warning as the unsharded fit.
    """

    def __init__(self, shards, x_names=None, method: str = "reml", solver=None,
                 checks: Checks | None = None):
        if not shards:
            raise ValueError("shards must hold at least one (model, y, X) shard")
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        self.method = method
        data = prepare(shards, x_names, checks, reduce=_all_reduce)
        self.models = [model for model, _, _ in shards]
        self.ys, self.Xs, self.x_names, self.dropped = data.ys, data.Xs, data.x_names, data.dropped
        self.n, self.p, self._residual_variance = data.n, len(data.x_names), data.residual_variance
        self.solvers = []
        for i, model in enumerate(self.models):
            identify(model)
            if model.free_param_names != self.models[0].free_param_names:
                raise ValueError(f"shard {i}'s model has parameters {model.free_param_names}, "
                                 f"shard 0's {self.models[0].free_param_names}")
            self.solvers.append(select_solver(model, solver))
        self.solver = self.solvers[0]

    @property
    def model(self) -> CovarianceModule:
        return self.models[0]

    @property
    def device(self) -> torch.device:
        return self.ys[0].device

    def shard(self, i: int):
        """Shard ``i`` as a :class:`~covmodules.reml.REML` objective of its own rows (the
        columns the whole kept, its solver)."""
        from .reml import REML
        return REML.of_prepared(self.models[i], self.ys[i], self.Xs[i], self.x_names,
                                self.method, self.solvers[i], self.dropped,
                                self._residual_variance)

    # ----------------------------------------------------------------- sums
    def residual_variance(self) -> float:
        """Variance of the full data's OLS residuals (as :meth:`REML.residual_variance`),
        from the sums reduced when the objective was built."""
        return self._residual_variance

    def state(self, free_params=None) -> ShardedState:
        """Global estimates and ``-l`` at ``free_params`` (registered values by default)."""
        with torch.no_grad():
            free = self.model._resolve_free(free_params)
            nat = self.model.build_params(free)
            # the failures are counted in the same all-reduce as the statistics: every
            # process learns them there, so none raises while others wait in it
            factors, whitened = [], []
            local, failed = GLSStatistics.zeros(self.p, nat.dtype, self.ys[0].device), 0
            for solver, y, X in zip(self.solvers, self.ys, self.Xs):
                try:
                    f = solver.factorize(nat)
                except NotPositiveDefiniteError:
                    failed += 1
                    continue
                Xw, yw = f.whiten(X.to(nat)), f.whiten(y.to(nat)[:, None])[:, 0]
                local = local + GLSStatistics.of_whitened(f, Xw, yw, y.shape[0])
                factors.append(f)
                whitened.append((Xw, yw))
            total, failed = local.all_reduce(torch.tensor(float(failed), dtype=nat.dtype,
                                                          device=nat.device))
            if float(failed) > 0:
                raise NotPositiveDefiniteError(
                    f"V is not positive definite on {int(failed)} shard(s) at these "
                    "parameters; try other start values, e.g. larger variances")
            est = total.finish(self.method)
            LA, beta, neg = est.LA, est.beta, est.neg_loglik
            shards = []
            for f, (Xw, yw) in zip(factors, whitened):
                rw = yw - Xw @ beta
                Py = f.unwhiten(rw[:, None])[:, 0]
                shards.append(GLSState(f, Xw, LA, beta, rw, Py, neg, self.method))
            return ShardedState(shards, LA, beta, neg, self.method)

    def local_gradient(self, free, state: ShardedState) -> torch.Tensor:
        """This process's share of ``∂(-l)/∂θ`` over the free parameters (sum over its shards)."""
        with torch.no_grad():
            model = self.model
            free = model._resolve_free(free)
            nat = model.build_params(free)
            g = sum(solver.natural_gradient(nat, s) for solver, s in zip(self.solvers,
                                                                         state.shards))
            return model.to_free(g, free)

    def gradient(self, free, state: ShardedState) -> torch.Tensor:
        """``∂(-l)/∂θ`` of the full data over the free parameters."""
        return _all_reduce(self.local_gradient(free, state))

    def average_information(self, free, state: ShardedState) -> torch.Tensor:
        """``½ Uᵀ P U`` of the full data, reduced over shards and processes."""
        with torch.no_grad():
            free = self.model._resolve_free(free)
            K, p = len(free), self.p
            local = torch.zeros(K * K + p * K, dtype=torch.float64, device=free.device)
            for model, s in zip(self.models, state.shards):
                Uw = s.factor.whiten(model.dV(s.Py, free).T)
                local += torch.cat([s.factor.inner(Uw, Uw).reshape(-1),
                                    s.factor.inner(s.Xw, Uw).reshape(-1)])
            total = _all_reduce(local)
            out = total[:K * K].reshape(K, K)
            if self.method == "reml":
                C = torch.linalg.solve_triangular(state.LA, total[K * K:].reshape(p, K),
                                                  upper=False)
                out = out - C.T @ C
            return 0.5 * out

    def loss(self, free_params=None) -> torch.Tensor:
        """``-l`` of the full data (the same on every process), differentiable.

        Backward returns ``world_size ×`` this process's share of the gradient, so that DDP's
        gradient averaging gives every process the exact full-data gradient.
        """
        free = self.model._differentiable_free(free_params)
        none = free.new_zeros(0)
        return NegLogLik.apply(free, none, none, self.state,
                               lambda f, s: world_size() * self.local_gradient(f, s))

    def loglik(self, free_params=None) -> float:
        return -float(self.state(free_params).neg_loglik)
