"""Test configuration.

Without a CUDA device the Triton kernels run under the Triton interpreter:
TRITON_INTERPRET must be set before anything imports triton, so it is set here,
at the top of the first module pytest imports.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401,E402

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device the tests run on: CUDA when present, else the CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    return request.param
