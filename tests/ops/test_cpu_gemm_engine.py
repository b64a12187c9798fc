"""The CPU fp32 head matmuls on oneDNN (the default on AMD processors) against the MKL ones and fp64 truth.

Both engines run on any x86 CPU: each op is computed with each, forced, and compared with the fp64 result.
"""
from __future__ import annotations

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.ops import _matmul
from unlearn_fast.ops import _torch_linear_ce as tp

pytestmark = pytest.mark.skipif(_matmul.cpu_gemm_engine() != "onednn" and not torch.backends.mkldnn.is_available(),
                                reason="torch built without oneDNN")


def _ops(h, w, b, y, env):
    seq = lambda nll, ids: torch.nn.functional.logsigmoid(-0.1 * nll)  # noqa: E731
    return {
        "ce": lambda hh, ww, bb: uf.ops.linear_cross_entropy(hh, ww, y, linear_bias=bb, backend="torch"),
        "ce_none": lambda hh, ww, bb: (uf.ops.linear_cross_entropy(hh, ww, y, linear_bias=bb, reduction="none",
                                                                   backend="torch") ** 2).sum(),
        "irm": lambda hh, ww, bb: (lambda o: o.env_loss.sum() + 3 * o.penalty)(
            uf.ops.linear_cross_entropy_irm(hh, ww, y, env, num_envs=3, linear_bias=bb, backend="torch")),
        "penalty": lambda hh, ww, bb: uf.ops.irm_penalty(hh, ww, y, env, num_envs=3, linear_bias=bb,
                                                         backend="torch").penalty,
        "objective": lambda hh, ww, bb: uf.ops.irm_objective(hh, ww, y, env, num_envs=3, linear_bias=bb,
                                                             penalty_weight=2.0, backend="torch").loss,
        "sequence": lambda hh, ww, bb: uf.ops.sequence_loss(hh.view(3, 10, -1), ww, y.view(3, 10), seq,
                                                            linear_bias=bb, backend="torch").loss,
    }


@pytest.mark.parametrize("op", ["ce", "ce_none", "irm", "penalty", "objective", "sequence"])
def test_onednn_and_mkl_give_the_fp64_numbers(monkeypatch, op):
    g = torch.Generator().manual_seed(0)
    h, w, b = torch.randn(30, 23, generator=g), torch.randn(97, 23, generator=g) * 0.3, torch.randn(97, generator=g)
    y = torch.randint(0, 97, (30,), generator=g)
    y[::7] = -100
    env = torch.arange(30) * 3 // 30
    run = _ops(h, w, b, y, env)[op]
    results = {}
    for engine in ("mkl", "onednn", "fp64"):
        monkeypatch.setitem(_matmul._onednn_state, "use", "mkl" if engine == "fp64" else engine)
        logits_engine = []
        real = tp.logits_block
        monkeypatch.setattr(tp, "logits_block", lambda z_buf, *a, _r=real: (logits_engine.append(z_buf is None),
                                                                            _r(z_buf, *a))[1])
        cast = torch.float64 if engine == "fp64" else torch.float32
        t = [x.to(cast).requires_grad_() for x in (h, w, b)]
        loss = run(*t)
        results[engine] = (loss.detach().double(), *(gr.double() for gr in torch.autograd.grad(loss, t)))
        assert logits_engine and all(used == (engine == "onednn") for used in logits_engine), engine
    for name, ours in (("mkl", results["mkl"]), ("onednn", results["onednn"])):
        for a, truth in zip(ours, results["fp64"]):
            torch.testing.assert_close(a, truth, rtol=2e-5, atol=2e-5 * max(1.0, truth.abs().max().item()),
                                       msg=lambda m, name=name: f"{op} on {name}: {m}")


def test_engine_choice(monkeypatch):
    for asked, vendor, expected in (("auto", "GenuineIntel", "mkl"), ("mkl", "AuthenticAMD", "mkl"),
                                    ("auto", "AuthenticAMD", "onednn"), ("onednn", "GenuineIntel", "onednn")):
        monkeypatch.setattr(_matmul, "_onednn_state", {})
        monkeypatch.setattr(_matmul, "_cpu_vendor", lambda v=vendor: v)
        monkeypatch.setenv("UNLEARN_FAST_CPU_GEMM", asked)
        assert _matmul.cpu_gemm_engine() == expected, (asked, vendor)
    assert not _matmul.use_onednn(torch.float64, torch.device("cpu"))  # fp64 stays on MKL
    monkeypatch.setattr(_matmul, "_onednn_state", {})
    monkeypatch.setenv("UNLEARN_FAST_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="UNLEARN_FAST_CPU_GEMM must be one of"):
        _matmul.cpu_gemm_engine()


def test_empty_products_and_vocabulary_blocks():
    """oneDNN has no primitive for K = 0 or no rows: zeros (+ bias), as torch gives; d weight in several
    vocabulary blocks of rows is the whole product."""
    for x, w in ((torch.ones(3, 0), torch.ones(5, 0)), (torch.ones(0, 4), torch.ones(5, 4))):
        b = torch.arange(5.0)
        torch.testing.assert_close(_matmul.onednn_linear(x, w, b), torch.addmm(b, x, w.T))
    g = torch.Generator().manual_seed(1)
    dz, h = torch.randn(6, 2 * _matmul._DW_ROWS + 5, generator=g), torch.randn(6, 3, generator=g)
    out = torch.randn(dz.shape[1], 3, generator=g)
    start = out.clone()
    for accumulate in (False, True):
        with pytest.MonkeyPatch.context() as m:
            m.setitem(_matmul._onednn_state, "use", "onednn")
            got = _matmul.dw_into(out.clone(), dz, h, accumulate=accumulate)
        want = (start if accumulate else 0) + dz.double().T @ h.double()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["ce", "ce_none", "irm", "penalty", "objective", "sequence"])
def test_onednn_holds_one_logits_block_at_a_time(monkeypatch, op):
    """oneDNN writes each chunk's logits into a new tensor: the last chunk's must be freed before the next one
    exists, or the pass holds two blocks (its peak then grows by a block)."""
    import gc
    import weakref

    monkeypatch.setitem(_matmul._onednn_state, "use", "onednn")
    g = torch.Generator().manual_seed(2)
    h, w, b = torch.randn(30, 23, generator=g), torch.randn(97, 23, generator=g) * 0.3, torch.randn(97, generator=g)
    y = torch.randint(0, 97, (30,), generator=g)
    env = torch.arange(30) * 3 // 30
    alive = []
    real = tp.logits_block

    def tracking(z_buf, *args):
        gc.collect()
        assert not [r for r in alive if r() is not None], "a previous logits block is still referenced"
        z = real(z_buf, *args)
        alive.append(weakref.ref(z))
        return z

    monkeypatch.setattr(tp, "logits_block", tracking)
    monkeypatch.setattr(tp, "default_chunk", lambda n, v, hdim, blocks=2: 7)  # several chunks per pass
    monkeypatch.setattr(tp, "env_chunk_rows", lambda *a: 12)
    t = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = _ops(h, w, b, y, env)[op](*t)
    torch.autograd.grad(loss, t)
    assert len(alive) > 2
