"""Fused linear cross-entropy ops: plain CE, per-environment CE + IRMv1 penalty, per-sequence NLL and losses.

All three are built on one autograd function, ``_TokenStats``, that maps
(hidden, LM-head weight, bias, target) to two fp32 per-token statistics
without ever holding the [N, V] logits:

    ce_t = lse_t − z_{t,y}                  the token's cross-entropy
    m_t  = E_{p_t}[z_t] − z_{t,y}           d ce_t(w · z_t) / dw at w = 1

Every output is then an O(N) reduction of these in plain torch (so autograd
composes them), e.g. for environment e with N_e non-ignored tokens

    env_loss_e = Σ_{t∈e} ce_t / N_e,   s_e = Σ_{t∈e} m_t / N_e,   penalty = Σ_e s_e²

and the backward of ``_TokenStats`` turns the per-token upstream gradients
(g_ce, g_m) into d logits = a p + b p⊙z − c onehot with
a = g_ce + g_m (1 − E_p[z]),  b = g_m,  c = g_ce + g_m
(∂E_p[z]/∂z_v = p_v (1 + z_v − E_p[z])), recomputing the logits tile by tile.

Where the loss fixes the upstream gradients up to a factor known by the end of
the forward pass, the chunked paths (torch; "triton_chunked", the CUDA default:
cuBLAS chunks and one Triton row kernel, no atomics) form the gradient with the
forward's logits instead (3 matmuls, not 4): plain CE with reduction mean/sum (``_SummedCE``),
``sequence_loss``, ``irm_penalty`` and ``irm_objective`` (irm_losses.py). Every op first drops the tokens without
a label (prompts, padding): they add nothing and would cost as much as the rest.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import _chunked_linear_ce as cuda_chunked
from . import _torch_linear_ce as torch_path
from ._checks import check_ids, flatten_tokens, resolve_backend

_REDUCTIONS = ("mean", "sum", "none")
# Backends that walk [chunk, V] logits blocks and so can form the gradient in the forward pass:
# the torch path (CPU, fallback) and the CUDA default (cuBLAS chunks + the Triton row kernel).
_CHUNKED = ("torch", "triton_chunked")


def _passes(backend):
    """The module of chunk passes of a chunked backend (same functions, same contracts)."""
    return cuda_chunked if backend == "triton_chunked" else torch_path


class IRMOutput(NamedTuple):
    env_loss: torch.Tensor  # [E] mean CE per environment (0 for an empty environment)
    env_scale_grad: torch.Tensor  # [E] s_e = d env_loss_e(w·z) / dw at w = 1
    penalty: torch.Tensor  # scalar: Σ s_e² (or Σ s_e^A s_e^B when unbiased)


class SequenceLoss(NamedTuple):
    loss: torch.Tensor  # scalar Σ_s φ(nll_s), differentiable
    nll: torch.Tensor  # [S] summed token NLL per sequence (detached)
    num_tokens: torch.Tensor  # [S] int64


class SequenceNLL(NamedTuple):
    nll: torch.Tensor  # [S] summed token NLL per sequence (fp32, differentiable)
    num_tokens: torch.Tensor  # [S] int64 count of non-ignored tokens per sequence


def _kernels():
    from unlearn_fast.kernels import linear_ce

    return linear_ce


def _forward_stats(backend, h, weight, bias, target, valid, ignore_index, chunk, need_m):
    if backend == "triton":
        return _kernels().linear_ce_forward(h, weight, bias, target, ignore_index)
    # Without E_p[z] the torch pass holds one [chunk, V] block instead of two.
    return _passes(backend).chunked_pass(h, weight, bias, target, valid, chunk=chunk, want_ez=need_m)


class _TokenStats(torch.autograd.Function):
    """(h [N, H], weight [V, H], bias [V] | None, target [N]) -> (ce [N], m [N]), zeros on ignored tokens.

    With ``need_m=False`` m is not computed (returned as zeros, not differentiable).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, backend, chunk, need_m):
        valid = target != ignore_index
        ctx.logits = None
        if backend == "triton_chunked":  # one chunk: its logits are kept and the backward needs no recompute
            (lse, zy, ez), ctx.logits = cuda_chunked.forward_keeping_logits(h, weight, bias, target, valid,
                                                                             chunk=chunk, want_ez=need_m)
        else:
            lse, zy, ez = _forward_stats(backend, h, weight, bias, target, valid, ignore_index, chunk, need_m)
        ctx.save_for_backward(h, weight, bias, target, lse, ez)
        ctx.backend, ctx.chunk, ctx.ignore_index, ctx.need_m = backend, chunk, ignore_index, need_m
        ctx.set_materialize_grads(False)
        if not need_m:
            m = torch.zeros_like(lse)
            ctx.mark_non_differentiable(m)
            return lse - zy, m
        return lse - zy, ez - zy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_ce, g_m):
        h, weight, bias, target, lse, ez = ctx.saved_tensors
        valid = target != ctx.ignore_index
        zero = torch.zeros_like(lse)
        g_ce = zero if g_ce is None else torch.where(valid, g_ce.to(lse.dtype), 0)
        if g_m is None or not ctx.need_m:
            a, b, c = g_ce, None, g_ce
        else:
            g_m = torch.where(valid, g_m.to(lse.dtype), 0)
            a, b, c = g_ce + g_m * (1 - ez), g_m, g_ce + g_m
        # Both backends form p = exp(z − lse): +inf on ignored tokens makes their p 0 whatever
        # their logits (a large logit with lse = 0 would give inf·0 = NaN).
        lse = torch.where(valid, lse, torch.inf)
        if ctx.backend == "triton":
            d_h, d_w, d_b = _kernels().linear_ce_backward(h, weight, bias, target, lse, a, b, c)
        elif ctx.backend == "triton_chunked" and ctx.logits is not None:
            z, ctx.logits = ctx.logits, None  # turned into dz in place: a second backward recomputes
            d_h, d_w, d_b = cuda_chunked.backward_from_logits(z, h, weight, bias, target, valid, lse,
                                                              torch_path.Coeffs(a, b, c))
        elif ctx.backend == "triton_chunked":
            _, (d_h, d_w, d_b) = cuda_chunked.chunked_pass(h, weight, bias, target, valid, lse=lse,
                                                           coeffs=torch_path.Coeffs(a, b, c), chunk=ctx.chunk)
        else:
            coeffs = torch_path.Coeffs(a, b, c)
            if h.shape[0] < weight.shape[0]:
                # Fewer tokens than vocabulary rows: walk the vocabulary (see _torch_linear_ce).
                block = ctx.chunk * weight.shape[0] // max(h.shape[0], 1) if ctx.chunk else None
                d_h, d_w, d_b = torch_path.backward_by_vocab(h, weight, bias, target, valid, lse, coeffs,
                                                             block=block)
            else:
                _, (d_h, d_w, d_b) = torch_path.chunked_pass(
                    h, weight, bias, target, valid, lse=lse, coeffs=coeffs, chunk=ctx.chunk
                )
        d_b = d_b.to(bias.dtype) if d_b is not None else None
        return d_h.to(h.dtype), d_w.to(weight.dtype), d_b, None, None, None, None, None


class _SummedCE(torch.autograd.Function):
    """Torch path of Σ_t ce_t · scale with the gradient formed during the forward pass.

    Plain CE with reduction mean/sum has a uniform upstream gradient, so the
    gradient can be accumulated in the same pass as the loss (one matmul fewer
    than recompute-in-backward, like torch's chunked F.linear_cross_entropy);
    backward only scales it.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, scale, chunk, backend):
        valid = target != ignore_index
        needs_grad = any(t is not None and t.requires_grad for t in (h, weight, bias))
        passes = _passes(backend)
        if not needs_grad:
            lse, zy, _ = passes.chunked_pass(h, weight, bias, target, valid, chunk=chunk, want_ez=False)
            return ((lse - zy).sum() * scale).to(lse.dtype)
        # the reduction's scale goes into the per-token coefficients (free in the row work), so that the
        # backward's factor is the upstream gradient alone: usually 1, and then no pass over the gradients
        unit = valid.to(scale.dtype) * scale
        # A frozen head (an attack on the inputs) gets no weight gradient: no [V, H] buffer, one matmul fewer.
        head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        (lse, zy, _), grads = passes.chunked_pass(
            h, weight, bias, target, valid, coeffs=torch_path.Coeffs(unit, None, unit), chunk=chunk, want_ez=False,
            weight_grad=head_grad,
        )
        _keep_gradients(ctx, grads, h, weight, bias)
        return (lse - zy).sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        hint = "; use reduction='none' and reduce the result yourself if you need to"
        return (*_hand_over_gradients(ctx, g, "linear_cross_entropy(reduction='mean'|'sum')", hint),
                None, None, None, None, None)


def _keep_gradients(ctx, grads, h, weight, bias):
    """Gradients formed in a forward pass, kept on ctx (not saved tensors) for ``_hand_over_gradients``."""
    ctx.grads = grads
    ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)


def _hand_over_gradients(ctx, factor, op: str, hint: str = ""):
    """The first backward scales the kept gradients in place and hands them over, so the leaves' .grad can
    take them without a copy (like torch's chunked linear CE); there is no second backward."""
    if ctx.grads is None:
        raise RuntimeError(f"{op} (backend='torch') computes its gradient in the forward pass and hands it over "
                           f"in the first backward; it cannot backward twice{hint}")
    grads, ctx.grads = ctx.grads, None
    return [_scaled(grad, factor, dtype) if grad is not None else None for grad, dtype in zip(grads, ctx.dtypes)]


def _scaled(grad: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad · factor in ``dtype``: one pass that writes the narrower result (the same roundings as scaling in
    place and casting after, one [V, H] fp32 read and write fewer)."""
    if grad.dtype == dtype:
        if factor.device.type == "cpu" and factor.numel() == 1 and bool(factor == 1):
            return grad  # × 1 changes no bit (NaN and ±0 included): no pass over a [V, H] tensor
        return grad.mul_(factor)
    return torch.mul(grad, factor, out=torch.empty_like(grad, dtype=dtype))


def _token_stats(h, weight, bias, target, ignore_index, backend, chunk, need_m=False):
    if backend in ("triton", "triton_chunked") and h.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} does not support float64; use backend='torch'")
    return _TokenStats.apply(h, weight, bias, target, ignore_index, backend, chunk, need_m)


def _prepare(input, linear_weight, target, linear_bias, ignore_index, backend, **per_token):
    h, y, ids = flatten_tokens(input, linear_weight, target, linear_bias, ignore_index, **per_token)
    if h.dtype != linear_weight.dtype:
        raise TypeError(f"input ({h.dtype}) and linear_weight ({linear_weight.dtype}) must have the same dtype")
    backend = resolve_backend(backend, h.device, h.dtype)
    if backend in ("triton", "triton_chunked") and h.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} does not support float64; use backend='torch'")
    return h.contiguous(), y, ids, backend


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a call will be differentiated: grad mode on and some input requiring grad (the ops that form
    their gradient in the forward pass skip that work otherwise)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _labelled_rows(h, y, ignore_index, ids=None):
    """Only the tokens that have a label: the ops cost time in proportion to the rows they get, and an
    ignored token (a prompt, padding) adds nothing to any output. Returns (h, y, ids, rows), rows
    None when nothing is dropped; indexing ``h`` keeps autograd exact (zero gradient elsewhere)."""
    ids = ids or {}
    valid = y != ignore_index
    if bool(valid.all()):
        return h, y, ids, None
    rows = valid.nonzero().squeeze(1)
    return h.index_select(0, rows), y[rows], {k: v[rows] for k, v in ids.items()}, rows


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, size: int) -> torch.Tensor:
    """Per-token values of the labelled rows back at their places among ``size`` tokens (0 elsewhere)."""
    if rows is None:
        return values
    return values.new_zeros(size).index_copy(0, rows, values)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` against ``target`` without materialising logits.

    Like ``torch.nn.functional.linear_cross_entropy`` except that an all-ignored
    batch gives loss 0 with zero gradients under ``reduction="mean"`` (torch gives NaN).
    The loss is fp32 (fp64 for fp64 inputs); gradients return in the inputs' dtypes.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    h, y, _, backend = _prepare(input, linear_weight, target, linear_bias, ignore_index, backend)
    num_tokens = y.numel()
    h, y, _, rows = _labelled_rows(h, y, ignore_index)
    if reduction != "none" and backend in _CHUNKED:
        if backend == "triton_chunked" and h.dtype == torch.float64:
            raise TypeError("backend='triton_chunked' does not support float64; use backend='torch'")
        scale = torch.ones((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
        if reduction == "mean":
            scale = scale / max(y.numel(), 1)
        return _SummedCE.apply(h, linear_weight, linear_bias, y, ignore_index, scale, chunk_size, backend)
    ce, _ = _token_stats(h, linear_weight, linear_bias, y, ignore_index, backend, chunk_size)
    if reduction == "none":
        return _scatter_rows(ce, rows, num_tokens).reshape(target.shape)
    if reduction == "sum":
        return ce.sum()
    return ce.sum() / max(y.numel(), 1)


def _unbiased_halves(env: torch.Tensor, valid: torch.Tensor, num_envs: int, token_shape) -> torch.Tensor:
    """Half (0 = A, 1 = B) of each token for the unbiased penalty.

    [B, T] tokens: sequences alternate, by their rank among the sequences of the
    environment that have a non-ignored token. [N] tokens: non-ignored tokens
    alternate by their rank within their environment.
    """
    if len(token_shape) == 2:
        batch, steps = token_shape
        row = torch.arange(batch, device=env.device).repeat_interleave(steps)
        present = torch.zeros(batch, num_envs, dtype=torch.long, device=env.device)
        present[row[valid], env[valid]] = 1
        rank = present.cumsum(0) - 1
        return rank[row, env] % 2
    onehot = torch.zeros(env.numel(), num_envs, dtype=torch.long, device=env.device)
    onehot[valid.nonzero().squeeze(1), env[valid]] = 1
    rank = onehot.cumsum(0) - 1
    return rank.gather(1, env.unsqueeze(1)).squeeze(1) % 2


def _per_group_mean(values: torch.Tensor, group: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(count.numel(), dtype=values.dtype, device=values.device).index_add(0, group, values)
    return sums / count.clamp(min=1).to(values.dtype)


def linear_cross_entropy_irm(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    env: torch.Tensor,
    *,
    num_envs: int,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    unbiased: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> IRMOutput:
    """Per-environment mean CE and the IRMv1 penalty (SPEC §1.2a), logits-free, one pass.

    ``env`` gives each token's environment id in [0, num_envs) (ignored tokens may
    carry any id). Returns ``IRMOutput(env_loss[E], env_scale_grad[E], penalty)``, all
    differentiable; ``penalty = Σ_e s_e²``, or with ``unbiased=True`` Σ_e s_e^A s_e^B
    over two halves of each environment (see ``_unbiased_halves``). An environment
    without non-ignored tokens contributes 0 everywhere.
    """
    prepared = _prepare_irm(input, linear_weight, target, env, num_envs, linear_bias, ignore_index, backend, unbiased)
    return _irm_of_rows(*prepared, linear_weight, linear_bias, num_envs, ignore_index, chunk_size)


def _irm_of_rows(h, y, env_id, half, backend, linear_weight, linear_bias, num_envs, ignore_index, chunk_size):
    """linear_cross_entropy_irm on prepared labelled rows (``_prepare_irm``)."""
    ce, m = _token_stats(h, linear_weight, linear_bias, y, ignore_index, backend, chunk_size, need_m=True)
    count = torch.zeros(num_envs, dtype=torch.long, device=h.device).index_add_(0, env_id, torch.ones_like(env_id))
    env_loss = _per_group_mean(ce, env_id, count)
    scale_grad = _per_group_mean(m, env_id, count)
    if half is not None:  # the unbiased penalty
        group = env_id * 2 + half
        half_count = torch.zeros(2 * num_envs, dtype=torch.long, device=h.device).index_add_(
            0, group, torch.ones_like(group))
        s_half = _per_group_mean(m, group, half_count).view(num_envs, 2)
        penalty = (s_half[:, 0] * s_half[:, 1]).sum()
    else:
        penalty = (scale_grad * scale_grad).sum()
    return IRMOutput(env_loss, scale_grad, penalty)


def _prepare_irm(input, linear_weight, target, env, num_envs, linear_bias, ignore_index, backend, unbiased):
    """Checked labelled rows of an IRM op: (h, y, env id, half or None, backend)."""
    h, y, ids, backend = _prepare(input, linear_weight, target, linear_bias, ignore_index, backend, env=env)
    valid = y != ignore_index
    check_ids("env", ids["env"], num_envs, "num_envs", valid)
    env_id = torch.where(valid, ids["env"], 0)
    if unbiased:
        ids["half"] = _unbiased_halves(env_id, valid, num_envs, tuple(target.shape))
    ids["env"] = env_id
    h, y, ids, _ = _labelled_rows(h, y, ignore_index, ids)
    return h, y, ids["env"], ids.get("half"), backend


def sequence_nll(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    seq: torch.Tensor | None = None,
    *,
    num_seqs: int | None = None,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> SequenceNLL:
    """Summed token NLL per sequence (NPO's NLL_i), logits-free.

    ``seq`` gives each token's sequence id in [0, num_seqs); for a [B, T, H] input it
    may be omitted (sequence = batch row). Returns ``SequenceNLL(nll[S], num_tokens[S])``.
    """
    if seq is None:
        if input.dim() != 3:
            raise ValueError("seq is required for an [N, H] input (it may be omitted only for [B, T, H])")
        seq = torch.arange(input.shape[0], device=input.device).unsqueeze(1).expand(input.shape[:2])
        num_seqs = input.shape[0] if num_seqs is None else num_seqs
    if num_seqs is None:
        raise ValueError("num_seqs is required when seq is given")
    h, y, ids, backend = _prepare(input, linear_weight, target, linear_bias, ignore_index, backend, seq=seq)
    check_ids("seq", ids["seq"], num_seqs, "num_seqs", y != ignore_index)
    h, y, ids, _ = _labelled_rows(h, y, ignore_index, ids)
    seq_id = ids["seq"]
    ce, _ = _token_stats(h, linear_weight, linear_bias, y, ignore_index, backend, chunk_size)
    nll = torch.zeros(num_seqs, dtype=ce.dtype, device=h.device).index_add(0, seq_id, ce)
    count = torch.zeros(num_seqs, dtype=torch.long, device=h.device).index_add_(0, seq_id, torch.ones_like(seq_id))
    return SequenceNLL(nll, count)


class _SequenceLoss(torch.autograd.Function):
    """Torch path of Σ_s φ(nll_s) with the gradient formed during the forward pass (see sequence_loss)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, lengths, per_sequence_loss, chunk, backend):
        total, nll, grads = _passes(backend).sequence_loss_pass(h, weight, bias, target, lengths, per_sequence_loss,
                                                                chunk=chunk)
        _keep_gradients(ctx, grads, h, weight, bias)
        ctx.mark_non_differentiable(nll)
        return total, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_nll):
        return (*_hand_over_gradients(ctx, g, "sequence_loss"), None, None, None, None, None)


def sequence_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    per_sequence_loss,
    *,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> SequenceLoss:
    """Σ_s φ(nll_s) over the rows s of a [B, T, H] input, where nll_s is the row's summed token NLL.

    ``per_sequence_loss(nll, ids)`` gets a vector of sequences' NLL and their row indices and
    returns their losses, each depending on its own sequence only (NPO's sequence form,
    SimNPO, GA summed per sequence; not NPO's batch-mean form). On the torch path whole rows
    are processed per chunk, so each row's φ'(nll_s) is known while its logits are in memory
    and the gradient is formed in the same pass: one matmul fewer than ``sequence_nll``
    followed by φ. It cannot backward twice. Rows longer than the workspace, and the Triton
    path, compute ``sequence_nll`` and apply φ (same numbers). Returns
    ``SequenceLoss(loss, nll[S] detached, num_tokens[S])``.
    """
    if input.dim() != 3:
        raise ValueError(f"sequence_loss needs a [B, T, H] input (one sequence per row), got shape {tuple(input.shape)}")
    h, y, _, backend = _prepare(input, linear_weight, target, linear_bias, ignore_index, backend)
    lengths = (target != ignore_index).sum(1)
    longest = int(lengths.max()) if lengths.numel() else 0
    workspace = _passes(backend)._WORKSPACE_ELEMS if backend in _CHUNKED else 0
    fits = longest * linear_weight.shape[0] <= workspace and (chunk_size is None or chunk_size >= longest)
    needs_grad = _needs_grad(input, linear_weight, linear_bias)
    if backend in _CHUNKED and fits and needs_grad and longest > 0:
        h, y, _, _ = _labelled_rows(h, y, ignore_index)
        loss, nll = _SequenceLoss.apply(h, linear_weight, linear_bias, y, lengths, per_sequence_loss, chunk_size,
                                        backend)
        return SequenceLoss(loss, nll, lengths)
    nll, count = sequence_nll(input, linear_weight, target, linear_bias=linear_bias, ignore_index=ignore_index,
                              backend=backend, chunk_size=chunk_size)
    ids = torch.arange(nll.shape[0], device=nll.device)
    return SequenceLoss(per_sequence_loss(nll, ids).sum(), nll.detach(), count)
