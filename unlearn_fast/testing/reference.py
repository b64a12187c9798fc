"""Naive, obviously-correct references the tests (and the benchmarks) compare against.

They materialise the full [N, V] logits and take the IRM penalty's gradient by
double backprop through a scalar logit scale per environment, exactly as the
public ILU/IRM code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_logits(h, weight, bias=None, dtype=None):
    if dtype is not None:
        h, weight = h.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return F.linear(h.reshape(-1, h.shape[-1]), weight, bias)


def naive_token_ce(h, weight, target, bias=None, ignore_index=-100, dtype=None):
    """Per-token CE [N] from materialised logits (computed in ``dtype`` or fp32 at least)."""
    logits = naive_logits(h, weight, bias, dtype)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits, target.reshape(-1).long(), ignore_index=ignore_index, reduction="none")


def naive_linear_ce(h, weight, target, bias=None, reduction="mean", ignore_index=-100, dtype=None):
    ce = naive_token_ce(h, weight, target, bias, ignore_index, dtype)
    valid = target.reshape(-1) != ignore_index
    if reduction == "none":
        return ce.reshape(target.shape)
    if reduction == "sum":
        return ce.sum()
    return ce.sum() / valid.sum().clamp(min=1)


def naive_irm(h, weight, target, env, num_envs, bias=None, ignore_index=-100, unbiased=False, dtype=None,
              halves=None):
    """(env_loss[E], s[E], penalty) with s_e = d CE_e(w · logits)/dw at w = 1 by create_graph autograd.

    ``halves`` (per-token 0/1) selects the two halves of the unbiased penalty.
    """
    logits = naive_logits(h, weight, bias, dtype)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    y = target.reshape(-1).long()
    e = env.reshape(-1).long()
    valid = y != ignore_index
    env_loss, scale_grad, penalty = [], [], logits.new_zeros(())

    def scale_derivative(mask):
        w = torch.ones((), dtype=logits.dtype, device=logits.device, requires_grad=True)
        n = mask.sum()
        if n == 0:
            return logits.new_zeros(()), logits.new_zeros(())
        loss = F.cross_entropy(logits[mask] * w, y[mask], reduction="sum") / n
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        return loss, g

    for k in range(num_envs):
        mask = valid & (e == k)
        loss, g = scale_derivative(mask)
        env_loss.append(loss)
        scale_grad.append(g)
        if unbiased:
            half = halves.reshape(-1)
            _, g_a = scale_derivative(mask & (half == 0))
            _, g_b = scale_derivative(mask & (half == 1))
            penalty = penalty + g_a * g_b
        else:
            penalty = penalty + g * g
    return torch.stack(env_loss), torch.stack(scale_grad), penalty


def halves_like_op(y, env, num_envs, batched):
    """The unbiased penalty's halves (0 = A, 1 = B) as the ops document them, re-derived independently for
    ``naive_irm``: [B, T] tokens alternate by sequence among those of the environment with a label, [N] tokens
    by their rank in the environment."""
    valid = y != -100
    half = torch.zeros_like(y)
    for k in range(num_envs):
        if batched:
            rows = [r for r in range(y.shape[0]) if bool((valid[r] & (env[r] == k)).any())]
            for rank, r in enumerate(rows):
                half[r][env[r] == k] = rank % 2
        else:
            idx = (valid & (env == k)).nonzero().squeeze(1)
            half[idx] = torch.arange(idx.numel(), device=y.device) % 2
    return half


def naive_sequence_nll(h, weight, target, seq, num_seqs, bias=None, ignore_index=-100, dtype=None):
    ce = naive_token_ce(h, weight, target, bias, ignore_index, dtype)
    s = seq.reshape(-1).long()
    valid = target.reshape(-1) != ignore_index
    nll = torch.stack([ce[valid & (s == k)].sum() for k in range(num_seqs)])
    count = torch.stack([(valid & (s == k)).sum() for k in range(num_seqs)])
    return nll, count
