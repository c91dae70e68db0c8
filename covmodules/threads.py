"""Thread counts that degrade gracefully on a shared machine.

Torch's intra-op threads join at the end of every parallel kernel. When other processes use
the cores, a descheduled thread holds every join up, so a fit made of many short kernels
slows down tens of times (measured on 2 cores with two busy processes: Orthodont 0.05 s →
2.6 s, the 40 × 40 field trial 0.35 s → 6.5 s). Work whose evaluations are small gains
nothing from the threads anyway, so :func:`threads_for` runs it on one; under DDP,
:func:`per_process` divides the cores between the processes of a machine.

>>> import torch
>>> before = torch.get_num_threads()
>>> with threads_for(1e3):
...     torch.get_num_threads()
1
>>> torch.get_num_threads() == before
True
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

__all__ = ["SMALL_WORK", "threads_for", "per_process"]

#: flop-equivalents of one evaluation (a solver's ``cost``) below which a fit runs on one
#: thread: about 0.1 s of one core, e.g. a 2,000-row dense Cholesky or InstEval's
#: mixed-model equations (``scripts/bench_crossed.py --load`` measures both sides)
SMALL_WORK = 3e9


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
