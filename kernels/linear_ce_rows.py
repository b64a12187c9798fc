"""Row kernel of the chunked linear cross-entropy (the atomics-free CUDA path).

The chunked path computes a [rows, V] logits chunk with one cuBLAS matmul (bf16 in,
fp32 accumulation), then ONE launch of this kernel, one program per row:

    pass 1 (STATS): online softmax over the row:  lse, zy = z[y], ez = E_p[z]
    pass 2 (GRAD):  the row becomes, in place,    dz = p (a + b z) − c onehot(y)
                    with p = exp(z − lse) and per-row fp32 coefficients a, b, c

and then d input = dz W and d weight += dzᵀ h are plain matmuls (fp32 accumulation):
no atomics anywhere. When the upstream gradient is known before the chunk is
computed (plain CE, the IRM penalty's unit pass) both passes run in one launch and
the gradient is formed in the forward pass; otherwise (recompute in backward) only
GRAD runs, with lse from the forward.

Everything is computed in fp32 (bf16/fp16 logits are upcast right after loading,
rounded back only to store dz). Rows whose target is ``ignore_index`` get zero
statistics and, when GRAD runs, a zero row.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _rows_kernel(
    z_ptr, y_ptr, lse_ptr, zy_ptr, ez_ptr, a_ptr, b_ptr, c_ptr,
    V, stride_z, ignore_index,
    STATS: tl.constexpr, WANT_EZ: tl.constexpr, GRAD: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = z_ptr + row * stride_z  # int64: rows · V passes 2**31 at the GPU shapes
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    if STATS:
        m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)  # per-lane running max
        s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        t = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, z)
            # lanes still at −inf (nothing seen) keep s = t = 0 instead of NaN from (−inf) − (−inf)
            rescale = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            e = tl.where(mask, tl.exp(z - m_new), 0.0)
            s = s * rescale + e
            if WANT_EZ:
                t = t * rescale + e * tl.where(mask, z, 0.0)
            m = m_new
        row_max = tl.max(m, 0)
        lane_scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - row_max))
        total = tl.sum(s * lane_scale, 0)
        lse = row_max + tl.log(total)
        ez = tl.sum(t * lane_scale, 0) / total
        zy = tl.load(row_ptr + tl.where(valid, y, 0)).to(tl.float32)
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
        tl.store(zy_ptr + row, tl.where(valid, zy, 0.0))
        if WANT_EZ:
            tl.store(ez_ptr + row, tl.where(valid, ez, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
    if GRAD:
        a = tl.load(a_ptr + row).to(tl.float32)
        c = tl.load(c_ptr + row).to(tl.float32)
        if HAS_B:
            b = tl.load(b_ptr + row).to(tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            coef = a
            if HAS_B:
                coef = a + b * z
            dz = tl.exp(z - lse) * coef - tl.where(offs == y, c, 0.0)
            dz = tl.where(valid, dz, 0.0)
            tl.store(row_ptr + offs, dz.to(z_ptr.dtype.element_ty), mask=mask)


def config(dtype: torch.dtype, interpret: bool = _INTERPRET) -> dict:
    """Launch configuration: the same on every CUDA target (a row streams; nothing is staged in shared memory)."""
    if interpret:
        return dict(BLOCK_V=64, num_warps=4)
    return dict(BLOCK_V=2048 if dtype == torch.float32 else 4096, num_warps=8)


def rows_(z: torch.Tensor, target: torch.Tensor, ignore_index: int, *, lse: torch.Tensor | None = None,
          want_ez: bool = False, coeffs=None):
    """Statistics of each row of the logits chunk ``z`` [R, V] and/or its gradient written into ``z`` in place.

    ``lse`` None: computes (lse, zy, ez) fp32 [R] (ez zeros unless ``want_ez``), returned.
    ``coeffs`` (a, b | None, c) fp32 [R]: turns z into dz = p (a + b z) − c onehot, with the lse just
    computed or, when ``lse`` is given, that one (+inf on rows that must get a zero gradient).
    Returns (lse, zy, ez); zy and ez are None when ``lse`` was given.
    """
    if z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"z must be a row-major [R, V] chunk, got shape {tuple(z.shape)} strides {z.stride()}")
    rows, vocab = z.shape
    stats = lse is None
    if stats:
        lse = torch.empty(rows, dtype=torch.float32, device=z.device)
        zy = torch.empty_like(lse)
        ez = torch.zeros_like(lse) if not want_ez else torch.empty_like(lse)
    else:
        zy = ez = None
    if rows == 0:
        return lse, zy, ez
    grad = coeffs is not None
    a, b, c = coeffs if grad else (lse, None, lse)
    _rows_kernel[(rows,)](
        z, target, lse, zy if stats else lse, ez if stats else lse, a, b if b is not None else a, c,
        vocab, z.stride(0), ignore_index,
        STATS=stats, WANT_EZ=want_ez, GRAD=grad, HAS_B=b is not None, **config(z.dtype),
    )
    return lse, zy, ez
