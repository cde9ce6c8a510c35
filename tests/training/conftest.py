"""Fixtures of every training test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared, busy CPU one thread is several times faster for these small models than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
