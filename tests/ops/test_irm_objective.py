"""uf.ops.irm_objective (Σ_e w_e CE_e + λ P, gradient formed in the forward) against the double-backprop reference.

Tolerance rule (DESIGN.md): error against an fp64 ground truth at most the same-dtype naive reference's
error plus a small slack. The triton_chunked rows run the Triton row kernel under the interpreter.
"""
from __future__ import annotations

import os

import pytest
import torch

import unlearn_fast as uf
from tests.conftest import HAS_TRITON
from unlearn_fast.ops import _torch_linear_ce as torch_path
from unlearn_fast.testing.reference import halves_like_op, naive_irm

N, H, V, E = 41, 19, 67, 3  # odd shapes; few row programs for the interpreter
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CAN_TRITON = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
BACKENDS = ["torch", pytest.param("triton_chunked", marks=pytest.mark.skipif(not CAN_TRITON, reason="needs triton"))]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(dtype, *, shape=(N,), seed=0, stacked=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, V, shape, generator=g)
    y.view(-1)[::5] = -100
    if stacked:  # environments as stacked batches: consecutive rows (the op takes views)
        env = (torch.arange(y.numel()) * E // y.numel()).view(shape)
    elif len(shape) == 2:  # one environment per sequence, as the trainer builds them
        env = torch.randint(0, E, (shape[0], 1), generator=g).expand(shape).contiguous()
    else:
        env = torch.randint(0, E, shape, generator=g)
    return [t.to(DEVICE) for t in (h, w, b, y, env)]


def err(a, truth):
    return (a.detach().double() - truth.detach().double()).abs().max().item()


def check(ours, naive, truth, dtype, what):
    limit = err(naive, truth) + SLACK[dtype] * max(truth.detach().abs().max().item(), 1.0)
    assert err(ours, truth) <= limit, f"{what}: {err(ours, truth):.3g} > {limit:.3g}"


def leaves(tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("layout", ["tokens", "batched", "stacked"])
@pytest.mark.parametrize("chunk", [None, 20, 5])
def test_objective_matches_double_backprop_reference(backend, dtype, unbiased, layout, chunk):
    """chunk None: every environment in one chunk (gradient with the forward's logits); 20: two environments per
    chunk; 5: a statistics pass, then a recomputing gradient pass per environment."""
    shape = (5, 9) if layout == "batched" else (N,)
    h, w, b, y, env = inputs(dtype, shape=shape, seed=3, stacked=layout == "stacked")
    num_envs = E + 1  # the last environment is empty
    weights = torch.tensor([0.5, 0.2, 0.3, 0.7], dtype=torch.float64)
    lam = 2.5
    halves = halves_like_op(y, env, num_envs, layout == "batched") if unbiased else None
    results = {}
    for kind, cast in (("truth", torch.float64), ("naive", None), ("ours", None)):
        t = leaves((h, w, b), cast)
        if kind == "ours":
            out = uf.ops.irm_objective(t[0], t[1], y, env, num_envs=num_envs, penalty_weight=lam,
                                       env_weights=weights, linear_bias=t[2], unbiased=unbiased,
                                       backend=backend, chunk_size=chunk)
            assert not any(x.requires_grad for x in out[1:])
            parts = (out.env_loss, out.env_scale_grad, out.penalty)
            loss = out.loss
        else:
            parts = naive_irm(t[0], t[1], y, env, num_envs, bias=t[2], unbiased=unbiased, halves=halves)
            loss = (weights.to(parts[0].dtype) * parts[0]).sum() + lam * parts[2]
        results[kind] = (loss, parts, torch.autograd.grad(loss, t))
    (lo, po, go), (ln, pn, gn), (lt, pt, gt) = results["ours"], results["naive"], results["truth"]
    check(lo, ln, lt, dtype, "loss")
    for name, o, n, t in zip(("env_loss", "env_scale_grad", "penalty"), po, pn, pt):
        check(o, n, t, dtype, name)
    assert po[0][-1].item() == 0 and po[1][-1].item() == 0
    for name, o, n, t in zip("hwb", go, gn, gt):
        assert o.dtype == dtype
        check(o, n, t, dtype, f"grad {name}")
    # the penalty's part of the gradient is not one the tolerance would hide
    t = leaves((h, w, b), torch.float64)
    penalty = naive_irm(t[0], t[1], y, env, num_envs, bias=t[2], unbiased=unbiased, halves=halves)[2]
    assert torch.autograd.grad(lam * penalty, t[1])[0].abs().max().item() > 1e-2


def test_whole_environment_chunks_take_three_matmuls(monkeypatch):
    """The gradient is formed with the forward's logits: each labelled row's logits are computed once when the
    chunks hold whole environments (all of them, or as many as fit), twice (statistics, then recompute) when an
    environment is larger than a chunk; linear_cross_entropy_irm recomputes always."""
    h, w, b, y, env = inputs(torch.float32, seed=4)
    calls = []
    real = torch_path.logits_block

    def counting(z_buf, hc, *args):
        calls.append(hc.shape[0])
        return real(z_buf, hc, *args)

    monkeypatch.setattr(torch_path, "logits_block", counting)
    labelled = int((y != -100).sum())
    largest = int(torch.bincount(env[y != -100]).max())

    def logits_rows(run):
        calls.clear()
        hh = h.detach().requires_grad_()
        run(hh).backward()
        return list(calls)

    def objective(chunk):
        return lambda hh: uf.ops.irm_objective(hh, w, y, env, num_envs=E, linear_bias=b, backend="torch",
                                               chunk_size=chunk).loss

    def tuple_op(hh):
        out = uf.ops.linear_cross_entropy_irm(hh, w, y, env, num_envs=E, linear_bias=b, backend="torch",
                                              chunk_size=labelled)
        return out.env_loss.mean() + out.penalty

    assert logits_rows(objective(None)) == [labelled]  # every environment in one chunk
    per_env = logits_rows(objective(largest))  # whole environments, as many per chunk as fit
    assert sum(per_env) == labelled and 1 < len(per_env) <= E and max(per_env) <= largest
    assert sum(logits_rows(objective(4))) == 2 * labelled
    assert sum(logits_rows(tuple_op)) == 2 * labelled


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_all_ignored_and_no_grad(backend):
    h, w, b, y, env = inputs(torch.float32, seed=5)
    ref = uf.ops.linear_cross_entropy_irm(h.double(), w.double(), y, env, num_envs=E, linear_bias=b.double(),
                                          backend="torch")
    # a frozen head (an attack on the inputs): d input only, the same as the reference's
    hh = h.detach().requires_grad_()
    out = uf.ops.irm_objective(hh, w, y, env, num_envs=E, penalty_weight=0.5, linear_bias=b, backend=backend)
    out.loss.backward()
    hd = h.detach().double().requires_grad_()
    ref_loss = uf.ops.linear_cross_entropy_irm(hd, w.double(), y, env, num_envs=E, linear_bias=b.double(),
                                               backend="torch")
    (ref_loss.env_loss.mean() + 0.5 * ref_loss.penalty).backward()
    torch.testing.assert_close(hh.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
    assert w.grad is None
    # no gradient needed: the same numbers, nothing kept
    with torch.no_grad():
        again = uf.ops.irm_objective(h, w, y, env, num_envs=E, penalty_weight=0.5, linear_bias=b, backend=backend)
    torch.testing.assert_close(again.loss.double(), (ref.env_loss.mean() + 0.5 * ref.penalty), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.detach().double(), again.loss.double(), rtol=1e-5, atol=1e-6)
    # nothing labelled: loss 0, zero gradients
    hh = h.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    none = uf.ops.irm_objective(hh, ww, torch.full_like(y, -100), env, num_envs=E, backend=backend)
    none.loss.backward()
    assert none.loss.item() == 0 and torch.count_nonzero(hh.grad) == 0 and torch.count_nonzero(ww.grad) == 0


def test_refuses_second_backward_and_bad_arguments():
    h, w, _, y, env = inputs(torch.float32, seed=6)
    out = uf.ops.irm_objective(h.requires_grad_(), w, y, env, num_envs=E, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="irm_objective .* cannot backward twice"):
        out.loss.backward()
    with pytest.raises(ValueError, match="env_weights must have num_envs = 3"):
        uf.ops.irm_objective(h, w, y, env, num_envs=E, env_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="penalty_weight must be a finite number"):
        uf.ops.irm_objective(h, w, y, env, num_envs=E, penalty_weight=float("nan"))
    with pytest.raises(ValueError, match="env"):
        uf.ops.irm_objective(h, w, y, env + E, num_envs=E)
