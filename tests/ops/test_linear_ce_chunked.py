"""The atomics-free CUDA path (backend "triton_chunked": cuBLAS-style chunks + the Triton row kernel)
and the torch path's CUDA branch (bf16 matmuls, fp32 accumulation), both forced on the CPU.

The row kernel runs under the Triton interpreter here; the chunk matmuls are torch's. Tolerance
rule (DESIGN.md): error against fp64 truth at most the same-dtype naive reference's plus a slack.
"""
from __future__ import annotations

import os

import pytest
import torch

import unlearn_fast as uf
from tests.conftest import HAS_TRITON
from unlearn_fast.testing.reference import naive_irm, naive_linear_ce, naive_sequence_nll

N, H, V, E = 29, 17, 75, 3  # odd shapes, few row programs (the interpreter runs each one)
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # interpreted on the CPU, compiled on a GPU
pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton on a GPU or under TRITON_INTERPRET=1")


def inputs(dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    return [t.to(DEVICE) if t is not None else None for t in (h, w, b, y)]


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in tensors]


def err(a, truth):
    return (a.detach().double() - truth.detach().double()).abs().max().item()


def check(ours, naive, truth, dtype, what):
    limit = err(naive, truth) + SLACK[dtype] * max(truth.detach().abs().max().item(), 1.0)
    assert err(ours, truth) <= limit, f"{what}: {err(ours, truth):.3g} > {limit:.3g}"


def compare(dtype, loss_of, bias=True, seed=0):
    """loss_of(h, w, b, backend|None) -> scalar; None = naive reference. Values and grads of h, w, b."""
    h, w, b, _ = inputs(dtype, seed, bias)
    results = {}
    runs = (("truth", torch.float64, None), ("naive", None, None), ("ours", None, "triton_chunked"))
    for name, cast, backend in runs:
        t = leaves((h, w, b), cast)
        loss = loss_of(*t, backend)
        grads = torch.autograd.grad(loss, [x for x in t if x is not None])
        results[name] = (loss, grads, t)
    (lt, gt, _), (ln, gn, _), (lo, go, to) = results["truth"], results["naive"], results["ours"]
    check(lo, ln, lt, dtype, "loss")
    for i, (a, n_, t_) in enumerate(zip(go, gn, gt)):
        assert a.dtype == to[i].dtype
        check(a, n_, t_, dtype, f"grad {'hwb'[i]}")


# -- the row kernel itself ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernel_statistics_and_gradient(dtype):
    from unlearn_fast.kernels.linear_ce_rows import rows_

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(7, 150, generator=g) * 4).to(dtype).to(DEVICE)
    y = torch.randint(0, 150, (7,), generator=g).to(DEVICE)
    y[2] = -1  # no label
    z64 = z.double()
    valid = y != -1
    lse_t = torch.where(valid, z64.logsumexp(1), 0)
    zy_t = torch.where(valid, z64.gather(1, y.clamp(min=0)[:, None])[:, 0], 0)
    ez_t = torch.where(valid, (z64.softmax(1) * z64).sum(1), 0)
    lse, zy, ez = rows_(z.clone(), y, -1, want_ez=True)
    for got, want in ((lse, lse_t), (zy, zy_t), (ez, ez_t)):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    a, b, c = (torch.rand(7, generator=g).to(DEVICE) for _ in range(3))
    dz = z.clone()
    rows_(dz, y, -1, want_ez=True, coeffs=(a, b, c))  # statistics and gradient in one launch
    p = (z64 - lse_t[:, None]).exp()
    want = p * (a.double()[:, None] + b.double()[:, None] * z64)
    want[valid.nonzero()[:, 0], y[valid]] -= c.double()[valid]
    want[~valid] = 0
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(dz.double(), want, atol=tol, rtol=tol)
    dz2 = z.clone()
    rows_(dz2, y, -1, lse=torch.where(valid, lse, torch.inf), coeffs=(a, None, c))  # gradient only, lse known
    want2 = p * a.double()[:, None]
    want2[valid.nonzero()[:, 0], y[valid]] -= c.double()[valid]
    want2[~valid] = 0
    assert torch.allclose(dz2.double(), want2, atol=tol, rtol=tol)


def test_row_kernel_propagates_nan():
    from unlearn_fast.kernels.linear_ce_rows import rows_

    z = torch.randn(2, 70, device=DEVICE)
    z[1, 5] = float("nan")
    lse, _, _ = rows_(z, torch.tensor([3, 4], device=DEVICE), -1)
    assert torch.isfinite(lse[0]) and torch.isnan(lse[1])


# -- the ops on the chunked CUDA path -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce(dtype, reduction):
    _, _, _, y = inputs(dtype)
    up = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)

    def loss_of(h, w, b, backend):
        if backend is None:
            out = naive_linear_ce(h, w, y, b, reduction)
        else:
            out = uf.ops.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, backend=backend,
                                              chunk_size=16)
        return (out.double() * up).sum() if reduction == "none" else out

    compare(dtype, loss_of)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [False, True])
def test_ce_irm_with_an_empty_environment(dtype, unbiased):
    _, _, _, y = inputs(dtype)
    env = torch.arange(N, device=DEVICE) % E
    env[env == 2] = 1  # environment 2 has no token
    halves = uf.ops.linear_ce._unbiased_halves(env, y != -100, E, (N,)) if unbiased else None

    def loss_of(h, w, b, backend):
        if backend is None:
            loss, s, pen = naive_irm(h, w, y, env, E, b, unbiased=unbiased, halves=halves)
        else:
            out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=E, linear_bias=b, unbiased=unbiased,
                                                  backend=backend, chunk_size=16)
            loss, s, pen = out
            assert float(loss[2].detach()) == 0 and float(s[2].detach()) == 0
        return loss.sum() + 3 * pen + s.sum()

    compare(dtype, loss_of)


@pytest.mark.parametrize("dtype,unbiased", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("chunk", [16, 4])  # every environment in one chunk (irm_objective's pass); per-group buffers
def test_irm_penalty_gradient_in_forward(dtype, unbiased, chunk):
    _, _, _, y = inputs(dtype)
    env = torch.arange(N, device=DEVICE) * E // N
    halves = uf.ops.linear_ce._unbiased_halves(env, y != -100, E, (N,)) if unbiased else None

    def loss_of(h, w, b, backend):
        if backend is None:
            return naive_irm(h, w, y, env, E, b, unbiased=unbiased, halves=halves)[2]
        return uf.ops.irm_penalty(h, w, y, env, num_envs=E, linear_bias=b, unbiased=unbiased, backend=backend,
                                  chunk_size=chunk).penalty

    compare(dtype, loss_of)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_irm_one_chunk_keeps_its_logits_and_backward_twice_recomputes(dtype, monkeypatch):
    """All rows in one chunk: the forward's logits serve the backward (no recompute matmul); the dz is formed in
    them in place, so a second backward (retain_graph) recomputes: both give the reference gradients."""
    from unlearn_fast.ops import _chunked_linear_ce

    _, _, _, y = inputs(dtype)
    env = torch.arange(N, device=DEVICE) % E
    recomputes = []
    real = _chunked_linear_ce.chunked_pass
    def spy(*a, **k):
        recomputes.append(k.get("lse") is not None)
        return real(*a, **k)

    monkeypatch.setattr(_chunked_linear_ce, "chunked_pass", spy)

    def loss_of(h, w, b, backend):
        if backend is None:
            loss, s, pen = naive_irm(h, w, y, env, E, b)
        else:
            loss, s, pen = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=E, linear_bias=b, backend=backend)
        return loss.sum() + 3 * pen + s.sum()

    compare(dtype, loss_of)
    assert recomputes == [], "one chunk: no pass in backward"
    h, w, b, _ = inputs(dtype)
    hh, ww = leaves((h, w))
    loss = loss_of(hh, ww, b, "triton_chunked")
    first = torch.autograd.grad(loss, (hh, ww), retain_graph=True)
    second = torch.autograd.grad(loss, (hh, ww))
    assert recomputes == [True]
    for a, c in zip(first, second):
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(a.float(), c.float(), rtol=tol, atol=tol)


def test_irm_penalty_strategy_on_cuda(monkeypatch):
    """On CUDA irm_penalty takes every environment in one chunk when they fit (irm_objective with w = 0, λ = 1: no
    per-group buffers); otherwise per-group buffers, or with few tokens a recompute in backward: same numbers."""
    from unlearn_fast.ops import _chunked_linear_ce, irm_losses

    h, w, b, y = inputs(torch.float32)
    env = torch.arange(N, device=DEVICE) * E // N  # 9-10 labelled rows per environment

    def run(chunk):
        hh, ww = leaves((h, w))
        out = uf.ops.irm_penalty(hh, ww, y, env, num_envs=E, linear_bias=b, backend="triton_chunked",
                                 chunk_size=chunk)
        return out.penalty, torch.autograd.grad(out.penalty, (hh, ww)), type(out.penalty.grad_fn).__name__

    assert not _chunked_linear_ce.penalty_recompute_is_cheaper(10, 4, torch.device("cpu"))
    assert _chunked_linear_ce.penalty_recompute_is_cheaper(2048, 4, torch.device("cuda"))
    p_one, g_one, fn = run(16)
    assert fn.startswith("_IRMObjective")
    monkeypatch.setattr(irm_losses.cuda_chunked, "penalty_recompute_is_cheaper", lambda n, groups, device: True)
    p_re, g_re, fn = run(4)
    assert not fn.startswith(("_IRMPenalty", "_IRMObjective"))
    monkeypatch.setattr(irm_losses.cuda_chunked, "penalty_recompute_is_cheaper", lambda n, groups, device: False)
    p_fwd, g_fwd, fn = run(4)
    assert fn.startswith("_IRMPenalty")
    for p, g in ((p_re, g_re), (p_fwd, g_fwd)):
        assert torch.allclose(p, p_one, rtol=1e-5, atol=1e-6)
        for a, c in zip(g, g_one):
            assert torch.allclose(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequence_nll_and_sequence_loss(dtype):
    _, _, _, y = inputs(dtype)
    seq = torch.arange(N, device=DEVICE) * 4 // N

    def nll_of(h, w, b, backend):
        if backend is None:
            nll = naive_sequence_nll(h, w, y, seq, 4, b)[0]
        else:
            nll = uf.ops.sequence_nll(h, w, y, seq, num_seqs=4, linear_bias=b, backend=backend, chunk_size=16).nll
        return (nll * torch.arange(1.0, 5.0, dtype=nll.dtype, device=DEVICE)).sum()

    compare(dtype, nll_of)
    rows = torch.arange(N - 1, device=DEVICE)  # [4, 7, H]: one sequence per row for sequence_loss
    y2 = y[rows].view(4, 7)
    phi = lambda nll, ids: torch.nn.functional.logsigmoid(-0.1 * nll) * (ids + 1)  # noqa: E731

    def loss_of(h, w, b, backend):
        h2 = h[rows].view(4, 7, H)
        if backend is None:
            seq2 = torch.arange(4, device=DEVICE).repeat_interleave(7).view(4, 7)
            nll = naive_sequence_nll(h2, w, y2, seq2, 4, b)[0]
            return phi(nll, torch.arange(4, device=DEVICE)).sum()
        return uf.ops.sequence_loss(h2, w, y2, phi, linear_bias=b, backend=backend).loss

    compare(dtype, loss_of)


def test_auto_is_the_chunked_path_on_cuda_and_torch_on_cpu():
    from unlearn_fast.ops._checks import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton_chunked"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "torch"


def test_float64_is_refused_by_name():
    h, w, b, y = inputs(torch.float64)
    with pytest.raises(TypeError, match="triton_chunked"):
        uf.ops.linear_cross_entropy(h, w, y, backend="triton_chunked")


# -- the torch path's CUDA branch -----------------------------------------------------------------

def test_matmul_dtype_policy():
    from unlearn_fast.ops._matmul import matmul_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert matmul_dtype(torch.bfloat16, cuda) == torch.bfloat16
    assert matmul_dtype(torch.float16, cuda) == torch.float16
    assert matmul_dtype(torch.float32, cuda) == torch.float32
    assert matmul_dtype(torch.bfloat16, cpu) == torch.float32  # the CPU path keeps its numbers
    assert matmul_dtype(torch.float64, cuda) == torch.float64


@pytest.mark.parametrize("callable_coeffs", [False, True])
def test_torch_path_cuda_branch_multiplies_in_bf16_and_accumulates_in_fp32(monkeypatch, callable_coeffs):
    """chunked_pass with the CUDA policy (bf16 operands) forced on the CPU: every matmul gets bf16
    operands (W is never upcast), results and sums stay fp32, numbers within the rule."""
    from unlearn_fast.ops import _matmul
    from unlearn_fast.ops import _torch_linear_ce as tp

    seen = []
    real = tp.mm_into

    def spy(out, a, b, **kw):
        seen.append((a.dtype, b.dtype, out.dtype))
        return real(out, a, b, **kw)

    monkeypatch.setattr(tp, "mm_into", spy)  # the logits
    monkeypatch.setattr(_matmul, "mm_into", spy)  # d input and d weight (dh_into, dw_into)
    h, w, b, y = (t.cpu() for t in inputs(torch.bfloat16))  # the CPU emulation of the CUDA branch
    valid = y != -100
    ones = valid.float()
    coeffs = (lambda lse, zy, ez: tp.Coeffs(torch.ones_like(lse), None, torch.ones_like(lse))) if callable_coeffs \
        else tp.Coeffs(ones, None, ones)
    (lse, zy, _), (d_h, d_w, d_b) = tp.chunked_pass(h, w, b, y, valid, coeffs=coeffs, chunk=8,
                                                    matmul=torch.bfloat16)
    assert seen and all(a == torch.bfloat16 and bb == torch.bfloat16 and o == torch.float32 for a, bb, o in seen)
    assert d_w.dtype == torch.float32 and d_h.dtype == torch.float32
    truth_in = leaves((h, w, b), torch.float64)
    naive_in = leaves((h, w, b))
    truth = naive_linear_ce(*truth_in[:2], y, truth_in[2], "sum")
    naive = naive_linear_ce(*naive_in[:2], y, naive_in[2], "sum")
    gt = torch.autograd.grad(truth, truth_in)
    gn = torch.autograd.grad(naive, naive_in)
    check((lse - zy).sum(), naive, truth, torch.bfloat16, "loss")
    for ours, n_, t_ in zip((d_h, d_w, d_b), gn, gt):
        check(ours, n_, t_, torch.bfloat16, "grad")


def test_mm_into_falls_back_with_a_warning_when_fp32_output_is_refused(monkeypatch):
    from unlearn_fast.ops import _matmul

    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(6, 9, generator=g).bfloat16(), torch.randn(9, 4, generator=g).bfloat16()
    want = a.double() @ b.double()
    out = torch.zeros(6, 4)
    _matmul.mm_into(out, a, b)  # the CPU emulation
    assert torch.allclose(out.double(), want, atol=1e-5)
    _matmul.mm_into(out, a, b, accumulate=True)
    assert torch.allclose(out.double(), 2 * want, atol=1e-5)
    # a CUDA-like refusal: warned once, then the emulation
    monkeypatch.setattr(_matmul, "_out_dtype_failed", None)
    monkeypatch.setattr(_matmul, "_fp32_out_supported", lambda t: _matmul._out_dtype_failed is None)
    with pytest.warns(RuntimeWarning, match="out_dtype"):
        _matmul.mm_into(out, a, b)  # torch refuses out_dtype on the CPU: the path a GPU would take on refusal
    assert _matmul._out_dtype_failed is not None
    assert torch.allclose(out.double(), want, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_fp64_on_gpu_with_several_chunks(dtype, monkeypatch):
    """On a real GPU: cuBLAS chunks with fp32 outputs (no fallback warning), several chunks, every op."""
    import warnings

    from unlearn_fast.ops import _chunked_linear_ce

    monkeypatch.setattr(_chunked_linear_ce, "_WORKSPACE_ELEMS", 300 * 5003)  # 4 chunks of 300 rows
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vocab = 1000, 256, 5003
    h0 = (torch.randn(n, hidden, device="cuda", generator=g) * 0.5).to(dtype)
    w0 = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.1).to(dtype)
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    env = torch.randint(0, 4, (n,), device="cuda", generator=g)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for op in ("ce", "irm", "objective", "penalty", "penalty recompute", "penalty buffers"):
            if op == "penalty recompute":  # environments too large for one chunk: the op's rule (few tokens)
                monkeypatch.setattr(_chunked_linear_ce, "env_chunk_rows", lambda *a: 1)
            if op == "penalty buffers":  # and the per-group-buffer strategy as well
                monkeypatch.setattr(_chunked_linear_ce, "penalty_recompute_is_cheaper", lambda *a: False)
            res = {}
            for be, cast in (("triton_chunked", None), ("torch", torch.float64)):
                h = h0.to(cast or dtype).requires_grad_()
                w = w0.to(cast or dtype).requires_grad_()
                if op == "ce":
                    loss = uf.ops.linear_cross_entropy(h, w, y, backend=be)
                elif op == "irm":
                    out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=4, backend=be)
                    loss = out.env_loss.sum() + out.penalty
                elif op == "objective":
                    loss = uf.ops.irm_objective(h, w, y, env, num_envs=4, penalty_weight=3.0, backend=be).loss
                else:
                    loss = uf.ops.irm_penalty(h, w, y, env, num_envs=4, backend=be).penalty
                res[be] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
            for a, c in zip(res["triton_chunked"], res["torch"]):
                torch.testing.assert_close(a.double(), c.double(), atol=tol, rtol=tol)
