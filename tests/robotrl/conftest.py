import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small networks: one torch thread is faster (as in the training runners)."""
    from robotrl.offpolicy import keep_freed_memory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    keep_freed_memory()
    yield
    torch.set_num_threads(threads)
