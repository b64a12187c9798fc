"""The IRMv1 penalty's gradient-in-forward driver, shared by the chunked paths (torch/CPU and "triton_chunked").

P = Σ_e s_e² (or Σ_e s_e^A s_e^B with ``half``). A group (an environment, or a half of one) with
n_k tokens has s_k = Σ m_t / n_k, whose gradient in the logits does not depend on s_k:
    ∂s_k/∂z_t = (p_t (1 + z_t − E_p[z_t]) − onehot(y_t)) / n_k
so one pass per group forms ∂s_k/∂(h, W, b) with its logits (3 matmuls, none recomputed), and the
chain rule P → s_k is applied once the environment's groups are done:
∂P/∂s_e = 2 s_e, or ∂P/∂s_e^A = s_e^B and ∂P/∂s_e^B = s_e^A.

What differs between the backends is only how one group's pass runs (the CPU row op or torch ops,
or cuBLAS chunks and the Triton row kernel): the caller passes it in as ``group_pass``.
"""
from __future__ import annotations

from typing import Callable

import torch

# group_pass(h_k [n_k, H], target_k [n_k], scale = 1/n_k, d_weight_out [V, H] | None)
#   -> ((lse, zy, ez) [n_k], (∂s_k/∂h_k [n_k, H], ∂s_k/∂W [V, H], ∂s_k/∂b [V] | None)), compute dtype;
# ∂s_k/∂W written into d_weight_out when one is given (overwritten, not added to).
GroupPass = Callable[..., tuple]


def irm_penalty_pass(group_pass: GroupPass, h, weight, bias, target, env, half, num_envs: int):
    """The IRMv1 penalty and its gradients, one ``group_pass`` per group; every row carries a label.

    ``env`` [N] is each row's environment and ``half`` [N] (0/1, or None for the biased penalty) its half.
    Holds one [V, H] buffer per group of the environment in flight besides the total (a folded group's
    buffer serves the next group).
    Returns (penalty, env_ce_mean [E], env_scale_grad [E], (d_input, d_weight, d_bias)) in the compute dtype.
    """
    n, hidden = h.shape
    device = h.device
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=compute, device=device)
    penalty = zero.clone()
    env_ce = torch.zeros(num_envs, dtype=compute, device=device)
    env_s = torch.zeros_like(env_ce)
    d_h = torch.zeros(n, hidden, dtype=compute, device=device)
    d_w = d_b = None
    spare: list[torch.Tensor] = []  # [V, H] group buffers already folded into d_w, reused by the next groups
    for e in range(num_envs):
        in_env = env == e
        groups = [in_env] if half is None else [in_env & (half == 0), in_env & (half == 1)]
        done = []  # (rows, s_k, gradients of s_k)
        for member in groups:
            rows = member.nonzero().squeeze(1)
            count = rows.numel()
            if count == 0:
                done.append((rows, zero, None))
                continue
            scale = 1.0 / count
            (lse, zy, ez), grads = group_pass(h[rows], target[rows], scale, spare.pop() if spare else None)
            env_ce[e] += (lse - zy).sum()
            env_s[e] += (ez - zy).sum()
            done.append((rows, (ez - zy).sum() * scale, grads))
        if half is None:
            slopes = [2 * done[0][1]]
            penalty += done[0][1] ** 2
        else:
            slopes = [done[1][1], done[0][1]]
            penalty += done[0][1] * done[1][1]
        for (rows, _, grads), slope in zip(done, slopes):
            if grads is None:
                continue
            g_h, g_w, g_b = grads
            d_h.index_copy_(0, rows, g_h.mul_(slope))
            if d_w is None:
                d_w = g_w.mul_(slope)
            else:  # one pass: d_w += slope · g_w, then g_w's storage serves the next group
                d_w.addcmul_(g_w, slope)
                spare.append(g_w)
            if g_b is not None:
                d_b = g_b.mul_(slope) if d_b is None else d_b.addcmul_(g_b, slope)
        count = max(sum(rows.numel() for rows, _, _ in done), 1)
        env_ce[e] /= count
        env_s[e] /= count
    if d_w is None:  # no labelled token at all
        d_w = torch.zeros(weight.shape, dtype=compute, device=device)
        d_b = torch.zeros(weight.shape[0], dtype=compute, device=device) if bias is not None else None
    return penalty, env_ce, env_s, (d_h, d_w, d_b)
