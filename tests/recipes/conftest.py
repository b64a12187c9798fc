import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """The evaluation models are tiny: one thread avoids OpenMP overhead (and contention on shared runners)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
