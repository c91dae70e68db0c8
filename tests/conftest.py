"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small models and networks: one intra-op thread is fastest and keeps timings stable on a
    busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
