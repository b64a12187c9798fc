"""Tiny Llama models and batches for the tests and benches (random weights scaled up so gradients are not tiny)."""
from __future__ import annotations

import torch


def tiny_llama(*, tie=False, layers=4, seed=0, vocab=97, hidden=32, dtype=torch.float32):
    from ..data.models import build_llama

    torch.manual_seed(seed)
    model = build_llama(vocab, hidden_size=hidden, num_hidden_layers=layers, max_position_embeddings=64,
                        tie_word_embeddings=tie, attn_implementation="eager", seed=None,
                        pad_token_id=None).to(dtype)
    with torch.no_grad():  # larger weights than the default init so that gradients are not tiny
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def make_batch(seed, batch=3, length=11, vocab=97, prompt=3, pad_last=2):
    """HF-style batch: labels = input_ids on answer tokens, -100 on the prompt and right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - pad_last:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
