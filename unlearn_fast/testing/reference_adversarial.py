"""Naive embedding-space attack (SPEC §1.5): plain autograd on ``inputs_embeds`` through the HF model's own
materialised-logits loss, Python loops for the prompt positions and the per-token projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_ce(model, embeds, attention_mask, labels):
    """Token-mean CE of the labelled answer (materialised logits, next-token shift)."""
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def radius(model, eps):
    rows = model.get_input_embeddings().weight.detach().double()
    return eps * sum(float(torch.sqrt((r * r).sum())) for r in rows) / rows.shape[0]


def project_token_by_token(delta, bound):
    out = delta.clone()
    for index in torch.cartesian_prod(*[torch.arange(s) for s in delta.shape[:-1]]).reshape(-1, delta.dim() - 1):
        row = out[tuple(index.tolist())]
        norm = float(torch.sqrt((row.double() ** 2).sum()))
        if norm > bound:
            row.mul_(bound / norm)
    return out


def prompt_positions(labels, attention_mask):
    """[(row, position)] of the tokens without a label that are attended."""
    return [(i, t) for i in range(labels.shape[0]) for t in range(labels.shape[1])
            if labels[i, t] == -100 and (attention_mask is None or attention_mask[i, t] == 1)]


def naive_attack(model, input_ids, labels, attention_mask, *, eps, steps, step_size):
    """Per-sequence δ [B, T, H]."""
    for p in model.parameters():
        p.requires_grad_(False)
    clean = model.get_input_embeddings()(input_ids).detach()
    mask = torch.zeros(*input_ids.shape, 1, dtype=clean.dtype)
    for i, t in prompt_positions(labels, attention_mask):
        mask[i, t] = 1
    delta = torch.zeros_like(clean)
    bound = radius(model, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = answer_ce(model, clean + delta * mask, attention_mask, labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() - step_size * grad.sign()) * mask
        delta = project_token_by_token(delta, bound)
    return delta.detach()


def answer_start(labels_row, mask_row):
    for t in range(len(labels_row)):
        if labels_row[t] != -100 and (mask_row is None or mask_row[t] == 1):
            return t
    return int(mask_row.sum()) if mask_row is not None else len(labels_row)


def naive_place(delta_u, labels, attention_mask):
    """A universal δ [P, H] laid onto the batch: row i's prompt token t gets δ_u[start_i − 1 − t]."""
    zero = torch.zeros(delta_u.shape[1], dtype=delta_u.dtype)
    rows = []
    for i in range(labels.shape[0]):
        start = answer_start(labels[i], attention_mask[i] if attention_mask is not None else None)
        row = []
        for t in range(labels.shape[1]):
            prompt = labels[i, t] == -100 and (attention_mask is None or attention_mask[i, t] == 1)
            row.append(delta_u[start - 1 - t] if prompt and t < start and start - 1 - t < delta_u.shape[0] else zero)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_universal(model, input_ids, labels, attention_mask, *, eps, steps, step_size):
    """Universal δ [P, H], P = the longest prompt before an answer."""
    for p in model.parameters():
        p.requires_grad_(False)
    clean = model.get_input_embeddings()(input_ids).detach()
    size = max(answer_start(labels[i], attention_mask[i] if attention_mask is not None else None)
               for i in range(labels.shape[0]))
    delta = torch.zeros(size, clean.shape[-1], dtype=clean.dtype)
    bound = radius(model, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = answer_ce(model, clean + naive_place(delta, labels, attention_mask), attention_mask, labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = project_token_by_token(delta.detach() - step_size * grad.sign(), bound)
    return delta.detach()
