"""The compiled row op of the CPU linear CE (csrc/linear_ce_rows.cpp) against fp64 formulas, and the torch
path with it against the torch path without it (UNLEARN_FAST_CE_ROWS=0)."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.ops import _torch_linear_ce as torch_path


@pytest.fixture(scope="module")
def ce_rows():
    from unlearn_fast.ops import _cpp

    if not _cpp.available():
        pytest.skip("compiled extension not available")
    return _cpp.ops().ce_rows_


def reference(z, target, shift, want_ez, a0, a1, b, c):
    """The row op's contract in fp64 with plain torch ops (see the comment at the top of linear_ce_rows.cpp)."""
    z = z.double()
    if shift is None:
        m = z.amax(1, keepdim=True)
        e = (z - m).exp()
        total = e.sum(1, keepdim=True)
        lse = (m + total.log()).squeeze(1)
    else:
        s = shift.double().unsqueeze(1)
        e = torch.where(torch.isinf(s), 0.0, (z - torch.where(torch.isinf(s), 0.0, s)).exp())
        total = torch.ones_like(s)
        lse = shift.double()
    zy = torch.where(target >= 0, z.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
    ez = (e * z).sum(1) / total.squeeze(1)
    if c is None:
        return lse, zy, ez, None
    a = a0.double() + (a1.double() * ez if a1 is not None else 0)
    bb = b.double() if b is not None else torch.zeros_like(a)
    dz = e * (a.unsqueeze(1) + bb.unsqueeze(1) * z) / total
    rows = (target >= 0).nonzero().squeeze(1)
    dz[rows, target[rows]] -= c.double()[rows]
    return lse, zy, ez, dz


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("given_shift", [False, True])
@pytest.mark.parametrize("terms", ["stats", "a", "a_b", "a_ez_b"])
@pytest.mark.parametrize("length", [5, 123, 2500])  # shorter than a vector, odd tail, several sum pieces
def test_row_op_matches_fp64(ce_rows, dtype, given_shift, terms, length):
    g = torch.Generator().manual_seed(length)
    rows = 7
    z = (torch.randn(rows, length, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, length, (rows,), generator=g)
    target[2] = -1  # target outside the block
    shift = None
    if given_shift:
        shift = torch.logsumexp(z.double(), 1).to(dtype)
        shift[4] = torch.inf  # an ignored token: p = 0 whatever its logits
    vec = lambda: torch.randn(rows, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    a0 = a1 = b = c = None
    if terms != "stats":
        a0, c = vec(), vec()
    if "b" in terms:
        b = vec()
    if "ez" in terms:
        a1 = vec()
    want_ez = terms in ("stats", "a_ez_b")
    ref = reference(z, target, shift, want_ez, a0, a1, b, c)
    work = z.clone()
    lse, zy, ez = ce_rows(work, target, shift, want_ez, a0, a1, b, c)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref[0], **tol)
    torch.testing.assert_close(zy.double(), ref[1], **tol)
    if want_ez:
        torch.testing.assert_close(ez.double(), ref[2], **tol)
    if c is None:
        assert torch.equal(work, z)  # stats only: z untouched
    else:
        torch.testing.assert_close(work.double(), ref[3], **tol)


def test_row_op_rejects_bad_input(ce_rows):
    z = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match="target"):
        ce_rows(z, torch.zeros(3, dtype=torch.int32), None, False, None, None, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        ce_rows(z, torch.tensor([0, 10, 1]), None, False, None, None, None, None)
    with pytest.raises(RuntimeError, match="a0"):
        ce_rows(z, torch.zeros(3, dtype=torch.long), None, False, torch.zeros(4), None, None, None)


def _run_ops(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    n, hdim, vocab, envs = 61, 17, 203, 3
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g, dtype=torch.float64) / 2).to(dtype).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::7] = -100
    env = torch.randint(0, envs, (n,), generator=g)
    out = []
    for op in ("ce", "ce_none", "irm", "penalty", "penalty_unbiased", "sequence"):
        for t in (h, w, bias):
            t.grad = None
        kw = dict(linear_bias=bias, backend="torch", chunk_size=16)
        if op == "ce":
            loss = uf.ops.linear_cross_entropy(h, w, y, **kw)
        elif op == "ce_none":  # recompute in backward: the token walk (chunk) and the vocabulary walk (N < V)
            loss = (uf.ops.linear_cross_entropy(h, w, y, reduction="none", **kw) * torch.arange(n)).sum()
        elif op == "irm":
            res = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=envs, **kw)
            loss = res.env_loss.sum() + 3 * res.penalty
        elif op == "sequence":  # NPO-like φ of whole rows (the per-row slope comes between the two row-op calls)
            rows_h, rows_y = h[:60].view(4, 15, hdim), y[:60].view(4, 15)
            loss = uf.ops.sequence_loss(rows_h, w, rows_y, lambda nll, ids: nll.log1p() * (ids + 1),
                                        **kw).loss
        else:
            loss = uf.ops.irm_penalty(h, w, y, env, num_envs=envs, unbiased=op.endswith("unbiased"), **kw).penalty
        loss.backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone(), bias.grad.clone()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_path_same_numbers_with_and_without_row_op(ce_rows, monkeypatch, dtype):
    calls = []
    real = torch_path.row_kernel

    def counting(device, dt):
        kernel = real(device, dt)
        if kernel is None:
            return None
        return lambda *args: calls.append(1) or kernel(*args)

    monkeypatch.setattr(torch_path, "row_kernel", counting)
    fused = _run_ops(0, dtype)
    assert calls, "the row op was not used"
    monkeypatch.setattr(torch_path, "use_row_kernel", False)
    calls.clear()
    plain = _run_ops(0, dtype)
    assert not calls
    if dtype == torch.float64:
        for got, want in zip(fused, plain):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
        return
    # fp32: the row op's error against the fp64 truth is at most the torch ops' error plus a small slack
    monkeypatch.setattr(torch_path, "use_row_kernel", False)
    truth = _run_ops(0, torch.float64)
    for got, want, true in zip(fused, plain, truth):
        for a, b, t in zip(got, want, truth and true):
            scale = float(t.abs().max())
            err, base = float((a.double() - t).abs().max()), float((b.double() - t).abs().max())
            assert err <= base + 1e-6 * scale, (err, base, scale)
