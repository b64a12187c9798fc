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

The forward pass (and plain CE's gradient-in-forward) walks chunks of tokens. The
recompute-in-backward pass knows lse already, so it may walk blocks of the vocabulary
instead: each block's rows of d weight are then written once, and only the smaller
d input [N, H] is accumulated. Token chunks re-read and re-write the whole [V, H]
d weight once per chunk, so the vocabulary walk moves less memory whenever N < V.

On the CPU the row work of a block (max, Σ exp, E_p[z], d z) is one call of the compiled row op
``ce_rows_`` (csrc/linear_ce_rows.cpp) when the extension is built: each row is processed while it is
in cache instead of 5-9 torch elementwise passes over the whole block, and one block of workspace
suffices. Without it (UNLEARN_FAST_CE_ROWS=0, UNLEARN_FAST_NO_CPP=1, no compiler, CUDA tensors) the
same formulas run as torch ops. The head's fp32 matmuls (logits, d input, d weight) go to oneDNN on AMD
processors, where MKL's sgemm runs at about half of oneDNN's speed (``_matmul.cpu_gemm_engine``,
UNLEARN_FAST_CPU_GEMM=auto|mkl|onednn); oneDNN then writes each chunk's logits into a tensor of its own.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from . import _irm_penalty
from ._matmul import dh_into, dw_into, matmul_dtype, mm_into, onednn_linear, use_onednn

# fp32 elements of [chunk, V] workspace a pass may hold: no more than the head's own size V·H (a
# gradient pass holds a [V, H] d weight anyway, and with chunks of H rows or more its read-modify-write
# per chunk is at most one byte per H/4 FLOPs of the chunk's matmul: not what bounds the pass), at
# least 2**20 (4 MiB: a small head keeps whole batches in one chunk) and at most 2**24 (64 MiB: as
# much as torch's chunked linear CE holds with its 512-row chunks at V = 32k). A pass needs one block
# (plain CE) or two (when E_p[z] or the p⊙z term is needed). Every pass, with or without a gradient,
# keeps to it: the blocks are cached between calls, so the largest one taken stays resident.
_WORKSPACE_ELEMS = 1 << 24
_WORKSPACE_MIN_ELEMS = 1 << 20


def workspace_elems(vocab: int, hidden: int) -> int:
    return min(_WORKSPACE_ELEMS, max(_WORKSPACE_MIN_ELEMS, vocab * hidden))


def default_chunk(num_tokens: int, vocab: int, hidden: int, blocks: int = 2) -> int:
    return max(1, min(num_tokens, workspace_elems(vocab, hidden) // (blocks * max(vocab, 1))))


def env_chunk_rows(vocab: int, hidden: int, device: torch.device, dtype: torch.dtype) -> int:
    """Rows an environment may have for ``irm_losses`` to take it in one chunk (its gradient then formed with
    the forward's logits): the workspace plus the V·H elements of the group buffer ``irm_penalty`` would hold
    there (the same peak as that op's), over the blocks the pass needs (one with the compiled row op)."""
    blocks = 1 if row_kernel(device, dtype) is not None else 2
    return (workspace_elems(vocab, hidden) + vocab * hidden) // (blocks * max(vocab, 1))


def logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out ← h Wᵀ (+ b), written into a preallocated workspace block (fp32 from bf16 operands on CUDA)."""
    if h.dtype != out.dtype:
        return mm_into(out, h, weight.T, bias=bias)
    if bias is not None:
        return torch.addmm(bias, h, weight.T, out=out)
    return torch.mm(h, weight.T, out=out)


def logits_block(z_buf: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """A chunk's logits h Wᵀ (+ b): written into the first rows of the workspace block ``z_buf``, or, with
    ``z_buf`` None (``block_for``: oneDNN is the CPU GEMM engine), oneDNN's own fresh result."""
    if z_buf is None:
        return onednn_linear(h, weight, bias)
    z = z_buf[: h.shape[0]]
    logits_into(z, h, weight, bias)
    return z


def block_for(rows: int, cols: int, dtype: torch.dtype, mm: torch.dtype, device: torch.device):
    """The logits workspace of a pass (``take_block``), or None where oneDNN forms each chunk's logits (it writes
    a tensor of its own: a block beside it would only add to the peak)."""
    if dtype == mm and use_onednn(mm, device):
        return None
    return take_block(rows, cols, dtype, device)


class _Blocks(threading.local):
    """This thread's spare logits blocks (flat CPU buffers), by dtype."""

    def __init__(self):
        self.spare: dict[torch.dtype, list[torch.Tensor]] = {}


_blocks = _Blocks()
_SPARE_BLOCKS = 2  # a pass holds at most two blocks (z and e)


def take_block(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, cols] workspace block, reused across calls on the CPU.

    A block of tens of MB is above glibc's mmap threshold (32 MiB at most), so a fresh one is new pages
    from the kernel: zeroed and faulted in one by one as the first matmul writes them, which costs as
    much as a third of that matmul. On CUDA the caching allocator already reuses memory. A block taken
    is out of the cache until ``give_back`` returns it (a nested or failed call allocates its own)."""
    numel = rows * cols
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    spare = _blocks.spare.setdefault(dtype, [])
    for i, flat in enumerate(spare):
        if flat.numel() >= numel:
            return spare.pop(i)[:numel].view(rows, cols)
    spare.clear()  # too small to serve: freed before the new block, so that the cache never adds to a peak
    return torch.empty(rows, cols, dtype=dtype, device=device)


def give_back(block: torch.Tensor | None) -> None:
    """Return a block from ``take_block`` to this thread's cache (keeping the largest few)."""
    if block is None or block.device.type != "cpu":
        return
    flat = (block if block._base is None else block._base).view(-1)  # the whole buffer, flat
    spare = _blocks.spare.setdefault(block.dtype, [])
    spare.append(flat)
    spare.sort(key=torch.Tensor.numel, reverse=True)
    del spare[_SPARE_BLOCKS:]


def release_blocks() -> None:
    """Free this thread's cached logits blocks (``uf.ops.release_workspace``): the CPU path keeps up to two
    (at most 64 MiB each) between calls; a peak-memory measurement that starts after a warm-up call
    frees them first so that the block is counted."""
    _blocks.spare.clear()


@dataclass
class Coeffs:
    """Per-token gradient coefficients of d z = a p + b p⊙z − c onehot (fp32 [N]); b may be None (zero).

    ``a_ez`` (optional) adds a_ez · E_p[z] to a, E_p[z] being the token's own statistic of the same pass
    (the IRMv1 inner term's gradient needs it before it is known).
    """

    a: torch.Tensor
    b: torch.Tensor | None
    c: torch.Tensor
    a_ez: torch.Tensor | None = None


# The compiled row op (csrc/linear_ce_rows.cpp) does a logits block's softmax statistics and d z in one
# pass per row while the row is in cache; UNLEARN_FAST_CE_ROWS=0 (or no compiled extension) keeps the torch ops.
use_row_kernel = os.environ.get("UNLEARN_FAST_CE_ROWS", "1") != "0"


def row_kernel(device: torch.device, dtype: torch.dtype):
    """``torch.ops.unlearn_fast.ce_rows_`` when it can process logits blocks of this device and dtype, else None."""
    if not use_row_kernel or device.type != "cpu" or dtype not in (torch.float32, torch.float64):
        return None
    from . import _cpp

    if not _cpp.available():
        return None
    return _cpp.ops().ce_rows_


def _vec(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if x is None else x.to(dtype).contiguous()


def chunked_pass(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    lse: torch.Tensor | None = None,
    coeffs: Coeffs | Callable[..., Coeffs] | None = None,
    chunk: int | None = None,
    want_ez: bool = True,
    matmul: torch.dtype | None = None,
    weight_grad: bool = True,
    d_weight_out: torch.Tensor | None = None,
    grad_scale: Callable[..., torch.Tensor] | None = None,
    into: tuple | None = None,
):
    """One pass over token chunks.

    Returns (lse, zy, ez) fp32 [N] (zeros on ignored tokens; ez stays zero unless
    ``want_ez``) and, when ``coeffs``
    is given, the gradients (d_input [N, H] fp32, d_weight [V, H] fp32, d_bias [V] fp32 or None).
    ``lse`` given (from the forward) is used for p instead of recomputing it; it must be +inf on
    ignored tokens so that their p is 0 whatever their logits.
    ``coeffs`` may also be a function ``(lse, zy, ez) -> Coeffs`` of a chunk's statistics
    (chunk-sized vectors): a loss whose per-token upstream gradient is known once the token's own
    statistics are gets its gradient in this same pass (one matmul fewer than recompute).
    ``matmul``: the operands' dtype of the matmuls (default ``matmul_dtype``: bf16/fp16 stay as they are
    on CUDA, with fp32 results; fp32 on the CPU); the softmax and every accumulation are fp32 whatever it is.
    ``weight_grad=False`` (weight and bias frozen, e.g. an input-only attack) forms d_input alone:
    no [V, H] buffer and no weight-gradient matmul; d_weight and d_bias come back None.
    ``d_weight_out``: a [V, H] compute-dtype buffer to write d weight into (overwritten, not added to).
    ``grad_scale`` (one chunk only): a function ``(lse, zy, ez) -> k`` of the pass's statistics, a scalar
    tensor by which the gradient is multiplied — applied to the small operands (k·h, k·(dz W)), never to
    the [rows, V] block. ``into`` = (d_input [N, H], d_weight [V, H], d_bias [V] | None, add: bool): the
    gradients go there (d_input overwritten; d weight and bias added to when ``add``, else overwritten)
    and the pass returns them.
    """
    n, hidden = h.shape
    vocab = weight.shape[0]
    if grad_scale is not None and n > (chunk or n):
        raise ValueError(f"grad_scale needs the pass in one chunk ({n} rows, chunk {chunk})")
    if isinstance(coeffs, Coeffs) and coeffs.a_ez is not None and not want_ez:
        raise ValueError("coeffs.a_ez needs want_ez=True (the pass must form E_p[z])")
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    # the compiled row op needs one block whatever the coefficients (the torch ops two for E_p[z] or p⊙z)
    kernel = row_kernel(h.device, compute)
    two_blocks = kernel is None and (want_ez or callable(coeffs) or (coeffs is not None and coeffs.b is not None))
    chunk = chunk or (max(n, 1) if grad_scale is not None else default_chunk(n, vocab, hidden, 2 if two_blocks else 1))
    mm = matmul or matmul_dtype(h.dtype, h.device)
    w = weight.to(mm)  # no copy on CUDA for bf16: W is never upcast
    bvec = bias.to(compute) if bias is not None else None
    out_lse = torch.zeros(n, dtype=compute, device=h.device)
    out_zy = torch.zeros_like(out_lse)
    out_ez = torch.zeros_like(out_lse)
    added = False  # whether d weight / d bias already hold a sum the pass adds to
    if into is not None:
        d_h, d_w, d_b, added = into
    elif coeffs is not None:
        d_h = torch.empty(n, hidden, dtype=compute, device=h.device)
        # written by the first chunk's matmul (no zero-fill pass over [V, H]), accumulated by the others
        d_w = None
        if weight_grad:
            d_w = torch.empty(vocab, hidden, dtype=compute, device=h.device) if d_weight_out is None else d_weight_out
        d_b = torch.zeros(vocab, dtype=compute, device=h.device) if bias is not None and weight_grad else None
    # Workspace allocated once: z holds the logits, e = exp(z − shift) (in z's storage when z is
    # not needed afterwards), then d z.
    z_buf = block_for(min(chunk, n), vocab, compute, mm, h.device)
    e_buf = take_block(min(chunk, n), vocab, compute, h.device) if two_blocks else None
    safe_target = torch.where(valid, target, 0)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        hc = h[rows].to(mm)
        z = e = ez_prod = dz = None  # oneDNN's logits of the last chunk are freed before the next ones exist
        z = logits_block(z_buf, hc, w, bvec)
        keep = valid[rows]
        if kernel is not None:
            if callable(coeffs):  # statistics first, then d z from the coefficients they give (two row calls)
                _rows_by_kernel(kernel, z, safe_target[rows], None, None, rows, True, compute, out_lse, out_zy,
                                out_ez, keep)
                cf = coeffs(out_lse[rows], out_zy[rows], out_ez[rows])
                kernel(z, safe_target[rows].long().contiguous(), _vec(torch.where(keep, out_lse[rows], torch.inf),
                       compute), False, *(_vec(torch.where(keep, v, 0) if v is not None else None, compute)
                                          for v in (cf.a, None, cf.b, cf.c)))
                grads_here = True
            else:
                grads_here = _rows_by_kernel(kernel, z, safe_target[rows], lse, coeffs, rows, want_ez, compute,
                                             out_lse, out_zy, out_ez, keep)
            if grads_here:
                k = grad_scale(out_lse[rows], out_zy[rows], out_ez[rows]) if grad_scale is not None else None
                _add_gradients(z, hc, w, mm, d_h[rows], d_w, d_b, added or start != 0, k)
            continue
        y = safe_target[rows].unsqueeze(1)
        zy = z.gather(1, y).squeeze(1)
        if lse is None:
            shift = z.amax(dim=1, keepdim=True)
        else:
            shift = lse[rows].to(compute).unsqueeze(1)
        e = torch.sub(z, shift, out=e_buf[: hc.shape[0]]) if two_blocks else z.sub_(shift)
        e.exp_()
        if lse is None:
            total = e.sum(dim=1)
            chunk_lse = shift.squeeze(1) + total.log()
            inv_total = total.reciprocal()  # p = e · inv_total
        else:
            chunk_lse = shift.squeeze(1)
            inv_total = torch.ones_like(chunk_lse)
        out_lse[rows] = torch.where(keep, chunk_lse, 0)
        out_zy[rows] = torch.where(keep, zy, 0)
        if want_ez:
            # E_p[z] = Σ e z / Σ e. z itself is not needed after this (d z below is written as
            # a e + b (e z)), so e z goes into z's storage: two fast streaming passes where a
            # batched row dot (e [C,1,V] @ z [C,V,1]) runs at a fraction of the bandwidth on a CPU.
            ez_prod = z.mul_(e)
            ez = ez_prod.sum(dim=1) * inv_total
            out_ez[rows] = torch.where(keep, ez, 0)
        if coeffs is None:
            continue
        if callable(coeffs):
            cf = coeffs(chunk_lse, zy, out_ez[rows] if want_ez else None)
            cf = Coeffs(*(torch.where(keep, v, 0) if v is not None else None for v in (cf.a, cf.b, cf.c)))
        else:
            cf = Coeffs(coeffs.a[rows], coeffs.b[rows] if coeffs.b is not None else None, coeffs.c[rows])
            if coeffs.a_ez is not None:
                cf.a = cf.a + coeffs.a_ez[rows] * out_ez[rows]
        a = (cf.a.to(compute) * inv_total).unsqueeze(1)
        if cf.b is not None:
            # dz = p (a + b z) = (a e + b e z) / total, built in e's storage
            b_scaled = (cf.b.to(compute) * inv_total).unsqueeze(1)
            ez_prod = z if want_ez else z.mul_(e)  # e z (already there when E_p[z] was taken)
            dz = e.mul_(a).addcmul_(ez_prod, b_scaled)
        else:
            dz = e.mul_(a)
        dz.scatter_add_(1, y, -cf.c.to(compute).unsqueeze(1))
        k = grad_scale(out_lse[rows], out_zy[rows], out_ez[rows]) if grad_scale is not None else None
        _add_gradients(dz, hc, w, mm, d_h[rows], d_w, d_b, added or start != 0, k)
    give_back(z_buf)
    give_back(e_buf)
    if coeffs is not None and n == 0 and d_w is not None:
        d_w.zero_()
    stats = (out_lse, out_zy, out_ez)
    if coeffs is None:
        return stats
    return stats, (d_h, d_w, d_b)


def _add_gradients(dz, hc, w, mm, d_h_rows, d_w, d_b, add: bool, k=None):
    """A chunk's d z (its storage; fp32) into d input rows = k ⊙ (dz W), d W (+)= dzᵀ (k ⊙ h), d b (+)= dzᵀ k.

    ``k`` (None: 1) is a scalar or a per-row [rows] tensor: the gradient's factor, applied to the small
    operands so that the [rows, V] block is not passed over once more."""
    operand = dz.to(mm)  # bf16 operand for the tensor cores on CUDA (no-op on the CPU)
    dh_into(d_h_rows, operand, w)
    if k is not None:
        k = k.to(dz.dtype)
        d_h_rows.mul_(k.unsqueeze(1) if k.dim() else k)
    if d_w is not None:
        scaled = hc if k is None else (hc * (k.unsqueeze(1) if k.dim() else k)).to(mm)
        dw_into(d_w, operand, scaled, accumulate=add)
    if d_b is not None:
        col = dz.sum(0) if k is None else (dz.T @ k if k.dim() else dz.sum(0).mul_(k))
        if add:
            d_b += col
        else:
            d_b.copy_(col)


def _rows_by_kernel(kernel, z, target, lse, coeffs, rows, want_ez, compute, out_lse, out_zy, out_ez, keep) -> bool:
    """One chunk's statistics (into out_*) and, with ``coeffs``, d z in z's storage, by the compiled row op.

    Returns True when z now holds d z."""
    shift = _vec(lse[rows], compute) if lse is not None else None
    grad = coeffs is not None
    a_ez = coeffs.a_ez if grad else None
    ez_needed = (want_ez and lse is None) or a_ez is not None
    args = ((_vec(coeffs.a[rows], compute), _vec(a_ez[rows] if a_ez is not None else None, compute),
             _vec(coeffs.b[rows] if coeffs.b is not None else None, compute), _vec(coeffs.c[rows], compute))
            if grad else (None, None, None, None))
    chunk_lse, zy, ez = kernel(z, target.long().contiguous(), shift, ez_needed, *args)
    out_lse[rows] = torch.where(keep, chunk_lse, 0)
    out_zy[rows] = torch.where(keep, zy, 0)
    if want_ez and lse is None:
        out_ez[rows] = torch.where(keep, ez, 0)
    return grad


def backward_by_vocab(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    valid: torch.Tensor,
    lse: torch.Tensor,
    coeffs: Coeffs,
    *,
    block: int | None = None,
    matmul: torch.dtype | None = None,
):
    """Gradients (d_input, d_weight, d_bias) in the compute dtype, walking blocks of vocabulary rows.

    Same maths as ``chunked_pass(..., lse=lse, coeffs=coeffs)`` (lse +inf on ignored tokens); the workspace is
    [N, block] (one block, two when the p⊙z term is needed).
    """
    n, hidden = h.shape
    vocab = weight.shape[0]
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    kernel = row_kernel(h.device, compute)
    two_blocks = coeffs.b is not None and kernel is None
    block = block or max(1, workspace_elems(vocab, hidden) // ((2 if two_blocks else 1) * max(n, 1)))
    block = min(block, vocab)
    mm = matmul or matmul_dtype(h.dtype, h.device)
    hc = h.to(mm)
    w = weight.to(mm)
    d_h = torch.zeros(n, hidden, dtype=compute, device=h.device)
    d_w = torch.empty(vocab, hidden, dtype=compute, device=h.device)
    d_b = torch.empty(vocab, dtype=compute, device=h.device) if bias is not None else None
    shift = lse.to(compute).unsqueeze(1)
    a = coeffs.a.to(compute).unsqueeze(1)
    b = coeffs.b.to(compute).unsqueeze(1) if two_blocks else None
    rows = valid.nonzero().squeeze(1)
    rows_target, rows_c = target[rows], coeffs.c.to(compute)[rows]
    # the row op's per-row vectors (c zero on ignored tokens: their p is 0 through lse = +inf)
    shift_vec, a_vec, c_vec = _vec(lse, compute), _vec(coeffs.a, compute), _vec(torch.where(valid, coeffs.c, 0), compute)
    b_vec = _vec(coeffs.b, compute)
    z_flat = block_for(n, block, compute, mm, h.device)
    z_flat = z_flat.view(-1) if z_flat is not None else None
    e_flat = take_block(n, block, compute, h.device).view(-1) if two_blocks else None
    for start in range(0, vocab, block):
        stop = min(start + block, vocab)
        w_block = w[start:stop]
        z_block = z_flat[: n * (stop - start)].view(n, stop - start) if z_flat is not None else None
        z = dz = None  # the last block's logits freed first (oneDNN's are a new tensor per block)
        z = logits_block(z_block, hc, w_block, bias[start:stop].to(compute) if bias is not None else None)
        if kernel is not None:
            in_block = valid & (target >= start) & (target < stop)
            local = torch.where(in_block, target - start, -1).long()
            kernel(z, local, shift_vec, False, a_vec, None, b_vec, c_vec)
            dz = z
        elif coeffs.b is not None:
            p = torch.sub(z, shift, out=e_flat[: z.numel()].view_as(z)).exp_()
            dz = torch.addcmul(a, z, b, out=z).mul_(p)  # p (a + b z), in z's storage
        else:
            dz = z.sub_(shift).exp_().mul_(a)
        if kernel is None:
            here = (rows_target >= start) & (rows_target < stop)
            dz.index_put_((rows[here], rows_target[here] - start), -rows_c[here], accumulate=True)
        if d_b is not None:
            torch.sum(dz, 0, out=d_b[start:stop])
        dz = dz.to(mm)
        dw_into(d_w[start:stop], dz, hc)
        dh_into(d_h, dz, w_block, accumulate=True)
    give_back(z_flat)
    give_back(e_flat)
    return d_h, d_w, d_b


def whole_sequence_chunks(sizes: list[int], budget: int):
    """(first sequence, end sequence, first row, end row) of consecutive chunks of whole sequences, each
    as many as ``budget`` rows hold (at least one sequence, however long)."""
    s0 = r0 = 0
    while s0 < len(sizes):
        s1, r1 = s0 + 1, r0 + sizes[s0]
        while s1 < len(sizes) and r1 + sizes[s1] <= budget:
            r1 += sizes[s1]
            s1 += 1
        yield s0, s1, r0, r1
        s0, r0 = s1, r1


def sequence_loss_pass(h, weight, bias, target, lengths, per_sequence_loss, *, chunk: int | None = None,
                       matmul: torch.dtype | None = None):
    """Σ_s φ(nll_s, count_s) and its gradients in one pass, for labelled tokens grouped by sequence.

    Rows ``offsets[s]:offsets[s+1]`` (offsets = cumulative ``lengths``) are sequence s's tokens,
    every one with a label. Each chunk holds whole sequences, so a sequence's NLL — and with it
    φ'(nll_s), the per-token upstream gradient — is known before the chunk's logits leave memory:
    the gradient is formed in the forward pass (3 matmuls instead of 4 with recompute).
    ``per_sequence_loss`` maps (nll [k], ids [k]) — the chunk's sequences' NLL and their indices
    in [0, S) — to per-sequence losses [k], each depending only on its own sequence. Every
    sequence is passed to φ, empty ones too (with nll 0).
    Returns (loss, nll [S], (d_input, d_weight, d_bias)) in the compute dtype.
    """
    n, hidden = h.shape
    vocab = weight.shape[0]
    sizes = [int(x) for x in lengths.tolist()]
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    budget = max(chunk or default_chunk(n, vocab, hidden, 1), max(sizes, default=1))
    mm = matmul or matmul_dtype(h.dtype, h.device)
    w = weight.to(mm)
    bvec = bias.to(compute) if bias is not None else None
    nll = torch.zeros(len(sizes), dtype=compute, device=h.device)
    total = torch.zeros((), dtype=compute, device=h.device)
    d_h = torch.empty(n, hidden, dtype=compute, device=h.device)
    d_w = torch.empty(vocab, hidden, dtype=compute, device=h.device)  # the first chunk's matmul writes it
    if n == 0:
        d_w.zero_()
    d_b = torch.zeros(vocab, dtype=compute, device=h.device) if bias is not None else None
    z_buf = block_for(min(budget, n), vocab, compute, mm, h.device)
    kernel = row_kernel(h.device, compute)
    for s0, s1, r0, r1 in whole_sequence_chunks(sizes, budget):
        r = slice(r0, r1)
        hc = h[r].to(mm)
        z = e = dz = None  # the last chunk's logits freed first (oneDNN's are a new tensor per chunk)
        z = logits_block(z_buf, hc, w, bvec)
        y = target[r].unsqueeze(1)
        if kernel is not None:
            # the statistics and, in z's storage, the unit gradient p − onehot in one call (one exp per
            # logit); φ' then scales the token's row of the small operands instead of d z (below)
            ones = torch.ones(r1 - r0, dtype=compute, device=h.device)
            chunk_lse, zy, _ = kernel(z, target[r].long().contiguous(), None, False, ones, None, None, ones)
            ce = chunk_lse - zy
        else:
            zy = z.gather(1, y).squeeze(1)
            shift = z.amax(dim=1, keepdim=True)
            e = z.sub_(shift).exp_()  # z's storage now holds exp(z − max)
            sums = e.sum(dim=1)
            ce = shift.squeeze(1) + sums.log() - zy
        local = torch.repeat_interleave(torch.arange(s1 - s0, device=h.device), lengths[s0:s1])
        chunk_nll = torch.zeros(s1 - s0, dtype=compute, device=h.device).index_add_(0, local, ce)
        nll[s0:s1] = chunk_nll
        with torch.enable_grad():
            x = chunk_nll.detach().requires_grad_()
            ids = torch.arange(s0, s1, device=h.device)
            phi = per_sequence_loss(x, ids).sum()
            (slope,) = torch.autograd.grad(phi, x)
        total += phi.detach()
        # d z = φ'(nll_s) · (p − onehot) on the sequence's tokens
        coeff = slope.to(compute)[local]
        if kernel is not None:  # d z = diag(coeff) (p − onehot): the factor goes on the small operands
            _add_gradients(z, hc, w, mm, d_h[r], d_w, d_b, r0 != 0, coeff)
            continue
        dz = e.mul_((coeff / sums).unsqueeze(1))
        dz.scatter_add_(1, y, -coeff.unsqueeze(1))
        _add_gradients(dz, hc, w, mm, d_h[r], d_w, d_b, r0 != 0)
    give_back(z_buf)
    return total, nll, (d_h, d_w, d_b)


def irm_penalty_pass(h, weight, bias, target, env, half, num_envs: int, *, chunk: int | None = None):
    """The IRMv1 penalty P = Σ_e s_e² (or Σ_e s_e^A s_e^B with ``half``) and its gradients in its forward pass:
    ``_irm_penalty.irm_penalty_pass`` (the maths, the chain rule over groups) with this module's group pass.

    A group's pass is ``chunked_pass`` with the coefficients of ∂s_k/∂z = scale · (p (1 − ez + z) − onehot):
    a = scale − scale · ez (``a_ez``: the row op forms it as soon as the row's E_p[z] is known), b = c = scale.
    Returns (penalty, env_ce_mean [E], env_scale_grad [E], (d_input, d_weight, d_bias)) in the compute dtype.
    """
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32

    def group_pass(h_k, target_k, scale, d_weight_out=None, **direct):
        count = h_k.shape[0]
        full = torch.full((count,), scale, dtype=compute, device=h_k.device)
        valid = torch.ones(count, dtype=torch.bool, device=h_k.device)
        return chunked_pass(h_k, weight, bias, target_k, valid, coeffs=Coeffs(full, full, full, a_ez=-full),
                            chunk=chunk, d_weight_out=d_weight_out, **direct)

    # A group straight into the totals holds no [V, H] buffer of its own. The first such group allocates
    # the totals, which a buffered first group would use as its buffer: its block keeps to the workspace.
    # A later one spares the buffered strategy's group buffer, so its block may take those V·H elements
    # as well: in both cases the buffered strategy's peak, with fewer chunks.
    blocks = 1 if row_kernel(h.device, compute) is not None else 2
    vocab, hidden = weight.shape
    workspace = workspace_elems(vocab, hidden)
    first = chunk or workspace // (blocks * vocab)
    later = chunk or (workspace + vocab * hidden) // (blocks * vocab)
    return _irm_penalty.irm_penalty_pass(group_pass, h, weight, bias, target, env, half, num_envs,
                                         direct_rows=(first, later))
