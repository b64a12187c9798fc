"""Triton kernels for SAM bookkeeping over ONE flat buffer (parameters flattened by uf.flatten_parameters).

Each op is a single launch over the buffer (the norm adds a tiny second stage over per-program
partial sums: no atomics, so the result is deterministic):

    squared_norm(x, w)          Σ (|w|·x)²  (w optional), fp32 accumulation
    perturb_(p, g, b, s, ada)   b ← p;  p ← p + s·(p² if ada else 1)·g   (s read from device memory)
    restore_(p, b)              p ← b
    fd_hvp_accumulate_(a, gm, g0, c)   a ← a + c·(gm − g0)

bf16/fp16 values are loaded and converted to fp32 at once and rounded back only to store.
Offsets are int64 (program id cast first): the flat buffer of an 8B model has more than 2**31
elements, and int32 offsets would wrap and read or write out of bounds.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 256 if _INTERPRET else 4096  # elements per program per iteration
TILES = 1 if _INTERPRET else 8       # iterations per program: fewer, larger programs for the norm
# 8 warps: 16 elements per thread; with 4 the weighted fp16 norm spilled 156 B (compile gate)
NUM_WARPS = 8


@triton.jit
def _squared_norm_kernel(x_ptr, w_ptr, partial_ptr, n, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
                         TILES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: a flat buffer may pass 2**31 elements
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(TILES):
        offs = (pid * TILES + t) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            x = x * tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        acc += x * x
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _perturb_kernel(p_ptr, g_ptr, b_ptr, scale_ptr, n, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(scale_ptr).to(tl.float32)
    old = tl.load(p_ptr + offs, mask=mask)
    theta = old.to(tl.float32)
    step = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADAPTIVE:
        step = step * (theta * theta)
    step = step * s
    tl.store(b_ptr + offs, old, mask=mask)
    tl.store(p_ptr + offs, (step + theta).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _fd_hvp_kernel(a_ptr, gm_ptr, g0_ptr, c_ptr, n, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr).to(tl.float32)
    d = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        d = d - tl.load(g0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(a_ptr + offs, (a + c * d).to(a_ptr.dtype.element_ty), mask=mask)


def cuda_launch() -> tuple[int, int, int]:
    """(BLOCK, TILES, num_warps) of the launches on CUDA (the compile gate builds these)."""
    return 4096, 8, NUM_WARPS


def _check_flat(name, t):
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 1-D (flat) tensor, got shape {tuple(t.shape)}")
    if t.dtype == torch.float64:
        raise TypeError(f"{name}: the Triton path does not support float64")


def _scalar(x, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32, device=device).reshape(1)


def squared_norm(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Σ (|w|·x)² as an fp32 device scalar: per-program partial sums, then one small sum."""
    _check_flat("x", x)
    n = x.numel()
    programs = max(1, triton.cdiv(n, BLOCK * TILES))
    partial = torch.empty(programs, dtype=torch.float32, device=x.device)
    if n:
        _squared_norm_kernel[(programs,)](x, w if w is not None else x, partial, n, WEIGHTED=w is not None,
                                          BLOCK=BLOCK, TILES=TILES, num_warps=NUM_WARPS)
    else:
        partial.zero_()
    return partial.sum()


def perturb_(p: torch.Tensor, g: torch.Tensor, b: torch.Tensor, scale, adaptive: bool) -> None:
    for name, t in (("p", p), ("g", g), ("b", b)):
        _check_flat(name, t)
    n = p.numel()
    if n:
        _perturb_kernel[(triton.cdiv(n, BLOCK),)](p, g, b, _scalar(scale, p.device), n, ADAPTIVE=adaptive, BLOCK=BLOCK,
                                                   num_warps=NUM_WARPS)


def restore_(p: torch.Tensor, b: torch.Tensor) -> None:
    _check_flat("p", p)
    _check_flat("b", b)
    n = p.numel()
    if n:
        _copy_kernel[(triton.cdiv(n, BLOCK),)](p, b, n, BLOCK=BLOCK, num_warps=NUM_WARPS)


def fd_hvp_accumulate_(acc: torch.Tensor, g_moved: torch.Tensor, g_base: torch.Tensor | None, coeff) -> None:
    _check_flat("acc", acc)
    _check_flat("g_moved", g_moved)
    n = acc.numel()
    if n:
        base = g_base if g_base is not None else g_moved
        _fd_hvp_kernel[(triton.cdiv(n, BLOCK),)](acc, g_moved, base, _scalar(coeff, acc.device), n,
                                                HAS_BASE=g_base is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
