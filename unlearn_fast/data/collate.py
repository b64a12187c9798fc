"""``collate``: tokenized examples into one right-padded batch (the one batching rule of the package)."""
from __future__ import annotations

import torch


def collate(examples, pad_token_id: int = 0, device=None) -> dict:
    """Right-pad 1-D ``input_ids``/``labels`` examples into a batch dict."""
    length = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.as_tensor(ex["input_ids"])
        labels[i, :n] = torch.as_tensor(ex["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
