"""Naive references of the benchmark metrics: full [B, T, V] logits from the model's own forward,
one example at a time, and the public packages (sklearn, rouge_score) where a metric is theirs."""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def naive_token_stats(model, example):
    """(log p(y_t), E_p[log p], Var_p[log p]) of an example's labelled tokens, from materialised logits (fp64)."""
    ids = torch.as_tensor(example["input_ids"]).unsqueeze(0)
    labels = torch.as_tensor(example["labels"])[1:]
    logits = model(input_ids=ids).logits[0, :-1].double()
    logp_all = torch.log_softmax(logits, -1)
    keep = labels != -100
    logp_all, labels = logp_all[keep], labels[keep]
    p = logp_all.exp()
    mu = (p * logp_all).sum(-1)
    var = (p * logp_all.square()).sum(-1) - mu.square()
    return logp_all.gather(1, labels.unsqueeze(1)).squeeze(1), mu, var


def naive_avg_loss(model, example) -> float:
    return float(-naive_token_stats(model, example)[0].mean())


def naive_mia_scores(model, tokenizer, examples, k=0.4) -> dict:
    """Per-example LOSS, zlib, min-k and min-k++ scores as open-unlearning's attacks write them."""
    out = {"loss": [], "zlib": [], "min_k": [], "min_k_plus_plus": []}
    for ex in examples:
        lp, mu, var = naive_token_stats(model, ex)
        labels = torch.as_tensor(ex["labels"])
        text = tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=True)
        loss = float(-lp.mean())
        out["loss"].append(loss)
        out["zlib"].append(loss / len(zlib.compress(text.encode("utf-8"))))
        num_k = max(1, int(len(lp) * k))
        out["min_k"].append(-float(np.mean(np.sort(lp.numpy())[:num_k])))
        scores = ((lp - mu) / var.clamp(min=1e-6).sqrt()).numpy()
        out["min_k_plus_plus"].append(-float(np.mean(sorted(scores)[:num_k])))
    return out


def sklearn_auc(forget_scores, holdout_scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0] * len(forget_scores) + [1] * len(holdout_scores),
                               list(forget_scores) + list(holdout_scores)))


@torch.no_grad()
def naive_greedy(model, prompt_ids, max_new_tokens, eos_token_id):
    """Greedy decoding with the full logits of the whole sequence at every step (no cache, no padding)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos_token_id:
            break
        ids.append(nxt)
    return ids[len(prompt_ids):]


class KnownLM(nn.Module):
    """A bigram LM with given next-token probabilities P[a, b] = P(b | a), in the shape the fused ops read:
    a body giving one-hot hidden states and a linear head whose weight holds log P (so softmax(z) = P exactly)."""

    base_model_prefix = "body"

    def __init__(self, probs):
        super().__init__()
        probs = torch.as_tensor(probs, dtype=torch.float64)
        vocab = probs.shape[0]

        class Body(nn.Module):
            def forward(self, input_ids, attention_mask=None, use_cache=False):
                return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot(input_ids, vocab).float())

        self.body = Body()
        self.head = nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(probs.log().T.float())

    def get_output_embeddings(self):
        return self.head
