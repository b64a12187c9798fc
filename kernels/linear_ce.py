"""Triton kernels of the logits-free linear cross-entropy (one family for CE, CE+IRM and sequence NLL).

The [BLOCK_N, BLOCK_V] logits tile z = h Wᵀ + b is computed in registers from
hidden and weight tiles and never written to memory.

Forward (grid: token blocks; loop over vocab tiles, online softmax):
    m   ← running max of z
    s   ← Σ exp(z − m)                     (rescaled by exp(m_old − m_new))
    t   ← Σ exp(z − m) · z                 (one extra running sum: E_p[z] = t / s)
    lse = m + log s,   ez = t / s,   zy = z[y]

Backward (grid: token blocks × vocab tiles; recompute z):
    p  = exp(z − lse)
    dz = a p + b p⊙z − c onehot(y)         (a, b, c: per-token fp32 scalars)
    d input  += dz W        (atomic, fp32)
    d weight += dzᵀ h       (atomic, fp32)
    d bias   += Σ_rows dz   (atomic, fp32)
Plain CE is b = 0, a = c = upstream; the IRMv1 term adds b = g_m,
a += g_m (1 − ez), c += g_m (see unlearn_fast/ops/linear_ce.py for the algebra).

Interpreter notes: operands are upcast to fp32 right after loading when
UPCAST is set (the interpreter computes bf16 wrongly), and a single
configuration is used (no autotune).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z[BLOCK_N, BLOCK_V] in fp32; columns past V are −inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += bias[None, :]
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def _linear_ce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, zy_ptr, ez_ptr,
    N, V, D, ignore_index,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask_n = offs_n < N
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                         stride_hn, stride_hd, stride_wv, stride_wd,
                         HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
        m_new = tl.maximum(m, tl.max(z, 1))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        z_finite = tl.where(mask_v[None, :], z, 0.0)  # −inf · 0 would be NaN
        s = s * rescale + tl.sum(e, 1)
        t = t * rescale + tl.sum(e * z_finite, 1)
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z_finite, 0.0), 1)
        m = m_new
    valid = mask_n & (y != ignore_index)
    tl.store(lse_ptr + offs_n, tl.where(valid, m + tl.log(s), 0.0), mask=mask_n)
    tl.store(zy_ptr + offs_n, tl.where(valid, zy, 0.0), mask=mask_n)
    tl.store(ez_ptr + offs_n, tl.where(valid, t / s, 0.0), mask=mask_n)


@triton.jit
def _linear_ce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, a_ptr, bcoef_ptr, c_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, HAS_B: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_n = offs_n < N
    mask_v = offs_v < V
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
    c = tl.load(c_ptr + offs_n, mask=mask_n, other=0.0)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, D,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     HAS_BIAS, UPCAST, IEEE, BLOCK_N, BLOCK_V, BLOCK_D)
    p = tl.exp(z - lse[:, None])  # 0 on columns past V
    coef = a[:, None]
    if HAS_B:
        bc = tl.load(bcoef_ptr + offs_n, mask=mask_n, other=0.0)
        coef = coef + bc[:, None] * tl.where(mask_v[None, :], z, 0.0)
    dz = p * coef - tl.where(offs_v[None, :] == y[:, None], c[:, None], 0.0)
    dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, 0), mask=mask_v, sem="relaxed")
    if not UPCAST:
        dz = dz.to(w_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            d_h = tl.dot(dz, w, input_precision="ieee")
            d_w = tl.dot(tl.trans(dz), h, input_precision="ieee")
        else:
            d_h = tl.dot(dz, w)
            d_w = tl.dot(tl.trans(dz), h)
        # Relaxed: the adds are independent sums read only after the kernel ends, so they need no
        # ordering (the default acq_rel puts a GPU-wide fence and a cache invalidation around each).
        tl.atomic_add(dh_ptr + offs_n[:, None] * D + offs_d[None, :], d_h,
                      mask=mask_n[:, None] & mask_d[None, :], sem="relaxed")
        tl.atomic_add(dw_ptr + offs_v[:, None] * D + offs_d[None, :], d_w,
                      mask=mask_v[:, None] & mask_d[None, :], sem="relaxed")


# Shared memory per block on the smallest CUDA targets the kernels support (sm_86, sm_89, sm_120:
# A10, L4, RTX cards); sm_80 has 163 KiB and sm_90 227 KiB.
SMEM_LIMIT_SMALL = 101376


def config(dtype: torch.dtype, interpret: bool = _INTERPRET, backward: bool = False) -> dict:
    """Block sizes of the forward (or ``backward``) kernel: the only configurations the launch helpers use
    (the compile gate compiles each of them for sm_80, sm_89 and sm_90)."""
    if interpret:
        # Few, large programs: the interpreter costs ~1-2 ms per program instance.
        return dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4)
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes: 64×128×64 needed 147456 B of shared memory in the backward
        # (over sm_86/89's 101376 B) and spilled 2-2.8 KB per thread on sm_90. 64×64×32 takes 57344 B.
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8)
    # BLOCK_D=64 spilled 140-960 B per thread in both bf16 kernels on sm_80/89/90 (compile gate); the
    # forward fits at 32, the backward (three tiles live) spilled 8 B on sm_89 at 32 and fits at 16.
    return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=16 if backward else 32, num_warps=8)


def flags(dtype: torch.dtype, interpret: bool = _INTERPRET) -> dict:
    upcast = interpret or dtype == torch.float32
    return dict(UPCAST=upcast, IEEE=dtype == torch.float32)


def linear_ce_forward(h, weight, bias, target, ignore_index):
    """Per-token (lse, zy, ez), fp32 [N], zeros on ignored tokens. h [N, D], weight [V, D], target int64 [N]."""
    n, d = h.shape
    vocab = weight.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)
    zy = torch.empty_like(lse)
    ez = torch.empty_like(lse)
    if n == 0:
        return lse, zy, ez
    cfg = config(h.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _linear_ce_fwd_kernel[grid](
        h, weight, bias if bias is not None else h, target, lse, zy, ez,
        n, vocab, d, ignore_index,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, **flags(h.dtype), **cfg,
    )
    return lse, zy, ez


def linear_ce_backward(h, weight, bias, target, lse, a, b, c):
    """Gradients (fp32) of Σ_t [a_t p + b_t p⊙z − c_t onehot]·z_t w.r.t. h, weight and bias. b may be None."""
    n, d = h.shape
    vocab = weight.shape[0]
    d_h = torch.zeros(n, d, dtype=torch.float32, device=h.device)
    d_w = torch.zeros(vocab, d, dtype=torch.float32, device=h.device)
    d_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if bias is not None else None
    if n == 0:
        return d_h, d_w, d_b
    cfg = config(h.dtype, backward=True)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _linear_ce_bwd_kernel[grid](
        h, weight, bias if bias is not None else h, target, lse, a, b if b is not None else a, c,
        d_h, d_w, d_b if d_b is not None else d_h,
        n, vocab, d,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, HAS_B=b is not None, **flags(h.dtype), **cfg,
    )
    return d_h, d_w, d_b
