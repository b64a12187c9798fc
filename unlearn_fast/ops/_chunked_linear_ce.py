"""The atomics-free CUDA path of the linear cross-entropy (backend "triton_chunked", the default on CUDA).

Per chunk of token rows (Liger-Kernel's scheme, with the IRM terms):
    z  = h Wᵀ (+ b)                  one cuBLAS matmul, in the input dtype (bf16: fp32 accumulation)
    one Triton row kernel            lse, z_y, E_p[z]; and, when the upstream gradient is known,
                                     z turned in place into dz = p (a + b z) − c onehot
    d input[rows] = dz W             cuBLAS, fp32 result
    d weight     += dzᵀ h            cuBLAS, accumulated in an fp32 [V, H] buffer
    d bias       += Σ_rows dz
No atomics: each d input row is written once, d weight is a sum of whole matmuls. Extra memory:
one [chunk, V] logits block in the input dtype plus the fp32 [V, H] d weight. The functions
mirror ``_torch_linear_ce``'s (same arguments, same returns), so the ops pick either module.
The kernel is kernels/linear_ce_rows.py; this module is its only caller.
"""
from __future__ import annotations

import torch

from . import _irm_penalty
from ._matmul import mm_into
from ._torch_linear_ce import Coeffs, whole_sequence_chunks

# Elements of the [chunk, V] logits block (input dtype; 2**29 bf16 = 1 GiB): at V = 128256 a chunk
# is 4186 rows, so the fp32 d weight (2.1 GB at H = 4096) is read and written 4 times for 16k tokens.
_WORKSPACE_ELEMS = 1 << 29
_NO_LABEL = -1  # the row kernel's ignore_index: rows outside ``valid`` carry it


# bf16 GEMM FLOPs per HBM byte of a Hopper GPU (788 TFLOP/s measured over 4.8 TB/s H200, 3.35 TB/s H100:
# 164-235); bench/cost_model.py has the per-kernel figures this summarises.
_FLOPS_PER_BYTE = 200


def default_chunk(num_tokens: int, vocab: int) -> int:
    return max(1, min(num_tokens, _WORKSPACE_ELEMS // max(vocab, 1)))


def env_chunk_rows(vocab: int, hidden: int, device=None, dtype=None) -> int:
    """Rows an environment may have for ``irm_losses`` to take it in one chunk: one logits block, as any pass."""
    return _WORKSPACE_ELEMS // max(vocab, 1)


def _rows():
    from unlearn_fast.kernels import linear_ce_rows

    return linear_ce_rows


def _grad_buffers(n, hidden, vocab, bias, device, weight_grad=True, d_weight_out=None):
    # d weight is not zeroed: the first chunk's matmul writes it (beta = 0), later ones add
    d_h = torch.empty(n, hidden, dtype=torch.float32, device=device)
    d_w = None
    if weight_grad:
        d_w = torch.empty(vocab, hidden, dtype=torch.float32, device=device) if d_weight_out is None else d_weight_out
    d_b = torch.zeros(vocab, dtype=torch.float32, device=device) if bias is not None and weight_grad else None
    return d_h, d_w, d_b


def _accumulate(dz, hc, weight, d_h_rows, d_w, d_b, first: bool):
    mm_into(d_h_rows, dz, weight)
    if d_w is not None:
        mm_into(d_w, dz.T, hc, accumulate=not first)
    if d_b is not None:
        d_b += dz.sum(0, dtype=torch.float32)


def chunked_pass(h, weight, bias, target, valid, *, lse=None, coeffs=None, chunk=None, want_ez=True,
                 weight_grad=True, d_weight_out=None, into=None):
    """Same contract as ``_torch_linear_ce.chunked_pass`` (fp32 results; ``into`` included, its d bias
    zero-filled when not added to), on the row kernel."""
    rows_ = _rows().rows_
    n, hidden = h.shape
    vocab = weight.shape[0]
    chunk = chunk or default_chunk(n, vocab)
    want_ez = want_ez or callable(coeffs)
    y_all = torch.where(valid, target, _NO_LABEL)
    out_lse = torch.zeros(n, dtype=torch.float32, device=h.device)
    out_zy, out_ez = torch.zeros_like(out_lse), torch.zeros_like(out_lse)
    added = False  # whether d weight already holds a sum this pass adds to
    if into is not None:
        d_h, d_w, d_b, added = into
    elif coeffs is not None:
        d_h, d_w, d_b = _grad_buffers(n, hidden, vocab, bias, h.device, weight_grad, d_weight_out)
    if coeffs is not None and n == 0 and d_w is not None and not added:
        d_w.zero_()
    z_buf = torch.empty(min(chunk, n), vocab, dtype=h.dtype, device=h.device)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        hc = h[rows]
        z = mm_into(z_buf[: hc.shape[0]], hc, weight.T, bias=bias)
        y = y_all[rows]
        if lse is not None:  # recompute in backward: the statistics are known
            rows_(z, y, _NO_LABEL, lse=lse[rows].float(), coeffs=_chunk_coeffs(coeffs, rows))
        elif coeffs is None or callable(coeffs):
            chunk_lse, zy, ez = rows_(z, y, _NO_LABEL, want_ez=want_ez)
            out_lse[rows], out_zy[rows], out_ez[rows] = chunk_lse, zy, ez
            if coeffs is not None:
                cf = coeffs(chunk_lse, zy, ez if want_ez else None)
                keep = valid[rows]
                cf = [torch.where(keep, v.float(), 0) if v is not None else None for v in (cf.a, cf.b, cf.c)]
                rows_(z, y, _NO_LABEL, lse=torch.where(keep, chunk_lse, torch.inf), coeffs=cf)
        else:  # upstream known before the chunk: statistics and dz in one launch
            chunk_lse, zy, ez = rows_(z, y, _NO_LABEL, want_ez=want_ez, coeffs=_chunk_coeffs(coeffs, rows))
            out_lse[rows], out_zy[rows], out_ez[rows] = chunk_lse, zy, ez
        if coeffs is not None:
            _accumulate(z, hc, weight, d_h[rows], d_w, d_b, first=start == 0 and not added)
    stats = (out_lse, out_zy, out_ez)
    return stats if coeffs is None else (stats, (d_h, d_w, d_b))


def forward_keeping_logits(h, weight, bias, target, valid, *, chunk=None, want_ez=True):
    """``chunked_pass`` statistics for a recompute-in-backward op, and the logits block when every row fits
    ONE chunk (else None): kept for the backward, it saves the recompute matmul (4 → 3 matmuls) at no
    more memory than the pass holds anyway (one [chunk, V] block; the e2e 8B step, 2048 tokens, fits)."""
    n, vocab = h.shape[0], weight.shape[0]
    if n == 0 or n > (chunk or default_chunk(n, vocab)):
        return chunked_pass(h, weight, bias, target, valid, chunk=chunk, want_ez=want_ez), None
    z = mm_into(torch.empty(n, vocab, dtype=h.dtype, device=h.device), h, weight.T, bias=bias)
    stats = _rows().rows_(z, torch.where(valid, target, _NO_LABEL), _NO_LABEL, want_ez=want_ez)
    return stats, z


def backward_from_logits(z, h, weight, bias, target, valid, lse, coeffs: Coeffs):
    """Gradients from the logits kept by ``forward_keeping_logits`` (turned into dz in place: usable once)."""
    _rows().rows_(z, torch.where(valid, target, _NO_LABEL), _NO_LABEL, lse=lse.float(),
                  coeffs=_chunk_coeffs(coeffs, slice(None)))
    d_h, d_w, d_b = _grad_buffers(h.shape[0], h.shape[1], weight.shape[0], bias, h.device)
    _accumulate(z, h, weight, d_h, d_w, d_b, first=True)
    return d_h, d_w, d_b


def _chunk_coeffs(coeffs: Coeffs, rows):
    # the row kernel indexes the vectors by row: contiguous copies of broadcast (stride 0) ones
    b = coeffs.b[rows].float().contiguous() if coeffs.b is not None else None
    return coeffs.a[rows].float().contiguous(), b, coeffs.c[rows].float().contiguous()


def sequence_loss_pass(h, weight, bias, target, lengths, per_sequence_loss, *, chunk=None):
    """Same contract as ``_torch_linear_ce.sequence_loss_pass`` (every row labelled), on the row kernel."""
    rows_ = _rows().rows_
    n, hidden = h.shape
    vocab = weight.shape[0]
    sizes = [int(x) for x in lengths.tolist()]
    budget = max(chunk or default_chunk(n, vocab), max(sizes, default=1))
    nll = torch.zeros(len(sizes), dtype=torch.float32, device=h.device)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    d_h, d_w, d_b = _grad_buffers(n, hidden, vocab, bias, h.device)
    if n == 0:
        d_w.zero_()
    z_buf = torch.empty(min(budget, n), vocab, dtype=h.dtype, device=h.device)
    for s0, s1, r0, r1 in whole_sequence_chunks(sizes, budget):
        r = slice(r0, r1)
        hc = h[r]
        z = mm_into(z_buf[: r1 - r0], hc, weight.T, bias=bias)
        y = target[r]
        lse, zy, _ = rows_(z, y, _NO_LABEL)
        local = torch.repeat_interleave(torch.arange(s1 - s0, device=h.device), lengths[s0:s1])
        chunk_nll = torch.zeros(s1 - s0, dtype=torch.float32, device=h.device).index_add_(0, local, lse - zy)
        nll[s0:s1] = chunk_nll
        with torch.enable_grad():
            x = chunk_nll.detach().requires_grad_()
            phi = per_sequence_loss(x, torch.arange(s0, s1, device=h.device)).sum()
            (slope,) = torch.autograd.grad(phi, x)
        total += phi.detach()
        coeff = slope.float()[local]  # d z = φ'(nll_s) (p − onehot) on the sequence's tokens
        rows_(z, y, _NO_LABEL, lse=lse, coeffs=(coeff, None, coeff))
        _accumulate(z, hc, weight, d_h[r], d_w, d_b, first=r0 == 0)
    return total, nll, (d_h, d_w, d_b)


def penalty_recompute_is_cheaper(num_tokens: int, groups: int, device: torch.device | None = None) -> bool:
    """Whether ``irm_penalty`` should recompute the logits in backward (4 matmuls, one d weight buffer) rather
    than form each group's gradient in the forward (3 matmuls, but per group a [V, H] fp32 buffer written,
    then folded into the total: 16 bytes per weight element per group, 4 fewer for the first).
    Per weight element the extra matmul costs 2·N FLOPs and the buffers (16·groups − 4) bytes. A GPU rule:
    False off CUDA (under the interpreter the in-forward path is the one worth testing)."""
    if device is not None and device.type != "cuda":
        return False
    return 2 * num_tokens < _FLOPS_PER_BYTE * (16 * groups - 4)


def irm_penalty_pass(h, weight, bias, target, env, half, num_envs, *, chunk=None):
    """Same contract and maths as ``_torch_linear_ce.irm_penalty_pass``: ``_irm_penalty.irm_penalty_pass`` with
    a group pass on the row kernel (statistics, then d z from them: the unit coefficients need E_p[z])."""

    def unit(lse, zy, ez, scale):  # ∂s_k/∂z = scale · (p (1 − ez + z) − onehot)
        return Coeffs((1 - ez) * scale, torch.full_like(ez, scale), torch.full_like(ez, scale))

    def group_pass(h_k, target_k, scale, d_weight_out):
        valid = torch.ones(h_k.shape[0], dtype=torch.bool, device=h_k.device)
        return chunked_pass(h_k, weight, bias, target_k, valid, coeffs=lambda *stats: unit(*stats, scale),
                            chunk=chunk, d_weight_out=d_weight_out)

    return _irm_penalty.irm_penalty_pass(group_pass, h, weight, bias, target, env, half, num_envs)
