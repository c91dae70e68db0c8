"""Thread counts that degrade gracefully on a shared machine.

Torch's intra-op threads join at the end of every parallel kernel. When other processes use
the cores, a descheduled thread holds every join up, so a fit made of many short kernels
slows down tens of times (measured on 2 cores with two busy processes: Orthodont 0.05 s →
2.6 s, the 40 × 40 field trial 0.35 s → 6.5 s). Work whose evaluations are small gains
nothing from the threads anyway, so :func:`threads_for` runs it on one; under DDP,
:func:`per_process` divides the cores between the processes of a machine. NumPy and SciPy
bring their own BLAS, with its own threads: :func:`numpy_blas_like_torch` holds it to torch's
count for a block (the same stalls, measured: LAPACK ``stevd`` of a 1,000 x 1,000 tridiagonal
0.03 s on one thread, 0.15 s on two threads of a loaded machine).

>>> import torch
>>> before = torch.get_num_threads()
>>> with threads_for(1e3):
...     torch.get_num_threads()
1
>>> torch.get_num_threads() == before
True
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

__all__ = ["SMALL_WORK", "BUILD_PER_ROW", "threads_for", "per_process",
           "numpy_blas_like_torch"]

#: flop-equivalents of one evaluation (a solver's ``cost``) below which a fit runs on one
#: thread: about 0.1 s of one core, e.g. a 2,000-row dense Cholesky or InstEval's
#: mixed-model equations (``scripts/bench_crossed.py --load`` measures both sides)
SMALL_WORK = 3e9

#: flop-equivalents per row of building an objective (the data checks, the sums over rows,
#: sorting the group codes), for :func:`threads_for` before a solver's ``cost`` is known:
#: a 100,000-row model is built on one thread (measured: two threads of a loaded 2-core
#: machine stall there as in the fit, 0.5 s becoming 1.5 s)
BUILD_PER_ROW = 1e3


@contextmanager
def threads_for(cost: float, device: torch.device | str | None = None):
    """Run the block on one torch thread when one evaluation costs less than
    :data:`SMALL_WORK` flop-equivalents on the CPU; the thread count is restored after."""
    before = torch.get_num_threads()
    small = cost < SMALL_WORK and torch.device(device or "cpu").type == "cpu"
    if small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def per_process(local_processes: int) -> int:
    """Threads for each of ``local_processes`` processes sharing this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, local_processes))


@functools.lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextmanager
def numpy_blas_like_torch():
    """Run the block with NumPy's and SciPy's BLAS on as many threads as torch uses."""
    with _blas_controller().limit(limits=torch.get_num_threads(), user_api="blas"):
        yield
