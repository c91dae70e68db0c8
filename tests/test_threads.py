"""Small fits run on one thread and leave torch's thread count as they found it."""

import os

import pytest
import torch

from covmodules import MixedModel, ScalarMatrix, fit
from covmodules.threads import SMALL_WORK, per_process, threads_for


def test_threads_for_small_and_large_work_and_restores_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for(SMALL_WORK / 10):
            assert torch.get_num_threads() == 1
        with threads_for(SMALL_WORK * 10):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with threads_for(1.0):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fit_runs_small_work_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    g = torch.arange(6).repeat_interleave(4)
    Z = torch.nn.functional.one_hot(g).double()
    y = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = y + 2 * torch.randn(6, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)[g]
    try:
        model = MixedModel(random={"g": (Z, ScalarMatrix(6))}, residual=ScalarMatrix(24))
        fit(model, y, callback=lambda info: seen.append(torch.get_num_threads()))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_fit_builds_a_small_objective_on_one_thread(monkeypatch):
    """The data checks and sums before the solver is known run on one thread too."""
    import covmodules.fitting as fitting
    built = []

    class Recording(fitting.REML):
        def __init__(self, *args, **kwargs):
            built.append(torch.get_num_threads())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fitting, "REML", Recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        fit(ScalarMatrix(30), y)
        assert built == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_per_process_divides_the_cores():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert per_process(1) == cores
    assert per_process(cores * 4) == 1
    assert per_process(2) == max(1, cores // 2)
