"""The plain fine-tuning objective: next-token cross-entropy on the label tokens.

What teaching the default model, the relearning attack and the downstream fine-tuning attack train
with (through the Trainer, ``TrainConfig.task = "finetune"``); the model's own loss, so any causal LM works.
"""
from __future__ import annotations

from torch import nn


def finetune_gradients(model: nn.Module, batch: dict) -> dict:
    """Backpropagate the mean answer-token cross-entropy of ``batch`` into ``.grad``; {"loss": value}."""
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    return {"loss": float(loss.detach())}
