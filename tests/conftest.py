"""Fixtures shared by the unit tests (the environment for tests and notebooks is set in ../conftest.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: its models are tiny, one thread is as fast, and it does not stall
    when other processes hold the cores. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
