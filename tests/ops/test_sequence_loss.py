"""uf.ops.sequence_loss (gradient formed in the forward pass) against sequence_nll + φ and a materialised fp64 reference."""
import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf

B, T, H, V = 5, 7, 31, 123


def make(dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :2] = -100  # prompt tokens
    y[3] = -100  # a sequence with no answer tokens at all
    ref = torch.randn(B, generator=g).abs() * 10
    return h, w, b, y, ref


def npo_phi(ref, beta=0.5):
    def phi(nll, ids):  # NPO's sequence form, one term per sequence
        return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref[ids].to(nll.dtype)))
    return phi


def naive(h, w, b, y, phi):
    logits = (h.double() @ w.double().T + (b.double() if b is not None else 0))
    ce = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none", ignore_index=-100)
    nll = ce.view(B, T).sum(1)
    return phi(nll, torch.arange(B)).sum(), nll


@pytest.mark.parametrize("chunk", [None, T, 2 * T, 3 * T + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_materialised_reference(chunk, bias):
    h, w, b, y, ref = make(bias=bias)
    out = uf.ops.sequence_loss(h, w, y, npo_phi(ref), linear_bias=b, backend="torch", chunk_size=chunk)
    out.loss.backward()
    leaves = [t for t in (h, w, b) if t is not None]
    ours = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    want, want_nll = naive(h, w, b, y, npo_phi(ref))
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll.double(), want_nll.detach(), rtol=1e-5, atol=1e-5)
    assert out.num_tokens.tolist() == (y != -100).sum(1).tolist()
    for a, c in zip(ours, (t.grad for t in leaves)):
        assert c.abs().max() > 0
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-4, atol=1e-5)
    assert (ours[0][3] == 0).all()  # the all-ignored sequence gets no gradient


@pytest.mark.parametrize("backend, chunk", [("torch", 3), ("triton", None)])  # 3 < T: the recompute path
def test_other_paths_give_the_same_numbers(backend, chunk):
    h, w, b, y, ref = make(seed=1)
    fused = uf.ops.sequence_loss(h, w, y, npo_phi(ref), linear_bias=b, backend="torch")
    g_fused = torch.autograd.grad(fused.loss, (h, w, b))
    other = uf.ops.sequence_loss(h, w, y, npo_phi(ref), linear_bias=b, backend=backend, chunk_size=chunk)
    g_other = torch.autograd.grad(other.loss, (h, w, b))
    torch.testing.assert_close(fused.loss, other.loss, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_fused, g_other):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_bf16_gradients_return_in_bf16_and_close_to_fp32():
    h, w, b, y, ref = make(seed=2)
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (h, w, b))
    g32 = torch.autograd.grad(uf.ops.sequence_loss(h, w, y, npo_phi(ref), linear_bias=b, backend="torch").loss,
                              (h, w, b))
    g16 = torch.autograd.grad(
        uf.ops.sequence_loss(h16, w16, y, npo_phi(ref), linear_bias=b16, backend="torch").loss, (h16, w16, b16))
    for a, c in zip(g16, g32):
        assert a.dtype == torch.bfloat16
        assert (a.float() - c).norm() / c.norm() < 2e-2


def test_refuses_flat_input_and_second_backward():
    h, w, b, y, ref = make()
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        uf.ops.sequence_loss(h.reshape(-1, H), w, y.reshape(-1), npo_phi(ref))
    out = uf.ops.sequence_loss(h, w, y, npo_phi(ref), backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward twice"):
        out.loss.backward()
