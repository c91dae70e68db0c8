r"""Exact REML of crossed random effects over data split into any rows: processes (DDP).

Crossed designs (students × lecturers, users × items) do not split into independent groups,
so :class:`~covmodules.distributed.ShardedREML` cannot shard them. With ``R = σ² I`` every REML
quantity depends on the data only through sums over rows (:mod:`covmodules.linalg.sufficient`):
``[X, y]ᵀ[X, y]``, ``Zᵀ[X, y]``, the blocks of ``ZᵀZ`` and ``n``. Each process sums its own
rows, and one all-reduce per fit (not per iteration) gives every process the same totals; from
then on every process evaluates the exact full-data loss, gradient and AI matrix, and AI-REML
takes the same steps everywhere. Communicated once: the code tuples of the rows (to agree on
the sparsity pattern of ``ZᵀZ``) and ``O(q + nnz(ZᵀZ) + p q)`` numbers
(:attr:`CrossedREML.communicated`).

Each process builds the model of its own rows with the level codes of the whole data (the
same levels, in the same order, on every process). The gradient is the same on every
process, so DDP's averaging of it changes nothing.

Example (two row splits of a crossed design equal the whole, in one process)::

    >>> import torch
    >>> from covmodules import MixedModel, ScalarMatrix, DesignMatrix, fit
    >>> from covmodules.crossed import CrossedREML
    >>> g = torch.Generator().manual_seed(0)
    >>> a, b = torch.randint(0, 8, (60,), generator=g), torch.randint(0, 5, (60,), generator=g)
    >>> y = torch.randn(60, generator=g, dtype=torch.float64) + a % 3 + b % 2
    >>> def model(rows):
    ...     return MixedModel(random={
    ...         "a": (DesignMatrix(a[rows].tolist(), levels=list(range(8))), ScalarMatrix(8)),
    ...         "b": (DesignMatrix(b[rows].tolist(), levels=list(range(5))), ScalarMatrix(5))},
    ...         residual=ScalarMatrix(len(rows)))
    >>> whole = fit(model(torch.arange(60)), y)
    >>> crossed = fit(CrossedREML(model(torch.arange(60)), y))
    >>> abs(crossed.loglik - whole.loglik) < 1e-9
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .base import CovarianceModule
from .checks import Checks, prepare
from .linalg import identify
from .linalg.sufficient import SufficientSolver
from .reml import REML

__all__ = ["CrossedREML"]


def _processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the processes (``t`` itself in one process)."""
    if _processes() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-D ``t`` of every process, concatenated in rank order."""
    world = _processes()
    if world == 1:
        return t
    count = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = t.new_zeros(longest, *t.shape[1:])
    padded[:t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c)] for part, c in zip(parts, counts)])


class CrossedREML(REML):
    """The REML (or ML) objective of this process's rows of a crossed (or nested) design.

    Args:
        model: a :class:`~covmodules.MixedModel` of this process's rows: random terms
            ``I ⊗ S`` on block designs, coded with the levels of the whole data, and a residual
            ``σ² I``.
        y, X, x_names, method, checks: as for :class:`~covmodules.reml.REML`; aliased columns,
            the exact-fit check and the level counts are decided on the sums over all
            processes (a level shared by several processes counted once).

    Under ``torch.distributed`` every process builds its objective at the same point; each
    evaluation is then local. :attr:`n` is the number of rows of all processes; ``y`` and ``X``
    are this process's, and a fit's ``fitted``/``residuals`` are its rows' (its BLUPs are those
    of the whole data).
    """

    def __init__(self, model: CovarianceModule, y, X=None, x_names=None, method: str = "reml",
                 checks: Checks | None = None):
        if method not in ("reml", "ml"):
            raise ValueError(f"method must be 'reml' or 'ml', got {method!r}")
        data = prepare([(model, y, X)], x_names, checks, reduce=all_reduce, overlapping=True)
        self._hold(model, method, "sum", data.ys[0], data.Xs[0], data.x_names, data.dropped,
                   data.residual_variance)
        self._n = data.n
        identify(model)
        self.solver = SufficientSolver(model, all_reduce, all_gather_rows)
        self.solver.sum_data(self.y, self.X)

    def refit(self, model: CovarianceModule, method: str) -> "CrossedREML":
        """The objective of this process's rows for ``model`` and ``method`` (every process
        builds it: its sums are reduced again)."""
        return CrossedREML(model, self.y, self.X, self.x_names, method)

    @property
    def n(self) -> int:
        """Rows of all processes."""
        return self._n

    @property
    def communicated(self) -> int:
        """Numbers summed over the processes once per fit (the sufficient statistics)."""
        return self.solver.sums.numel

    def term_sums(self, name: str, state) -> torch.Tensor:
        """``Z_tᵀ P y`` of random term ``name`` over the rows of all processes."""
        return state.factor.zt(state.coef[:, None])[self.solver.term_rows(name)]
