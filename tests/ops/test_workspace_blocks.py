"""The CPU path's reused logits blocks: taken out of the cache while in use, never read before written."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.ops import _matmul
from unlearn_fast.ops import _torch_linear_ce as tp


def test_a_block_is_reused_after_give_back_and_not_while_taken():
    tp.release_blocks()
    a = tp.take_block(3, 5, torch.float32, torch.device("cpu"))
    b = tp.take_block(3, 5, torch.float32, torch.device("cpu"))  # a is out: b is another buffer
    assert a.data_ptr() != b.data_ptr()
    tp.give_back(a)
    c = tp.take_block(2, 4, torch.float32, torch.device("cpu"))  # smaller: a's storage serves
    assert c.data_ptr() == a.data_ptr() and c.shape == (2, 4)
    assert tp.take_block(2, 4, torch.float32, torch.device("cpu")).data_ptr() != c.data_ptr()  # c is out
    tp.give_back(c)
    d = tp.take_block(4, 5, torch.float32, torch.device("cpu"))  # larger than any spare: fresh, and
    assert d.shape == (4, 5) and d.data_ptr() not in (a.data_ptr(), b.data_ptr())
    assert not tp._blocks.spare[torch.float32]  # the spares too small to serve are freed, not kept beside it
    tp.give_back(torch.empty(7, 2, dtype=torch.float64).view(-1))  # another dtype, its own list
    assert [t.numel() for t in tp._blocks.spare[torch.float64]] == [14]
    assert all(t.dtype == torch.float32 for t in tp._blocks.spare.get(torch.float32, []))
    tp.release_blocks()
    assert not tp._blocks.spare


def _ops_outputs(h, w, y, env, seq_fn):
    out = {}
    for name, fn in {
        "ce": lambda hh, ww: uf.ops.linear_cross_entropy(hh, ww, y, backend="torch"),
        "penalty": lambda hh, ww: uf.ops.irm_penalty(hh, ww, y, env, num_envs=2, backend="torch").penalty,
        "sequence": lambda hh, ww: uf.ops.sequence_loss(hh.view(2, 12, -1), ww, y.view(2, 12), seq_fn,
                                                        backend="torch").loss,
        "none": lambda hh, ww: uf.ops.linear_cross_entropy(hh, ww, y, reduction="none", backend="torch").sum(),
    }.items():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww)
        loss.backward()
        out[name] = (loss.detach(), hh.grad, ww.grad)
    return out


@pytest.mark.parametrize("row_op", [True, False])
def test_cached_blocks_full_of_nan_change_nothing(row_op, monkeypatch):
    """Every op gives bit-identical results from fresh blocks and from reused ones holding NaN (with the
    torch ops a pass holds two blocks at once: they must be distinct)."""
    monkeypatch.setattr(tp, "use_row_kernel", row_op and tp.use_row_kernel)
    monkeypatch.setitem(_matmul._onednn_state, "use", "mkl")  # the blocks are MKL's workspace (oneDNN writes its own)
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(24, 7, generator=g), torch.randn(41, 7, generator=g)
    y = torch.randint(0, 41, (24,), generator=g)
    y[5] = -100
    env = torch.arange(24) % 2
    seq_fn = lambda nll, ids: torch.nn.functional.logsigmoid(-0.1 * nll)  # noqa: E731

    real_take = tp.take_block
    try:
        tp.take_block = lambda rows, cols, dtype, device: torch.empty(rows, cols, dtype=dtype, device=device)
        fresh = _ops_outputs(h, w, y, env, seq_fn)
    finally:
        tp.take_block = real_take
    tp.release_blocks()
    for _ in range(2):
        tp.give_back(torch.full((24 * 41 * 2,), float("nan")))
    reused = _ops_outputs(h, w, y, env, seq_fn)
    assert tp._blocks.spare[torch.float32], "the ops give their blocks back"
    for name in fresh:
        for a, b in zip(fresh[name], reused[name]):
            assert torch.equal(a, b), name
    tp.release_blocks()


def test_reference_nll_leaves_no_block_resident():
    """NPO's reference NLL is a one-off pass before training (the plain loop uses it too): no block kept."""
    from unlearn_fast.data.models import build_llama

    model = build_llama(64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, seed=0)
    examples = [{"input_ids": torch.arange(1, 9), "labels": torch.arange(1, 9)}]
    tp.release_blocks()
    uf.reference_nll(model, examples)
    assert not any(tp._blocks.spare.values())


def test_no_block_is_larger_than_the_head(monkeypatch):
    """A pass's logits block holds at most max(V·H, 2**20) elements (the head's own size, which a gradient
    pass holds anyway as d weight), whatever the number of tokens: with and without a gradient, for every
    op, the IRM penalty's groups straight into the totals included. Chunking changes no figure beyond
    fp32 rounding (against an fp64 reference in one piece)."""
    vocab, hidden, seqs, length = 8192, 32, 4, 128  # V·H = 2**18 < 2**20: blocks of at most 128 rows
    limit = tp.workspace_elems(vocab, hidden)
    assert limit == 1 << 20
    g = torch.Generator().manual_seed(5)
    h = torch.randn(seqs * length, hidden, generator=g) * 0.3
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    y = torch.randint(0, vocab, (seqs * length,), generator=g)
    one_env = torch.zeros(seqs * length, dtype=torch.long)
    taken = []
    real_take = tp.take_block

    def spy(rows, cols, dtype, device):
        taken.append(rows * cols)
        return real_take(rows, cols, dtype, device)

    real_logits = tp.logits_block

    def logits_spy(z_buf, hc, weight, bias):  # with oneDNN as the GEMM engine its result is the block
        taken.append(hc.shape[0] * weight.shape[0])
        return real_logits(z_buf, hc, weight, bias)

    monkeypatch.setattr(tp, "take_block", spy)
    monkeypatch.setattr(tp, "logits_block", logits_spy)
    tp.release_blocks()
    seq_fn = lambda nll, ids: -torch.nn.functional.logsigmoid(-0.1 * nll)  # noqa: E731
    ops = {
        "ce": lambda hh, ww: uf.ops.linear_cross_entropy(hh, ww, y, backend="torch"),
        "none": lambda hh, ww: uf.ops.linear_cross_entropy(hh, ww, y, reduction="none", backend="torch").sum(),
        "penalty, one environment": lambda hh, ww: uf.ops.irm_penalty(hh, ww, y, one_env, num_envs=1,
                                                                       backend="torch").penalty,
        # 160 rows: more than a block (128) but what a group straight into totals already written may take
        "penalty, 160 rows": lambda hh, ww: uf.ops.irm_penalty(hh[:160], ww, y[:160], one_env[:160], num_envs=1,
                                                               backend="torch").penalty,
        "sequence": lambda hh, ww: uf.ops.sequence_loss(hh.view(seqs, length, -1), ww, y.view(seqs, length),
                                                        seq_fn, backend="torch").loss,
    }
    for name, fn in ops.items():
        taken.clear()
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        fn(hh, ww).backward()
        with torch.no_grad():
            fn(h, w)
        assert taken and max(taken) <= limit, (name, max(taken), limit)
        if name == "ce":
            h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
            torch.nn.functional.cross_entropy(h64 @ w64.T, y).backward()
            torch.testing.assert_close(hh.grad, h64.grad.float(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(ww.grad, w64.grad.float(), rtol=1e-4, atol=1e-7)
    tp.release_blocks()
