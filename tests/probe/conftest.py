import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread_probe():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
