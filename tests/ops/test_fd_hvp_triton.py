"""uf.ops.fd_hvp_accumulate_(backend="triton") reaches the Triton kernel (it used to fall back to foreach)."""
from __future__ import annotations

import os

import pytest
import torch

import unlearn_fast as uf
from tests.conftest import HAS_TRITON

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton on a GPU or under TRITON_INTERPRET=1")


def _flat_lists(dtype, seed=0):
    """acc, g_moved, g_base: three lists of views of one flat buffer each (as flatten_parameters leaves them)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4)]
    total = sum(torch.Size(s).numel() for s in shapes)

    def views(buf):
        out, o = [], 0
        for s in shapes:
            n = torch.Size(s).numel()
            out.append(buf[o:o + n].view(s))
            o += n
        return out

    bufs = [torch.randn(total, generator=g).to(dtype).to(DEVICE) for _ in range(3)]
    return [views(b) for b in bufs], bufs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_base", [True, False])
def test_triton_engine_runs_the_kernel_with_the_right_numbers(monkeypatch, dtype, with_base):
    from unlearn_fast.kernels import multi_tensor as k

    calls = []
    real = k.fd_hvp_accumulate_
    monkeypatch.setattr(k, "fd_hvp_accumulate_", lambda *a: (calls.append(a[0].numel()), real(*a))[1])
    (acc, gm, g0), (acc_buf, gm_buf, g0_buf) = _flat_lists(dtype)
    coeff = 2.5
    want = acc_buf.double() + coeff * (gm_buf.double() - (g0_buf.double() if with_base else 0))
    uf.ops.fd_hvp_accumulate_(acc, gm, g0 if with_base else None, torch.tensor(coeff, device=DEVICE), backend="triton")
    assert calls == [acc_buf.numel()], "one kernel launch over the whole flat buffer"
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(acc_buf.double(), want, rtol=tol, atol=tol)


def test_triton_engine_restores_after_accumulating():
    (acc, gm, g0), (acc_buf, gm_buf, g0_buf) = _flat_lists(torch.float32, seed=1)
    params = [p.detach().clone() for p in acc]
    flat = torch.cat([p.reshape(-1) for p in params])
    views, o = [], 0
    for p in params:
        views.append(flat[o:o + p.numel()].view(p.shape))
        o += p.numel()
    before = flat.clone()
    state = uf.ops.sam_perturb_(views, gm, 0.1, backend="triton")  # gm: flat too
    assert not torch.equal(flat, before)
    want = acc_buf.double() + 0.5 * (gm_buf.double() - g0_buf.double())
    uf.ops.fd_hvp_accumulate_(acc, gm, g0, 0.5, restore=state, backend="triton")
    assert state.restored and torch.equal(flat, before)
    assert torch.allclose(acc_buf.double(), want, rtol=1e-6, atol=1e-6)
