"""The IRM losses whose gradient is formed in the forward pass: ``irm_objective`` and ``irm_penalty``.

``linear_cross_entropy_irm`` returns per-environment outputs whose upstream gradients are only known in
backward, so its backward recomputes the logits (4 matmuls). When the loss is the usual IRMv1
objective (DomainBed's ``nll + λ · penalty``)

    L = Σ_e w_e · CE_e + λ · P,   CE_e = Σ_{t∈e} ce_t / n_e,   P = Σ_e s_e²  (or Σ_e s_e^A s_e^B)

every token's gradient in its logits is known as soon as its OWN environment's statistics are. For a
token t of environment e (s_e = Σ_{t∈e} m_t / n_e, m_t = E_p[z_t] − z_{t,y}, SPEC §1.2a):

    ∂L/∂z_t = q (p − onehot) + f (p ⊙ (1 + z − E_p[z]) − onehot)
            = a p + b p⊙z − c onehot,   a = q + f (1 − E_p[z_t]),  b = f,  c = q + f
    q = w_e / n_e,   f = 2 λ s_e / n_e   (unbiased: f = λ s_e^B / n_A on half A, λ s_e^A / n_B on half B)

So a pass that holds a whole environment in one logits chunk forms the statistics, then s_e, then d z
in place, and accumulates d input and d weight with the same logits: 3 matmuls, no [V, H] buffer per
environment (the per-token coefficients carry w_e and λ). An environment too large for one chunk takes
a statistics pass first and a gradient pass that recomputes its logits (4 matmuls, that environment
only). ILU's penalty alone is the case w = 0, λ = 1: on CUDA ``irm_penalty`` takes this route whenever
every environment fits one chunk (the CPU has its own, ``_irm_penalty.irm_penalty_pass``'s direct groups).
The backward scales the gradients by the upstream factor and hands them over (it cannot run twice).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import _chunked_linear_ce as cuda_chunked
from ._torch_linear_ce import Coeffs, whole_sequence_chunks
from .linear_ce import (
    _CHUNKED,
    IRMOutput,
    _hand_over_gradients,
    _irm_of_rows,
    _keep_gradients,
    _needs_grad,
    _passes,
    _prepare_irm,
)


class IRMObjective(NamedTuple):
    loss: torch.Tensor  # scalar Σ_e w_e env_loss_e + λ penalty, differentiable
    env_loss: torch.Tensor  # [E] mean CE per environment (detached)
    env_scale_grad: torch.Tensor  # [E] s_e (detached)
    penalty: torch.Tensor  # scalar Σ s_e² or Σ s_e^A s_e^B (detached)


def _chunk_coefficients(lse, zy, ez, local, counts, half, weights, penalty_weight, found):
    """Per-token (a, b, c) of ∂L/∂z for a chunk of whole environments (``local`` [rows]: each row's environment
    among the chunk's k, ``counts`` [k] their sizes); the environments' CE, s and penalty into ``found``."""
    k = counts.numel()
    m = ez - zy
    size = counts.clamp(min=1)  # an empty environment has no row to divide
    found["ce"] = torch.zeros(k, dtype=m.dtype, device=m.device).index_add_(0, local, lse - zy) / size
    found["s"] = torch.zeros(k, dtype=m.dtype, device=m.device).index_add_(0, local, m) / size
    if half is None:
        found["penalty"] = found["s"] * found["s"]
        f = ((2 * penalty_weight) * found["s"] / size)[local]
    else:  # P_e = s_A s_B: a token of A gets s_B's factor and the reverse; an empty half has s = 0
        group = local * 2 + half
        n_half = torch.zeros(2 * k, dtype=m.dtype, device=m.device).index_add_(0, group, torch.ones_like(m))
        n_half = n_half.clamp(min=1).view(k, 2)
        s_half = torch.zeros(2 * k, dtype=m.dtype, device=m.device).index_add_(0, group, m).view(k, 2) / n_half
        found["penalty"] = s_half[:, 0] * s_half[:, 1]
        f = (penalty_weight * s_half.flip(1) / n_half).view(-1)[group]
    q = (weights / size)[local]
    return Coeffs(q + f * (1 - ez), f, q + f)


def _env_budget(passes, weight: torch.Tensor, h: torch.Tensor, chunk: int | None) -> int:
    """Rows a chunk of whole environments may hold on a backend (``chunk_size`` when the caller gives one)."""
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    return chunk or passes.env_chunk_rows(weight.shape[0], weight.shape[1], h.device, compute)


def objective_pass(passes, h, weight, bias, target, env, half, num_envs: int, env_weights: torch.Tensor,
                   penalty_weight: float, *, chunk: int | None = None, weight_grad: bool = True):
    """L and its gradients on a chunked backend's ``chunked_pass`` (``passes``: the torch/CPU module or the cuBLAS +
    Triton row kernel one), in chunks of whole environments (as many as a chunk holds: one d weight
    accumulation per chunk). Rows are taken in environment order (views when ``env`` is sorted, the usual
    stacked batches; else one gathered copy of h). Every row carries a label.
    Returns (loss, env_ce [E], env_s [E], penalty, (d_input, d_weight | None, d_bias | None)), compute dtype."""
    n, hidden = h.shape
    vocab = weight.shape[0]
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    device = h.device
    budget = _env_budget(passes, weight, h, chunk)
    weights = env_weights.to(device=device, dtype=compute)
    counts = torch.bincount(env, minlength=num_envs)
    order = None if n < 2 or bool((env[1:] >= env[:-1]).all()) else torch.argsort(env, stable=True)
    if order is not None:
        h, target, env = h[order], target[order], env[order]
        half = half[order] if half is not None else None
    env_ce = torch.zeros(num_envs, dtype=compute, device=device)
    env_s = torch.zeros_like(env_ce)
    penalty = torch.zeros((), dtype=compute, device=device)
    d_h = torch.empty(n, hidden, dtype=compute, device=device)  # every row belongs to one environment's chunk
    d_w = d_b = None
    if weight_grad:  # written by the first chunk's matmul, added to by the others
        d_w = torch.empty(vocab, hidden, dtype=compute, device=device)
        d_b = torch.zeros(vocab, dtype=compute, device=device) if bias is not None else None
    added = False
    for e0, e1, r0, r1 in whole_sequence_chunks(counts.tolist(), budget):
        if r1 == r0:
            continue
        rows = slice(r0, r1)
        here = counts[e0:e1]
        local = env[rows] - e0
        found: dict = {}

        def coefficients(lse, zy, ez, local=local, here=here, half=half[rows] if half is not None else None,
                         w=weights[e0:e1], found=found):
            return _chunk_coefficients(lse, zy, ez, local, here, half, w, penalty_weight, found)

        valid = torch.ones(r1 - r0, dtype=torch.bool, device=device)
        into = (d_h[rows], d_w, d_b, added)
        if r1 - r0 <= budget:  # statistics, s_e, then d z with the same logits
            passes.chunked_pass(h[rows], weight, bias, target[rows], valid, coeffs=coefficients, chunk=r1 - r0,
                                into=into)
        else:  # one environment larger than a chunk: its statistics first, then a pass that recomputes
            lse, zy, ez = passes.chunked_pass(h[rows], weight, bias, target[rows], valid, chunk=chunk)
            passes.chunked_pass(h[rows], weight, bias, target[rows], valid, lse=lse,
                                coeffs=coefficients(lse, zy, ez), chunk=chunk, into=into)
        added = True
        env_ce[e0:e1], env_s[e0:e1] = found["ce"], found["s"]
        penalty += found["penalty"].sum()
    if d_w is not None and not added:  # no labelled token at all
        d_w.zero_()
    if order is not None:  # d input back in the callers' row order
        d_h = torch.empty_like(d_h).index_copy_(0, order, d_h)
    loss = (weights * env_ce).sum() + penalty_weight * penalty
    return loss, env_ce, env_s, penalty, (d_h, d_w, d_b)


class _IRMObjective(torch.autograd.Function):
    """The chunked backends' irm_objective: gradient formed during the forward pass, handed over in backward."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, env, half, num_envs, env_weights, penalty_weight, chunk, backend, op):
        ctx.op = op
        head_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        loss, env_loss, env_s, penalty, grads = objective_pass(
            _passes(backend), h, weight, bias, target, env, half, num_envs, env_weights, penalty_weight,
            chunk=chunk, weight_grad=head_grad)
        _keep_gradients(ctx, grads, h, weight, bias)
        ctx.mark_non_differentiable(env_loss, env_s, penalty)
        return loss, env_loss, env_s, penalty

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_loss, _g_scale, _g_penalty):
        return (*_hand_over_gradients(ctx, g, ctx.op), None, None, None, None, None, None, None, None, None)


def _checked_env_weights(env_weights, num_envs: int, device) -> torch.Tensor:
    if env_weights is None:
        return torch.full((num_envs,), 1.0 / num_envs, dtype=torch.float64, device=device)
    weights = torch.as_tensor(env_weights, dtype=torch.float64).detach().to(device)  # constants of the loss
    if weights.shape != (num_envs,):
        raise ValueError(f"env_weights must have num_envs = {num_envs} entries, got shape {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("env_weights must be finite")
    return weights


def irm_objective(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    env: torch.Tensor,
    *,
    num_envs: int,
    penalty_weight: float = 1.0,
    env_weights: torch.Tensor | Sequence[float] | None = None,
    linear_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    unbiased: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> IRMObjective:
    """IRMv1's training loss Σ_e w_e · env_loss_e + penalty_weight · penalty as one differentiable scalar.

    The same numbers as ``out = linear_cross_entropy_irm(...)`` followed by
    ``(w * out.env_loss).sum() + penalty_weight * out.penalty`` (``env_weights`` w defaults to 1/num_envs
    each, i.e. ``out.env_loss.mean()``; an environment without labelled tokens has loss 0), but on the
    chunked backends (torch/CPU, and "triton_chunked", the CUDA default) the gradient is formed in the
    forward pass: 3 matmuls per token instead of 4 while an environment's labelled tokens fit one logits
    chunk (``_torch_linear_ce.env_chunk_rows`` / ``_chunked_linear_ce.env_chunk_rows``; ``chunk_size``
    overrides). Returns ``IRMObjective(loss, env_loss, env_scale_grad, penalty)``, only ``loss``
    differentiable; it cannot backward twice. ``backend="triton"`` and calls that need no gradient
    compute ``linear_cross_entropy_irm`` and combine it.
    """
    if not isinstance(penalty_weight, (int, float)) or isinstance(penalty_weight, bool) \
            or not math.isfinite(penalty_weight):
        raise ValueError(f"penalty_weight must be a finite number, got {penalty_weight!r}")
    h, y, env_id, half, resolved = _prepare_irm(input, linear_weight, target, env, num_envs, linear_bias,
                                                ignore_index, backend, unbiased)
    weights = _checked_env_weights(env_weights, num_envs, h.device)
    needs_grad = _needs_grad(input, linear_weight, linear_bias)
    if resolved not in _CHUNKED or not needs_grad:
        out = _irm_of_rows(h, y, env_id, half, resolved, linear_weight, linear_bias, num_envs, ignore_index,
                           chunk_size)
        loss = (weights.to(out.env_loss.dtype) * out.env_loss).sum() + penalty_weight * out.penalty
        return IRMObjective(loss, out.env_loss.detach(), out.env_scale_grad.detach(), out.penalty.detach())
    loss, env_loss, env_s, penalty = _IRMObjective.apply(h, linear_weight, linear_bias, y, env_id, half, num_envs,
                                                         weights, float(penalty_weight), chunk_size, resolved,
                                                         "irm_objective")
    return IRMObjective(loss, env_loss, env_s, penalty)


class _IRMPenalty(torch.autograd.Function):
    """Torch path of the IRMv1 penalty with its gradient formed during the forward pass (see irm_penalty)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, env, half, num_envs, chunk, backend):
        penalty, env_loss, scale_grad, grads = _passes(backend).irm_penalty_pass(h, weight, bias, target, env, half,
                                                                                 num_envs, chunk=chunk)
        _keep_gradients(ctx, grads, h, weight, bias)
        ctx.mark_non_differentiable(env_loss, scale_grad)
        return penalty, env_loss, scale_grad

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_loss, _g_scale):
        return (*_hand_over_gradients(ctx, g, "irm_penalty"), None, None, None, None, None, None)


def irm_penalty(
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
    """``linear_cross_entropy_irm`` when only the penalty is trained: same numbers, only ``penalty`` differentiable.

    ILU's objective holds the penalty and not the environments' CE, and s_e's gradient in the
    logits does not depend on s_e, so the torch path forms the gradient with the logits of the
    forward pass (3 matmuls per token instead of 4, see ``_irm_penalty.irm_penalty_pass``). On the
    CPU a group that fits one logits block goes straight into the totals; otherwise a group holds one
    extra [V, H] fp32 buffer until its factor is known (two with ``unbiased``). On CUDA, when every
    environment fits one logits chunk, it is ``irm_objective`` with w = 0 and λ = 1 (no buffers);
    otherwise the buffers, or with too few tokens for them to pay off
    (``_chunked_linear_ce.penalty_recompute_is_cheaper``) ``linear_cross_entropy_irm``.
    ``env_loss`` and ``env_scale_grad`` come back detached. It cannot backward twice. The
    Triton path and calls that need no gradient compute ``linear_cross_entropy_irm``.
    """
    needs_grad = _needs_grad(input, linear_weight, linear_bias)
    h, y, env_id, half, resolved = _prepare_irm(input, linear_weight, target, env, num_envs, linear_bias,
                                                ignore_index, backend, unbiased)
    if resolved == "triton_chunked" and needs_grad and h.shape[0] > 0:
        largest = int(torch.bincount(env_id, minlength=num_envs).max())
        if largest <= _env_budget(cuda_chunked, linear_weight, h, chunk_size):
            zero = torch.zeros(num_envs, dtype=torch.float64, device=h.device)
            penalty, env_loss, scale_grad, _ = _IRMObjective.apply(
                h, linear_weight, linear_bias, y, env_id, half, num_envs, zero, 1.0, chunk_size, resolved,
                "irm_penalty")
            return IRMOutput(env_loss, scale_grad, penalty)
    groups = num_envs * (2 if unbiased else 1)
    few_tokens = resolved == "triton_chunked" and cuda_chunked.penalty_recompute_is_cheaper(h.shape[0], groups,
                                                                                             h.device)
    if resolved not in _CHUNKED or not needs_grad or few_tokens:
        out = _irm_of_rows(h, y, env_id, half, resolved, linear_weight, linear_bias, num_envs, ignore_index, chunk_size)
        return IRMOutput(out.env_loss.detach(), out.env_scale_grad.detach(), out.penalty)
    penalty, env_loss, scale_grad = _IRMPenalty.apply(h, linear_weight, linear_bias, y, env_id, half, num_envs,
                                                      chunk_size, resolved)
    return IRMOutput(env_loss, scale_grad, penalty)
