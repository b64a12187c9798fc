"""Per-token log-probabilities of labelled tokens, and their distribution's moments, without [N, V] logits.

Every benchmark metric here is a function of, for each labelled token t of an example,
    log p_t(y_t)                                   (the fused op: −linear_cross_entropy(reduction="none"))
and, for min-k%++ only, the mean and variance of log p_t(v) when v ~ p_t (then log p_t(y_t) comes
from the same chunked pass, one matmul in all):
    μ_t  = E_{v~p_t}[log p_t(v)] = E_p[z] − lse,   σ²_t = Var_{v~p_t}[log p_t(v)] = Var_p[z]
(log p_t(v) = z_v − lse_t differs from the logit by a constant, so its variance is the logits'
variance under p). ``_moments`` gets them from token chunks of C rows: the logits of a chunk
are a [C, V] block (C = MOMENT_WORKSPACE // V), reduced to lse, E_p[z] and Σ_v p_v (z_v − E_p[z])²
(the centred form: E_p[z²] − E_p[z]² would cancel in fp32) before the next chunk, so the peak
extra memory is O(C·V + N) whatever the number of tokens N.

The model's body runs once per batch (examples sorted by length, so that little padding is
computed); the LM head is applied only to the labelled rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from tqdm import tqdm

from .. import ops
from ..objectives.lm import final_hidden, lm_parts, shift
from ..data.collate import collate

MOMENT_WORKSPACE = 1 << 22  # elements of the [C, V] fp32 block of ``_moments`` (16 MiB)


class TokenScores(NamedTuple):
    logp: torch.Tensor  # [n] fp32 log p(y_t) of the example's labelled tokens, in order
    mu: torch.Tensor | None  # [n] E_p[log p] (with moments=True)
    var: torch.Tensor | None  # [n] Var_p[log p]


def _moments(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             target: torch.Tensor | None = None):
    """(μ, σ²) [N] fp32 of log p under p for hidden rows ``h`` [N, H], chunk by chunk (see the module doc);
    with ``target`` [N] also log p(target) from the same logits: (logp, μ, σ²), one matmul in all."""
    n, vocab = h.shape[0], weight.shape[0]
    chunk = max(1, MOMENT_WORKSPACE // vocab)
    w = weight.float()
    b = bias.float() if bias is not None else None
    mu = torch.empty(n, dtype=torch.float32, device=h.device)
    var = torch.empty_like(mu)
    logp = torch.empty_like(mu) if target is not None else None
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        z = h[rows].float() @ w.T
        if b is not None:
            z += b
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        if logp is not None:
            logp[rows] = (z.gather(1, target[rows, None]) - lse).squeeze(1)
        p = (z - lse).exp_()
        mean_z = (p * z).sum(1, keepdim=True)
        z -= mean_z
        var[rows] = (p * z.square_()).sum(1)
        mu[rows] = (mean_z - lse).squeeze(1)
    return (mu, var) if logp is None else (logp, mu, var)


def _progress(progress, total: int, desc: str):
    if callable(progress):
        return progress
    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def token_scores(model, examples, *, batch_size: int = 16, pad_token_id: int = 0, moments: bool = False,
                 progress=False, desc: str = "scoring") -> list[TokenScores]:
    """TokenScores of each example ``{"input_ids", "labels"}`` (labels aligned with input_ids, −100 unscored).

    ``progress``: True for a tqdm bar over the examples (or a tqdm-like object with ``update``).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    examples = list(examples)
    parts = lm_parts(model)
    device = parts.head_weight.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[TokenScores | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    bar = _progress(progress, len(examples), desc)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([examples[i] for i in idx], pad_token_id, device)
            hidden, labels = shift(final_hidden(parts, batch), batch["labels"])
            scored = labels != -100
            rows, targets = hidden[scored], labels[scored]  # [n, H]: the labelled rows only, in row-major order
            mu = var = None
            if moments:  # one pass gives all three (the fused op would add a second matmul)
                logp, mu, var = _moments(rows, parts.head_weight, parts.head_bias, targets)
            else:
                logp = -ops.linear_cross_entropy(rows, parts.head_weight, targets, linear_bias=parts.head_bias,
                                                 reduction="none").float()
            counts = scored.sum(1).tolist()
            offset = 0
            for i, count in zip(idx, counts):
                piece = slice(offset, offset + count)
                out[i] = TokenScores(logp[piece].cpu(), None if mu is None else mu[piece].cpu(),
                                     None if var is None else var[piece].cpu())
                offset += count
            if hasattr(bar, "update"):
                bar.update(len(idx))
    finally:
        if hasattr(bar, "close"):
            bar.close()
        model.train(was_training)
    return out


def average_losses(scores: list[TokenScores]) -> list[float]:
    """Mean token NLL of each example (open-unlearning's ``avg_loss``); NaN for an example without labels."""
    return [float(-s.logp.mean()) if s.logp.numel() else float("nan") for s in scores]


def summed_logprobs(scores: list[TokenScores]) -> list[float]:
    """Σ_t log p(y_t) of each example (a continuation's log-likelihood, as lm-evaluation-harness sums it)."""
    return [float(s.logp.double().sum()) for s in scores]
