"""The parts of a Hugging Face causal LM that the objectives need.

The objectives never call the LM head: the model's forward stops at the final
hidden states and the fused ops apply the head (tied embeddings included).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class LMParts(NamedTuple):
    body: nn.Module  # maps input_ids/attention_mask to final hidden states
    head_weight: torch.Tensor  # [V, H]
    head_bias: torch.Tensor | None


def lm_parts(model: nn.Module) -> LMParts:
    """Body and linear head of any ``AutoModelForCausalLM`` whose output layer is linear (PEFT-wrapped too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"{type(base).__name__} has no linear output layer (get_output_embeddings() gave {head!r})")
    if getattr(getattr(base, "config", None), "final_logit_softcapping", None):
        raise NotImplementedError("models with final_logit_softcapping are not supported by the fused head")
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is None or body is base:
        raise TypeError(f"cannot find the body of {type(base).__name__} (base_model_prefix={prefix!r})")
    return LMParts(body, weight, getattr(head, "bias", None))


def final_hidden(parts: LMParts, batch: dict) -> torch.Tensor:
    """Final hidden states [B, T, H] of a batch dict (``input_ids``, optional ``attention_mask``).

    With ``embedding_delta`` [B, T, H] (an embedding-space attack, uf.adversarial) the body runs on the
    input embeddings plus δ; the embedding layer still gets its gradient.
    """
    delta = batch.get("embedding_delta")
    if delta is not None:
        embeds = parts.body.get_input_embeddings()(batch["input_ids"])
        out = parts.body(inputs_embeds=embeds + delta.to(embeds.dtype), attention_mask=batch.get("attention_mask"),
                         use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    out = parts.body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def shift(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at positions 0..T−2 predict labels at 1..T−1 (labels aligned with input_ids, as in HF)."""
    return hidden[:, :-1], labels[:, 1:]


def check_batch(name: str, batch, *, need_labels: bool = True) -> None:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(f"{name} must be a dict with input_ids (and attention_mask, labels), got {type(batch).__name__}")
    if need_labels and "labels" not in batch:
        raise ValueError(f"{name} needs 'labels' aligned with input_ids (-100 where there is no loss)")
    ids = batch["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"{name}['input_ids'] must be [B, T], got shape {tuple(ids.shape)}")
    for key in ("labels", "attention_mask"):
        if key in batch and batch[key] is not None and tuple(batch[key].shape) != tuple(ids.shape):
            raise ValueError(f"{name}['{key}'] must have input_ids' shape {tuple(ids.shape)}, got {tuple(batch[key].shape)}")


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def decoder_layers(module: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks of a causal LM or of its body (the one rule: RMU's layer index and
    FSDP's per-layer sharding both use it): the first ``nn.ModuleList`` named layers / h / blocks,
    under ``.decoder`` too."""
    try:
        body = lm_parts(module).body
    except TypeError:  # already a body (no output layer)
        body = module
    for name in ("layers", "h", "blocks"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    decoder = getattr(body, "decoder", None)
    if decoder is not None:
        return decoder_layers(decoder)
    raise TypeError(f"cannot find the decoder layers of {type(body).__name__} (no layers, h or blocks ModuleList)")
