"""Membership-inference attacks on forget vs holdout data: LOSS, zlib, min-k% and min-k%++, and their AUC.

Each attack gives an example a score from its labelled tokens' log-probabilities
(``token_scores``); a HIGHER score means "more likely NOT seen in training" (open-unlearning's
convention, ``src/evals/metrics/mia/``):

- LOSS (Yeom et al. 2018): the mean token NLL, −mean_t log p(y_t).
- zlib (Carlini et al. 2021): LOSS / (byte length of zlib.compress(text)), ``text`` the scored
  tokens decoded.
- min-k% Prob (Shi et al. 2024): −mean of the k·n lowest log p(y_t) (at least one), k = 0.4
  in open-unlearning's TOFU/MUSE configs.
- min-k%++ (Zhang et al. 2024): the same over the normalised scores
  (log p(y_t) − μ_t) / σ_t, μ_t and σ²_t the mean and variance of log p_t(v) for v ~ p_t
  (σ² clamped at 1e-6 as in open-unlearning), computed without [N, V] logits.

AUC = P(holdout score > forget score) + ½ P(tie): ``sklearn.metrics.roc_auc_score`` with
labels forget = 0, holdout = 1 (1 when the forget data is clearly more likely than the holdout).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .token_scores import TokenScores, token_scores

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
DEFAULT_K = 0.4


def _bottom_k_mean(values: torch.Tensor, k: float) -> float:
    count = max(1, int(values.numel() * k))
    return float(torch.sort(values.double()).values[:count].mean())


def loss_score(s: TokenScores) -> float:
    return float(-s.logp.double().mean())


def zlib_score(s: TokenScores, text: str) -> float:
    return loss_score(s) / len(zlib.compress(text.encode("utf-8")))


def min_k_score(s: TokenScores, k: float = DEFAULT_K) -> float:
    return -_bottom_k_mean(s.logp, k)


def min_k_plus_plus_score(s: TokenScores, k: float = DEFAULT_K) -> float:
    if s.mu is None or s.var is None:
        raise ValueError("min_k_plus_plus needs token scores computed with moments=True")
    normalised = (s.logp.double() - s.mu.double()) / s.var.double().clamp(min=1e-6).sqrt()
    return -_bottom_k_mean(normalised, k)


def attack_scores(scores: list[TokenScores], texts: list[str] | None, attack: str, k: float = DEFAULT_K) -> list[float]:
    """Per-example scores of one attack (examples without a scored token score 0, as in open-unlearning)."""
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k!r}")
    if attack == "zlib" and (texts is None or len(texts) != len(scores)):
        raise ValueError("the zlib attack needs one text per example")
    out = []
    for i, s in enumerate(scores):
        if s.logp.numel() == 0:
            out.append(0.0)
        elif attack == "loss":
            out.append(loss_score(s))
        elif attack == "zlib":
            out.append(zlib_score(s, texts[i]))
        elif attack == "min_k":
            out.append(min_k_score(s, k))
        else:
            out.append(min_k_plus_plus_score(s, k))
    return out


def mia_auc(forget_scores, holdout_scores) -> float:
    """AUC of telling holdout (label 1) from forget (label 0) by the score: P(holdout > forget) + ½ P(tie).

    The Mann-Whitney U statistic over the two samples with mid-ranks for ties (= ``roc_auc_score``).
    """
    f = np.asarray(forget_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError("mia_auc needs non-empty forget and holdout scores")
    values = np.concatenate([f, h])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size)
    sorted_values = values[order]
    start = 0
    while start < values.size:  # mid-ranks over runs of equal values
        stop = start
        while stop + 1 < values.size and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    u = ranks[f.size:].sum() - h.size * (h.size + 1) / 2
    return float(u / (f.size * h.size))


def decoded_targets(tokenizer, examples) -> list[str]:
    """The scored tokens of each example, decoded (the text zlib compresses, as open-unlearning does)."""
    texts = []
    for ex in examples:
        labels = torch.as_tensor(ex["labels"])
        texts.append(tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True))
    return texts


def mia_aucs(model, tokenizer, forget_examples, holdout_examples, *, attacks=ATTACKS, k: float = DEFAULT_K,
             batch_size: int = 16, pad_token_id: int = 0, progress=False) -> dict:
    """{"mia_<attack>": AUC} for each attack on forget vs holdout examples (``{"input_ids", "labels"}``)."""
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise ValueError(f"unknown attack(s) {bad}; choose from {ATTACKS}")
    moments = "min_k_plus_plus" in attacks
    kw = dict(batch_size=batch_size, pad_token_id=pad_token_id, moments=moments, progress=progress)
    forget = token_scores(model, forget_examples, desc="MIA forget", **kw)
    holdout = token_scores(model, holdout_examples, desc="MIA holdout", **kw)
    texts_f = decoded_targets(tokenizer, forget_examples) if "zlib" in attacks else None
    texts_h = decoded_targets(tokenizer, holdout_examples) if "zlib" in attacks else None
    return {f"mia_{a}": mia_auc(attack_scores(forget, texts_f, a, k), attack_scores(holdout, texts_h, a, k))
            for a in attacks}
