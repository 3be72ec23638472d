import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (two threads on two shared cores mostly wait on each other);
    the crash tests' subprocesses use one thread as well."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
