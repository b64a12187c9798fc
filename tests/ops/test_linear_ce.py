"""uf.ops.linear_cross_entropy / linear_cross_entropy_irm / sequence_nll against naive references.

Tolerance rule (DESIGN.md): the op's error against an fp64 ground truth is at
most the same-dtype naive reference's error plus a small slack.
"""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing.reference import halves_like_op, naive_irm, naive_linear_ce, naive_sequence_nll

N, H, V, E = 47, 31, 123, 3  # odd shapes on purpose
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make_inputs(dtype, *, bias=True, seed=0, shape=(N,), ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[::ignore_every] = -100
    # Round once to the test dtype so that every implementation sees the same values.
    h, w = h.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    return [t.to(device) if t is not None else None for t in (h, w, b, y)]


def leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).requires_grad_()


def max_err(a, truth):
    return (a.detach().double() - truth.detach().double()).abs().max().item()


def assert_within_rule(ours, naive, truth, slack, what):
    scale = max(truth.detach().abs().max().item(), 1.0)
    limit = max_err(naive, truth) + slack * scale
    err = max_err(ours, truth)
    assert err <= limit, f"{what}: error {err:.3g} > naive error + slack {limit:.3g}"


def grads_of(loss, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_ce_matches_reference(backend, dtype, reduction, bias):
    h, w, b, y = make_inputs(dtype, bias=bias)
    upstream = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(fn, tensors):
        out = fn(*tensors)
        loss = (out.double() * upstream).sum() if reduction == "none" else out
        return out, grads_of(loss, tensors)

    truth_in = [leaf(t, torch.float64) for t in (h, w, b)]
    naive_in = [leaf(t) for t in (h, w, b)]
    ours_in = [leaf(t) for t in (h, w, b)]
    truth = run(lambda h, w, b=None: naive_linear_ce(h, w, y, b, reduction), [t for t in truth_in if t is not None])
    naive = run(lambda h, w, b=None: naive_linear_ce(h, w, y, b, reduction), [t for t in naive_in if t is not None])
    ours = run(
        lambda h, w, b=None: uf.ops.linear_cross_entropy(h, w, y, linear_bias=b, reduction=reduction, backend=backend),
        [t for t in ours_in if t is not None],
    )
    assert ours[0].dtype == torch.float32
    assert ours[0].shape == truth[0].shape
    assert_within_rule(ours[0], naive[0], truth[0], SLACK[dtype], "loss")
    for name, g_ours, g_naive, g_truth, t in zip("hwb", ours[1], naive[1], truth[1], ours_in):
        assert g_ours.dtype == t.dtype, f"grad of {name} must come back in the input dtype"
        assert_within_rule(g_ours, g_naive, g_truth, SLACK[dtype], f"grad {name}")


def test_linear_ce_batched_input_and_int32_target(backend):
    h, w, b, y = make_inputs(torch.float32, shape=(3, 9))
    ours = uf.ops.linear_cross_entropy(h, w, y.int(), linear_bias=b, reduction="none", backend=backend)
    ref = naive_linear_ce(h.double(), w.double(), y, b.double(), "none")
    assert ours.shape == (3, 9)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_grads(backend):
    h, w, b, _ = make_inputs(torch.float32)
    y = torch.full((N,), -100)
    hh, ww, bb = leaf(h), leaf(w), leaf(b)
    loss = uf.ops.linear_cross_entropy(hh, ww, y, linear_bias=bb, backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    for t in (hh, ww, bb):
        assert torch.count_nonzero(t.grad) == 0


def test_nan_input_propagates(backend):
    h, w, b, y = make_inputs(torch.float32)
    h[3, 4] = float("nan")
    y[3] = 1
    assert torch.isnan(uf.ops.linear_cross_entropy(h, w, y, linear_bias=b, backend=backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_irm_matches_double_backprop_reference(backend, dtype, unbiased, batched):
    shape = (5, 10) if batched else (N,)
    h, w, b, y = make_inputs(dtype, shape=shape, seed=2)
    g = torch.Generator().manual_seed(3)
    num_envs = E + 1  # the last environment is empty
    env = torch.randint(0, E, shape, generator=g)
    if batched:  # environments per sequence, as the trainer builds them
        env = torch.randint(0, E, (shape[0], 1), generator=g).expand(shape).contiguous()
    halves = halves_like_op(y, env, num_envs, batched) if unbiased else None
    up = [torch.rand(num_envs, generator=g, dtype=torch.float64) for _ in range(2)] + [torch.tensor(3.0, dtype=torch.float64)]

    def combine(outs):
        return sum((o.double() * u).sum() for o, u in zip(outs, up))

    results = {}
    for kind, dt in (("truth", torch.float64), ("naive", None), ("ours", None)):
        tensors = [leaf(t, dt) for t in (h, w, b)]
        if kind == "ours":
            outs = uf.ops.linear_cross_entropy_irm(tensors[0], tensors[1], y, env, num_envs=num_envs,
                                                   linear_bias=tensors[2], unbiased=unbiased, backend=backend)
        else:
            outs = naive_irm(*tensors[:2], y, env, num_envs, bias=tensors[2], unbiased=unbiased, halves=halves)
        results[kind] = (outs, grads_of(combine(outs), tensors))
    ours, naive, truth = results["ours"], results["naive"], results["truth"]
    for name, o, n, t in zip(("env_loss", "env_scale_grad", "penalty"), ours[0], naive[0], truth[0]):
        assert_within_rule(o, n, t, SLACK[dtype], name)
    assert ours[0].env_loss[-1].item() == 0 and ours[0].env_scale_grad[-1].item() == 0
    for name, o, n, t in zip("hwb", ours[1], naive[1], truth[1]):
        assert_within_rule(o, n, t, SLACK[dtype], f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("chunk", [None, 4])
def test_irm_penalty_gradient_in_forward_matches_double_backprop(backend, dtype, unbiased, batched, chunk):
    """irm_penalty forms ∂P/∂(h, W, b) during its forward pass, group by group (torch path; Triton falls back)."""
    if backend == "triton" and chunk is not None:
        pytest.skip("chunk_size is a torch-path setting")
    shape = (5, 10) if batched else (N,)
    h, w, b, y = make_inputs(dtype, shape=shape, seed=5)
    g = torch.Generator().manual_seed(6)
    num_envs = E + 1  # the last environment is empty
    env = torch.randint(0, E, shape, generator=g)
    if batched:
        env = torch.randint(0, E, (shape[0], 1), generator=g).expand(shape).contiguous()
    halves = halves_like_op(y, env, num_envs, batched) if unbiased else None
    results = {}
    for kind, dt in (("truth", torch.float64), ("naive", None), ("ours", None)):
        tensors = [leaf(t, dt) for t in (h, w, b)]
        if kind == "ours":
            outs = uf.ops.irm_penalty(tensors[0], tensors[1], y, env, num_envs=num_envs, linear_bias=tensors[2],
                                      unbiased=unbiased, backend=backend, chunk_size=chunk)
            assert not outs.env_loss.requires_grad and not outs.env_scale_grad.requires_grad
        else:
            outs = naive_irm(*tensors[:2], y, env, num_envs, bias=tensors[2], unbiased=unbiased, halves=halves)
        results[kind] = (outs, grads_of(3.0 * outs[2], tensors))
    ours, naive, truth = results["ours"], results["naive"], results["truth"]
    for name, o, n, t in zip(("env_loss", "env_scale_grad", "penalty"), ours[0], naive[0], truth[0]):
        assert_within_rule(o, n, t, SLACK[dtype], name)
    for name, o, n, t in zip("hwb", ours[1], naive[1], truth[1]):
        assert o.dtype == dtype
        assert_within_rule(o, n, t, SLACK[dtype], f"grad {name}")
    # a real penalty gradient, not a vanishing one the tolerance would hide
    assert truth[1][1].abs().max().item() > 1e-2


def test_irm_penalty_refuses_second_backward_and_falls_back_without_grad():
    h, w, b, y = make_inputs(torch.float32)
    env = torch.zeros(N, dtype=torch.long)
    out = uf.ops.irm_penalty(leaf(h), leaf(w), y, env, num_envs=1, linear_bias=b, backend="torch")
    out.penalty.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="irm_penalty .* cannot backward twice"):
        out.penalty.backward()
    with torch.no_grad():
        again = uf.ops.irm_penalty(h, w, y, env, num_envs=1, linear_bias=b, backend="torch")
    full = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=1, linear_bias=b, backend="torch")
    torch.testing.assert_close(again.penalty, full.penalty, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.penalty.detach(), full.penalty, rtol=1e-5, atol=1e-7)


def test_irm_empty_environment_gets_zero_gradient(backend):
    h, w, b, y = make_inputs(torch.float32)
    env = torch.zeros(N, dtype=torch.long)
    env[y == -100] = 1  # environment 1 holds only ignored tokens
    hh = leaf(h)
    out = uf.ops.linear_cross_entropy_irm(hh, w, y, env, num_envs=2, linear_bias=b, backend=backend)
    assert out.env_loss[1].item() == 0 and out.env_scale_grad[1].item() == 0
    (out.env_loss[1] + out.env_scale_grad[1]).backward()
    assert torch.count_nonzero(hh.grad) == 0


def test_sequence_nll_matches_reference(backend):
    h, w, b, y = make_inputs(torch.float32, shape=(4, 12), seed=4)
    hh, ww = leaf(h), leaf(w)
    out = uf.ops.sequence_nll(hh, ww, y, linear_bias=b, backend=backend)
    seq = torch.arange(4).unsqueeze(1).expand(4, 12)
    h64, w64 = leaf(h, torch.float64), leaf(w, torch.float64)
    ref_nll, ref_count = naive_sequence_nll(h64, w64, y, seq, 4, b.double())
    torch.testing.assert_close(out.nll.double(), ref_nll, atol=1e-4, rtol=1e-5)
    assert torch.equal(out.num_tokens, ref_count)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    gh, gw = torch.autograd.grad((out.nll * weights).sum(), (hh, ww))
    rh, rw = torch.autograd.grad((ref_nll * weights.double()).sum(), (h64, w64))
    torch.testing.assert_close(gh.double(), rh, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64_torch_path():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (9,), generator=g)
    y[2] = -100
    env = torch.tensor([0, 1, 0, 1, 1, 0, 2, 2, 0])

    def irm(h, w, b):
        out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=3, linear_bias=b, backend="torch", chunk_size=4)
        return out.env_loss, out.env_scale_grad, out.penalty

    def irm_unbiased(h, w, b):
        return uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=3, linear_bias=b, unbiased=True,
                                               backend="torch", chunk_size=4).penalty

    def ce(h, w, b):  # reduction="none": the reduced path hands its gradient over once (tested below)
        return uf.ops.linear_cross_entropy(h, w, y, linear_bias=b, reduction="none", backend="torch", chunk_size=4)

    for fn in (irm, irm_unbiased, ce):
        assert torch.autograd.gradcheck(fn, (h, w, b))


def test_chunking_does_not_change_result():
    h, w, b, y = make_inputs(torch.float32)
    env = torch.arange(N) % E
    full = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=E, linear_bias=b, backend="torch", chunk_size=N)
    small = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=E, linear_bias=b, backend="torch", chunk_size=6)
    for a, c in zip(full, small):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)


def test_backend_from_environment_variable(monkeypatch):
    h, w, b, y = make_inputs(torch.float32)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        uf.ops.linear_cross_entropy(h, w, y)
    monkeypatch.setenv("UNLEARN_FAST_BACKEND", "torch")
    assert uf.ops.linear_cross_entropy(h, w, y).isfinite()


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(input=a["input"][:, :-1]), ValueError, "hidden size"),
        (lambda a: a.update(target=a["target"][:-1]), ValueError, "target must have shape"),
        (lambda a: a.update(target=a["target"].float()), TypeError, "target must be an int32 or int64"),
        (lambda a: a.update(env=a["env"] + 5), ValueError, r"env ids must be in \[0, num_envs=3\)"),
        (lambda a: a.update(env=a["env"][:-2]), ValueError, "env must have shape"),
        (lambda a: a.update(num_envs=0), ValueError, "num_envs must be a positive int"),
        (lambda a: a.update(linear_bias=torch.zeros(V + 1)), ValueError, "linear_bias must have shape"),
        (lambda a: a.update(target=torch.full((N,), V)), ValueError, "target values must be in"),
        (lambda a: a.update(input=a["input"].double()), TypeError, "same dtype"),
        (lambda a: a.update(input=a["input"].to("meta")), ValueError, "input is on meta"),
        (lambda a: a.update(linear_weight=a["linear_weight"].int()), TypeError, "linear_weight must be a floating"),
    ],
)
def test_bad_input_is_named(mutate, exc, match):
    h, w, b, y = make_inputs(torch.float32)
    args = dict(input=h, linear_weight=w, target=y, env=torch.arange(N) % 3, num_envs=3, linear_bias=b)
    mutate(args)
    with pytest.raises(exc, match=match):
        uf.ops.linear_cross_entropy_irm(
            args["input"], args["linear_weight"], args["target"], args["env"],
            num_envs=args["num_envs"], linear_bias=args["linear_bias"], backend="torch",
        )


def test_bad_reduction_and_sequence_ids():
    h, w, b, y = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        uf.ops.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="seq is required"):
        uf.ops.sequence_nll(h, w, y)
    with pytest.raises(ValueError, match=r"seq ids must be in \[0, num_seqs=2\)"):
        uf.ops.sequence_nll(h, w, y, torch.arange(N), num_seqs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_on_gpu_large_vocab(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vocab = 1000, 256, 5003
    h = (torch.randn(n, hidden, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    env = torch.randint(0, 4, (n,), device="cuda", generator=g)
    res = {}
    for be in ("torch", "triton"):
        out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=4, backend=be)
        loss = out.env_loss.sum() + out.penalty
        res[be] = (loss.detach(), *torch.autograd.grad(loss, (h, w)))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, c in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a.float(), c.float(), atol=tol, rtol=tol)


def test_reduced_torch_path_refuses_second_backward_clearly():
    h, w, b, y = make_inputs(torch.float32)
    hh = leaf(h)
    loss = uf.ops.linear_cross_entropy(hh, w, y, linear_bias=b, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot backward twice"):
        loss.backward()


@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("n, v", [(47, 123), (130, 29)])
def test_backward_walks_agree(n, v, with_bias, with_b):
    """The backward's two loop orders (token chunks, vocabulary blocks) give the same gradients, in fp64."""
    from unlearn_fast.ops import _torch_linear_ce as tp

    g = torch.Generator().manual_seed(3)
    h = torch.randn(n, H, generator=g, dtype=torch.float64)
    w = torch.randn(v, H, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    y = torch.randint(0, v, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.2
    lse, _, _ = tp.chunked_pass(h, w, bias, y, valid, want_ez=False)
    lse = torch.where(valid, lse, torch.inf)  # the backward passes' contract on ignored tokens
    coeff = lambda: torch.where(valid, torch.randn(n, generator=g, dtype=torch.float64), 0)  # noqa: E731
    coeffs = tp.Coeffs(coeff(), coeff() if with_b else None, coeff())
    _, by_tokens = tp.chunked_pass(h, w, bias, y, valid, lse=lse, coeffs=coeffs, chunk=5)
    by_vocab = tp.backward_by_vocab(h, w, bias, y, valid, lse, coeffs, block=7)
    # The explicit formula d z = a p + b p⊙z − c onehot with materialised logits.
    z = h @ w.T + (bias if bias is not None else 0)
    p = torch.softmax(z, 1) * valid.unsqueeze(1)
    dz = coeffs.a.unsqueeze(1) * p - coeffs.c.unsqueeze(1) * torch.nn.functional.one_hot(y, v) * valid.unsqueeze(1)
    if with_b:
        dz = dz + coeffs.b.unsqueeze(1) * p * z
    expected = (dz @ w, dz.T @ h, dz.sum(0) if with_bias else None)
    for got_t, got_v, ref in zip(by_tokens, by_vocab, expected):
        if ref is None:
            assert got_t is None and got_v is None
            continue
        torch.testing.assert_close(got_t, ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got_v, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n, v", [(47, 123), (130, 29)])
def test_ignored_tokens_with_huge_logits_get_zero_gradient(n, v, backend):
    """An ignored token's logits may overflow exp(); its p must still be 0, not inf·0 = NaN."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, H, generator=g)
    h[::3] *= 1e4  # logits ~ 1e3 on these rows
    h.requires_grad_()
    w = torch.randn(v, H, generator=g).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    env = torch.arange(n) % E
    out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=E, backend=backend, chunk_size=8)
    (out.env_loss.sum() + out.penalty).backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (h.grad[::3] == 0).all()


@pytest.mark.parametrize("op", ["ce_mean", "ce_none", "irm_penalty", "sequence_loss"])
def test_torch_path_gets_only_labelled_rows(monkeypatch, op):
    """Ignored tokens (prompts, padding) are dropped before the head's matmuls, with the same results."""
    from unlearn_fast.ops import _torch_linear_ce as torch_path

    h, w, b, y = make_inputs(torch.float32, shape=(4, 9), ignore_every=3)
    y[:, :2] = -100  # a prompt
    rows_seen = []
    for name in ("chunked_pass", "sequence_loss_pass"):
        real = getattr(torch_path, name)

        def spy(hh, *args, _real=real, **kwargs):
            rows_seen.append(hh.shape[0])
            return _real(hh, *args, **kwargs)

        monkeypatch.setattr(torch_path, name, spy)
    env = torch.zeros_like(y)
    run = {
        "ce_mean": lambda hh: uf.ops.linear_cross_entropy(hh, w, y, linear_bias=b, backend="torch"),
        "ce_none": lambda hh: (uf.ops.linear_cross_entropy(hh, w, y, linear_bias=b, reduction="none",
                                                           backend="torch") * torch.arange(36.0).view(4, 9)).sum(),
        "irm_penalty": lambda hh: uf.ops.irm_penalty(hh, w, y, env, num_envs=1, linear_bias=b, backend="torch").penalty,
        "sequence_loss": lambda hh: uf.ops.sequence_loss(hh, w, y, lambda nll, ids: nll ** 2 / 50, linear_bias=b,
                                                         backend="torch").loss,
    }[op]
    hh = leaf(h)
    loss = run(hh)
    loss.backward()
    labelled = int((y != -100).sum())
    assert rows_seen and all(n == labelled for n in rows_seen)
    # against the materialised reference on all rows
    ref_h = leaf(h, torch.float64)
    logits = ref_h @ w.double().T + b.double()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, V), y.view(-1), reduction="none").view(4, 9)
    if op == "ce_mean":
        ref = ce.sum() / labelled
    elif op == "ce_none":
        ref = (ce * torch.arange(36.0, dtype=torch.float64).view(4, 9)).sum()
    elif op == "irm_penalty":
        ref = naive_irm(ref_h, w.double(), y, env, 1, bias=b.double())[2]
    else:
        ref = (ce.sum(1) ** 2 / 50).sum()
    ref.backward()
    torch.testing.assert_close(loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hh.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(hh.grad[y == -100]) == 0
