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
# A group pass that can also add a factor times its gradient into the totals takes, for groups of at most
# ``direct_rows`` = (rows before the totals exist, rows after) rows,
# group_pass(h_k, target_k, scale, grad_scale=f, into=(d_h_k, d_w, d_b, add)) with
# f(lse, zy, ez) -> the factor (a scalar tensor) from the group's own statistics (one chunk).
GroupPass = Callable[..., tuple]


def _rows_or_slice(rows: torch.Tensor):
    """The group's rows as a slice when they are consecutive (the usual layout: environments are stacked
    batches): views instead of gathered copies, and d input written in place."""
    if rows.numel() and int(rows[-1]) - int(rows[0]) + 1 == rows.numel():
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


def _put_rows(d_h: torch.Tensor, rows, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        if values.data_ptr() != d_h[rows].data_ptr():
            d_h[rows] = values
    else:
        d_h.index_copy_(0, rows, values)


def irm_penalty_pass(group_pass: GroupPass, h, weight, bias, target, env, half, num_envs: int, *,
                     direct_rows: tuple[int, int] = (0, 0)):
    """The IRMv1 penalty and its gradients, one ``group_pass`` per group; every row carries a label.

    ``env`` [N] is each row's environment and ``half`` [N] (0/1, or None for the biased penalty) its half.
    A group whose chain-rule factor is known when its own pass ends (2 s_k; with halves, the second
    half's s of the first) and whose rows fit ``direct_rows`` (its first figure while no group has written
    the totals yet, its second after) goes straight into the totals: its pass
    scales the small operands by the factor (no [V, H] group buffer, no fold). Any other group gets
    its own [V, H] buffer, folded into the total once the environment's factors are known (a folded
    buffer serves the next such group).
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
        done = []  # (rows, s_k, buffered gradients of s_k or None)
        for i, member in enumerate(groups):
            rows = member.nonzero().squeeze(1)
            count = rows.numel()
            if count == 0:
                done.append((rows, zero, None))
                continue
            scale = 1.0 / count
            rows = _rows_or_slice(rows)
            h_k, y_k = h[rows], target[rows]
            other = done[0][1] if i == 1 else None  # with halves, the second's factor is the first's s
            if count <= direct_rows[d_w is not None] and (half is None or other is not None):
                def factor(lse, zy, ez, scale=scale, other=other):
                    return 2 * ((ez - zy).sum() * scale) if other is None else other

                add = d_w is not None
                if not add:  # written by this group's matmul
                    d_w = torch.empty(weight.shape, dtype=compute, device=device)
                    d_b = torch.empty(weight.shape[0], dtype=compute, device=device) if bias is not None else None
                d_h_k = d_h[rows] if isinstance(rows, slice) else torch.empty(count, hidden, dtype=compute,
                                                                              device=device)
                (lse, zy, ez), _ = group_pass(h_k, y_k, scale, grad_scale=factor, into=(d_h_k, d_w, d_b, add))
                _put_rows(d_h, rows, d_h_k)
                grads = None
            else:
                (lse, zy, ez), grads = group_pass(h_k, y_k, scale, spare.pop() if spare else None)
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
            if grads is None:  # empty, or already in the totals
                continue
            g_h, g_w, g_b = grads
            _put_rows(d_h, rows, g_h.mul_(slope))
            if d_w is None:
                d_w = g_w.mul_(slope)
            else:  # one pass: d_w += slope · g_w, then g_w's storage serves the next group
                d_w.addcmul_(g_w, slope)
                spare.append(g_w)
            if g_b is not None:
                d_b = g_b.mul_(slope) if d_b is None else d_b.addcmul_(g_b, slope)
        count = max(sum(_count(rows) for rows, _, _ in done), 1)
        env_ce[e] /= count
        env_s[e] /= count
    if d_w is None:  # no labelled token at all
        d_w = torch.zeros(weight.shape, dtype=compute, device=device)
        d_b = torch.zeros(weight.shape[0], dtype=compute, device=device) if bias is not None else None
    return penalty, env_ce, env_s, (d_h, d_w, d_b)


def _count(rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
