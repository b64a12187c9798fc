"""bench/_common.PeakMemory on the CPU: the peak of memory allocated and freed inside the block."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _common  # noqa: E402


@pytest.mark.parametrize("kernel_reset", [True, False])
def test_cpu_peak_of_a_freed_block(monkeypatch, kernel_reset):
    if kernel_reset and not _common._reset_hwm():
        pytest.skip("this kernel refuses /proc/self/clear_refs")
    if not kernel_reset:  # the sampling fallback, for kernels that refuse clear_refs
        monkeypatch.setattr(_common, "_reset_hwm", lambda: False)
    size = 96 * 2**20
    with _common.PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(size // 4)  # written: resident
        time.sleep(0.05)  # the sampler wakes every 2 ms
        del block
    assert (mem._thread is None) == kernel_reset
    assert 0.9 * size <= mem.extra <= size + 32 * 2**20
