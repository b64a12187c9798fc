"""Forget, retain and ILU-logit losses from final hidden states, through the fused ops (SPEC §1.1, §1.2a).

Each function returns (scalar loss tensor, metrics dict of floats).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from .config import UnlearnConfig
from .lm import LMParts, final_hidden, shift


def _item(t: torch.Tensor) -> float:
    return float(t.detach())


def forget_loss(parts: LMParts, batch: dict, config: UnlearnConfig) -> tuple[torch.Tensor, dict]:
    """ℓ_f of SPEC §1.1 for ga / graddiff / npo / simnpo."""
    hidden, labels = shift(final_hidden(parts, batch), batch["labels"])
    kw = dict(linear_bias=parts.head_bias, ignore_index=config.ignore_index)
    if config.method in ("ga", "graddiff"):
        ce = ops.linear_cross_entropy(hidden, parts.head_weight, labels, **kw)
        return -ce, {"forget_ce": _item(ce)}
    beta = config.beta
    count = (labels != config.ignore_index).sum(-1)
    has_tokens = count > 0
    per_sequence_mean = has_tokens.float() / has_tokens.sum().clamp(min=1)  # masked mean over sequences
    if config.method == "simnpo":
        def phi(nll, ids):
            margin = nll / count[ids].clamp(min=1) - config.simnpo_delta
            return -(2.0 / beta) * F.logsigmoid(beta * margin) * per_sequence_mean[ids].to(nll.dtype)

        loss, nll, count = ops.sequence_loss(hidden, parts.head_weight, labels, phi, **kw)
        return loss, {"forget_nll": _item(nll.sum() / count.sum().clamp(min=1))}
    ref = batch.get("ref_nll")
    if ref is None:
        raise ValueError("forget_batch needs 'ref_nll' (per-sequence reference NLL) for method='npo': "
                         "compute it once with uf.reference_nll(model, forget_examples)")
    ref = torch.as_tensor(ref, device=hidden.device)
    if ref.shape != count.shape:
        raise ValueError(f"forget_batch['ref_nll'] must have shape {tuple(count.shape)} (one per sequence), got {tuple(ref.shape)}")
    if config.npo_form == "batch_mean" or config.compat == "reference":
        nll, count = ops.sequence_nll(hidden, parts.head_weight, labels, **kw)
        ref = ref.to(nll.dtype)
        tokens = count.sum().clamp(min=1)
        delta = (nll.sum() - ref.sum()) / tokens
        loss = -(2.0 / beta) * F.logsigmoid(beta * delta)
    else:
        # Separable over sequences: the fused op forms the gradient in its forward pass.
        def phi(nll, ids):
            delta = nll - ref[ids].to(nll.dtype)
            return -(2.0 / beta) * F.logsigmoid(beta * delta) * per_sequence_mean[ids].to(nll.dtype)

        loss, nll, count = ops.sequence_loss(hidden, parts.head_weight, labels, phi, **kw)
        ref = ref.to(nll.dtype)
    return loss, {"forget_nll": _item(nll.sum() / count.sum().clamp(min=1)),
                  "npo_delta": _item((nll - ref).sum() / count.sum().clamp(min=1))}


def adversarial_forget_loss(parts: LMParts, batch: dict, config: UnlearnConfig) -> tuple[torch.Tensor, dict]:
    """The forget term of C-AdvUL (SPEC §1.5) on a batch from ``uf.adversarial.attacked_forget_batch``.

    Without a target answer: the method's ℓ_f at the attacked embeddings. With one (``target_input_ids``):
    w_away · away + w_toward · max(CE(target answer), toward cutoff), where away is ℓ_f (GA's −CE floored
    at the away cutoff; NPO/SimNPO are bounded by their own form), both at the attacked embeddings.
    """
    away, terms = forget_loss(parts, batch, config)
    if batch.get("target_input_ids") is None:
        return away, terms
    toward_cutoff, away_cutoff = config.adv_cutoffs
    if config.method in ("ga", "graddiff"):
        away = torch.clamp(away, min=away_cutoff)
    target = {"input_ids": batch["target_input_ids"], "attention_mask": batch.get("target_attention_mask"),
              "embedding_delta": batch.get("target_embedding_delta")}
    hidden, labels = shift(final_hidden(parts, target), batch["target_labels"])
    toward_ce = ops.linear_cross_entropy(hidden, parts.head_weight, labels, linear_bias=parts.head_bias,
                                         ignore_index=config.ignore_index)
    loss = config.adv_away_weight * away + config.adv_toward_weight * torch.clamp(toward_ce, min=toward_cutoff)
    return loss, {**terms, "away_loss": _item(away), "toward_ce": _item(toward_ce)}


def retain_loss(parts: LMParts, batch: dict, config: UnlearnConfig, reference=None) -> tuple[torch.Tensor, dict]:
    """ℓ_r: token-mean CE, or token-mean KL(p_θ0 ‖ p_θ) with ``reference`` giving θ0's hidden states and head."""
    hidden, labels = shift(final_hidden(parts, batch), batch["labels"])
    if config.retain_loss == "ce":
        ce = ops.linear_cross_entropy(hidden, parts.head_weight, labels, linear_bias=parts.head_bias,
                                      ignore_index=config.ignore_index)
        return ce, {"retain_ce": _item(ce)}
    if reference is None:
        raise ValueError("retain_loss='kl' needs the start model: pass ref_model=..., or use a PEFT model "
                         "(its adapters are disabled to get θ0)")
    with torch.no_grad():
        ref_parts, ref_hidden = reference(batch)
    ref_hidden, _ = shift(ref_hidden, batch["labels"])
    keep = (labels != config.ignore_index).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    h0 = ref_hidden.reshape(-1, ref_hidden.shape[-1])[keep]
    kl = chunked_kl(h, parts.head_weight, parts.head_bias, h0, ref_parts.head_weight, ref_parts.head_bias)
    kl = kl / keep.sum().clamp(min=1)
    return kl, {"retain_kl": _item(kl)}


def chunked_kl(h, w, b, h0, w0, b0, chunk: int = 1024) -> torch.Tensor:
    """Σ_t KL(softmax(W0 h0_t + b0) ‖ softmax(W h_t + b)), one [chunk, V] block at a time (recomputed in backward)."""

    def block(hc, h0c):
        logp = F.log_softmax(F.linear(hc, w, b).float(), dim=-1)
        logq = F.log_softmax(F.linear(h0c, w0, b0).float(), dim=-1)
        return F.kl_div(logp, logq, log_target=True, reduction="sum")

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        rows = slice(start, start + chunk)
        total = total + checkpoint(block, h[rows], h0[rows], use_reentrant=False)
    return total


def irm_logit_penalty(parts: LMParts, env_batches, config: UnlearnConfig) -> tuple[torch.Tensor, dict]:
    """Σ_e s_e² (or Σ_e s_e^A s_e^B) over the environment batches, one fused pass (SPEC §1.2a).

    Environments are padded to a common length and stacked as sequences, so the
    unbiased halves alternate over each environment's sequences.
    """
    hidden, labels, env = [], [], []
    for e, batch in enumerate(env_batches):
        h, y = shift(final_hidden(parts, batch), batch["labels"])
        hidden.append(h)
        labels.append(y)
        env.append(torch.full_like(y, e))
    steps = max(h.shape[1] for h in hidden)
    hidden = torch.cat([F.pad(h, (0, 0, 0, steps - h.shape[1])) for h in hidden])
    labels = torch.cat([F.pad(y, (0, steps - y.shape[1]), value=config.ignore_index) for y in labels])
    env = torch.cat([F.pad(e, (0, steps - e.shape[1])) for e in env])
    out = ops.irm_penalty(hidden, parts.head_weight, labels, env, num_envs=len(env_batches),
                          linear_bias=parts.head_bias, ignore_index=config.ignore_index,
                          unbiased=config.irm == "logit_unbiased")
    return out.penalty, {"irm_penalty": _item(out.penalty), "env_loss": _item(out.env_loss.mean())}


def env_ce(parts: LMParts, batch: dict, config: UnlearnConfig) -> torch.Tensor:
    """Plain CE of one environment batch (the ℓ_e of the parameter-space IRM readings)."""
    hidden, labels = shift(final_hidden(parts, batch), batch["labels"])
    return ops.linear_cross_entropy(hidden, parts.head_weight, labels, linear_bias=parts.head_bias,
                                    ignore_index=config.ignore_index)
