"""Chunked PyTorch path of the fused linear cross-entropy: the CPU implementation and the fallback.

Same mathematics as ``kernels/linear_ce.py``. Tokens are processed in chunks of
rows; only a [chunk, V] logits block exists at any time (fp32), never [N, V].

Per token t with logits z = W h_t + b, p = softmax(z), label y:
    lse_t = log Σ_v exp z_v,   zy_t = z_y,   ez_t = E_p[z] = Σ_v p_v z_v
The gradient of any loss built from the per-token statistics
    ce_t = lse_t − zy_t          (cross-entropy)
    m_t  = ez_t − zy_t           (d ce_t(w·z)/dw at w = 1, the IRMv1 inner term)
is, for upstream gradients g_ce and g_m,
    d z_v = a_t p_v + b_t p_v z_v − c_t 1{v = y}
    a_t = g_ce + g_m (1 − ez_t),  b_t = g_m,  c_t = g_ce + g_m
so a pass over the chunks that recomputes z can form d z in place and
accumulate d input = dz W, d weight = dzᵀ h, d bias = Σ dz.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Elements of one fp32 [chunk, V] block; 2**23 floats = 32 MiB.
_BLOCK_ELEMS = 1 << 23


def default_chunk(num_tokens: int, vocab: int) -> int:
    return max(1, min(num_tokens, _BLOCK_ELEMS // max(vocab, 1)))


@dataclass
class Coeffs:
    """Per-token gradient coefficients of d z = a p + b p⊙z − c onehot (fp32 [N]); b may be None (zero)."""

    a: torch.Tensor
    b: torch.Tensor | None
    c: torch.Tensor


def chunked_pass(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    coeffs: Coeffs | None = None,
    chunk: int | None = None,
):
    """One pass over token chunks.

    Returns (lse, zy, ez) fp32 [N] (zeros on ignored tokens) and, when ``coeffs``
    is given, the gradients (d_input [N, H] fp32, d_weight [V, H] fp32, d_bias [V] fp32 or None).
    ``lse`` given (from the forward) is used for p instead of recomputing it.
    """
    n, hidden = h.shape
    vocab = weight.shape[0]
    chunk = chunk or default_chunk(n, vocab)
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = weight.to(compute)
    bvec = bias.to(compute) if bias is not None else None
    out_lse = torch.zeros(n, dtype=compute, device=h.device)
    out_zy = torch.zeros_like(out_lse)
    out_ez = torch.zeros_like(out_lse)
    if coeffs is not None:
        d_h = torch.empty(n, hidden, dtype=compute, device=h.device)
        d_w = torch.zeros(vocab, hidden, dtype=compute, device=h.device)
        d_b = torch.zeros(vocab, dtype=compute, device=h.device) if bias is not None else None
    safe_target = torch.where(valid, target, 0)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        hc = h[rows].to(compute)
        z = hc @ w.T
        if bvec is not None:
            z += bvec
        y = safe_target[rows].unsqueeze(1)
        zy = z.gather(1, y).squeeze(1)
        chunk_lse = torch.logsumexp(z, dim=1) if lse is None else lse[rows].to(compute)
        p = torch.exp(z - chunk_lse.unsqueeze(1))
        ez = (p.unsqueeze(1) @ z.unsqueeze(2)).reshape(-1)
        keep = valid[rows]
        out_lse[rows] = torch.where(keep, chunk_lse, 0)
        out_zy[rows] = torch.where(keep, zy, 0)
        out_ez[rows] = torch.where(keep, ez, 0)
        if coeffs is None:
            continue
        a = coeffs.a[rows].to(compute).unsqueeze(1)
        if coeffs.b is not None:
            # dz = p (a + b z), built in z's storage
            dz = z.mul_(coeffs.b[rows].to(compute).unsqueeze(1)).add_(a).mul_(p)
        else:
            dz = p.mul_(a)
        dz.scatter_add_(1, y, -coeffs.c[rows].to(compute).unsqueeze(1))
        d_h[rows] = dz @ w
        d_w.addmm_(dz.T, hc)
        if d_b is not None:
            d_b += dz.sum(0)
    stats = (out_lse, out_zy, out_ez)
    if coeffs is None:
        return stats
    return stats, (d_h, d_w, d_b)
