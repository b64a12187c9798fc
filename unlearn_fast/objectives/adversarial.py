"""Continuous embedding-space attack on the prompt tokens (SPEC §1.5) and the attacked forget batch of C-AdvUL.

The attack looks for a perturbation δ of the prompt-token input embeddings that
lowers the cross-entropy of the labelled answer (for unlearning: it tries to
bring the forgotten answer back). Each of ``steps`` signed-gradient steps

    δ ← δ − step_size · sign(∇_δ CE(answer | E[ids] + δ))

is followed by a per-token L2 projection ‖δ_t‖ ≤ eps · mean_v ‖E_v‖ (E the
input-embedding matrix). Only the input gradient is taken: the parameters are
frozen for the duration (``requires_grad`` False), so neither the body nor the
fused head forms a weight gradient, and ``.grad`` is never touched.

Universal δ (the evaluation attack): one perturbation shared by every sequence,
indexed by the distance of a prompt token from the start of its answer (slot 0
is the last prompt token before the answer), so that it applies to prompts of
any length and padding.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from .lm import lm_parts, shift


def prompt_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                ignore_index: int = -100) -> torch.Tensor:
    """Positions the attack may perturb: no label (``ignore_index``) and attended."""
    mask = labels == ignore_index
    if attention_mask is not None:
        mask &= attention_mask.bool()
    return mask


def universal_slots(labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    ignore_index: int = -100) -> torch.Tensor:
    """[B, T] long: for a prompt token before its row's answer, its distance back from the answer start
    (0 = the token just before it); −1 elsewhere. A row without an answer counts back from its end."""
    mask = prompt_mask(labels, attention_mask, ignore_index=ignore_index)
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    answer = (labels != ignore_index) & (attention_mask.bool() if attention_mask is not None else True)
    length = attention_mask.sum(1) if attention_mask is not None else torch.full_like(labels[:, 0], labels.shape[1])
    big = torch.full_like(positions, labels.shape[1])
    start = torch.where(answer, positions, big).amin(1)
    start = torch.where(answer.any(1), start, length.to(start.dtype))
    slots = start.unsqueeze(1) - 1 - positions
    return torch.where(mask & (slots >= 0), slots, -1)


def place_universal(delta: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    ignore_index: int = -100) -> torch.Tensor:
    """A universal δ [P, H] laid onto a batch: [B, T, H], zero outside the prompts (and beyond slot P−1)."""
    if delta.dim() != 2:
        raise ValueError(f"delta must be a universal perturbation [P, H], got shape {tuple(delta.shape)}")
    slots = universal_slots(labels, attention_mask, ignore_index=ignore_index)
    slots = torch.where(slots < delta.shape[0], slots, -1)
    padded = torch.cat([delta, delta.new_zeros(1, delta.shape[1])])  # slot −1 reads the zero row
    return padded[slots]


def _check(model, input_ids, labels, attention_mask, eps, steps, step_size):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if not torch.is_tensor(labels) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(getattr(labels, 'shape', ()))}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(step_size, (int, float)) or isinstance(step_size, bool) or not step_size >= 0:
        raise ValueError(f"step_size must be a number >= 0, got {step_size!r}")


def input_embeddings(model: nn.Module) -> nn.Module:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embedding is None or getattr(embedding, "weight", None) is None:
        raise TypeError(f"{type(model).__name__} has no input embedding layer (get_input_embeddings())")
    return embedding


def embedding_radius(model: nn.Module, eps: float) -> float:
    """eps · mean_v ‖E_v‖₂ over the rows of the input-embedding matrix (fp32, fp64 for fp64; a block of rows
    at a time, so that no copy of the matrix is made)."""
    weight = input_embeddings(model).weight
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    total = 0.0
    with torch.no_grad():
        for start in range(0, weight.shape[0], 4096):
            total += float(torch.linalg.vector_norm(weight[start:start + 4096].to(compute), dim=1).sum())
    return eps * total / max(weight.shape[0], 1)


def _project_(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Per-token L2 projection onto the ball of ``radius`` (in place; the last dimension is the token's)."""
    norm = delta.norm(dim=-1, keepdim=True)
    return delta.mul_(torch.clamp(radius / norm.clamp(min=1e-30), max=1.0))


class _Frozen:
    """Parameters' requires_grad off for the block and restored exactly afterwards (.grad is never touched)."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
        return False


def _attack(model, input_ids, labels, attention_mask, eps, steps, step_size, universal, ignore_index):
    """δ [B, T, H] (or universal [P, H]) in fp32 (fp64 for fp64 models): the loop shared by both modes."""
    parts = lm_parts(model)
    embedding = input_embeddings(model)
    radius = embedding_radius(model, eps)
    hidden_size = embedding.weight.shape[1]
    device = embedding.weight.device
    # δ is kept in fp32 (fp64 for an fp64 model): signed steps of 1e-4 would round away in bf16
    compute = torch.float64 if embedding.weight.dtype == torch.float64 else torch.float32
    if universal:
        slots = universal_slots(labels, attention_mask, ignore_index=ignore_index)
        size = int(slots.max()) + 1 if slots.numel() else 0
        delta = torch.zeros(size, hidden_size, dtype=compute, device=device)
    else:
        mask = prompt_mask(labels, attention_mask, ignore_index=ignore_index).unsqueeze(-1)
        delta = torch.zeros(*input_ids.shape, hidden_size, dtype=compute, device=device)
    if steps == 0 or delta.numel() == 0:
        return delta
    with _Frozen(model), torch.enable_grad():
        clean = embedding(input_ids).detach()
        for _ in range(steps):
            delta.requires_grad_(True)
            placed = place_universal(delta, labels, attention_mask, ignore_index=ignore_index) if universal \
                else delta * mask
            out = parts.body(inputs_embeds=clean + placed.to(clean.dtype), attention_mask=attention_mask,
                             use_cache=False)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            h, y = shift(hidden, labels)
            loss = ops.linear_cross_entropy(h, parts.head_weight, y, linear_bias=parts.head_bias,
                                            ignore_index=ignore_index)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta.detach().sub_(step_size * grad.sign())
                if not universal:
                    delta.mul_(mask)
                _project_(delta, radius)
    return delta.detach()


def embedding_attack(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                     attention_mask: torch.Tensor | None = None, eps: float = 0.05, steps: int = 10,
                     step_size: float = 1e-4, universal: bool = False, ignore_index: int = -100) -> torch.Tensor:
    """δ [B, T, H] (the embedding dtype) on the prompt-token embeddings that lowers the CE of ``labels``.

    ``labels`` are aligned with ``input_ids`` as in Hugging Face (−100 = no loss); the prompt tokens are
    those without a label and with attention 1. ``universal=True``: one δ shared by the batch, aligned from
    the start of each answer backwards (see ``universal_perturbation`` for the [P, H] form itself).
    The model's parameters, their ``.grad`` and ``requires_grad`` are as before the call.
    """
    _check(model, input_ids, labels, attention_mask, eps, steps, step_size)
    dtype = input_embeddings(model).weight.dtype
    delta = _attack(model, input_ids, labels, attention_mask, eps, steps, step_size, universal, ignore_index)
    if universal:
        if delta.numel() == 0:
            return torch.zeros(*input_ids.shape, delta.shape[-1], dtype=dtype, device=delta.device)
        delta = place_universal(delta, labels, attention_mask, ignore_index=ignore_index)
    return delta.to(dtype)


def universal_perturbation(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                           attention_mask: torch.Tensor | None = None, eps: float = 0.05, steps: int = 10,
                           step_size: float = 1e-4, ignore_index: int = -100) -> torch.Tensor:
    """The universal δ [P, H] (embedding dtype; P = the batch's longest prompt before an answer) that
    ``embedding_attack(..., universal=True)`` lays onto its batch; ``place_universal`` lays it onto others."""
    _check(model, input_ids, labels, attention_mask, eps, steps, step_size)
    dtype = input_embeddings(model).weight.dtype
    return _attack(model, input_ids, labels, attention_mask, eps, steps, step_size, True, ignore_index).to(dtype)


def attacked_forget_batch(model: nn.Module, batch: dict, config) -> dict:
    """The forget batch with ``embedding_delta`` (C-AdvUL, SPEC §1.5): the attack pulls the model toward the
    forgotten answer; the forget loss is then taken at the attacked embeddings.

    A batch with a target answer (``target_input_ids``, ``target_labels``, optional ``target_attention_mask``:
    the same prompts followed by e.g. a refusal) also gets ``target_embedding_delta``: the same δ at the
    target rows' prompt tokens.
    """
    delta = embedding_attack(model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask"),
                             eps=config.adv_eps, steps=config.adv_steps, step_size=config.adv_step_size,
                             ignore_index=config.ignore_index)
    out = dict(batch, embedding_delta=delta)
    if batch.get("target_input_ids") is not None:
        out["target_embedding_delta"] = _move_to_target(batch, delta, config.ignore_index)
    return out


def _move_to_target(batch: dict, delta: torch.Tensor, ignore_index: int) -> torch.Tensor:
    ids, target_ids = batch["input_ids"], batch["target_input_ids"]
    if "target_labels" not in batch or target_ids.dim() != 2 or target_ids.shape[0] != ids.shape[0] \
            or tuple(batch["target_labels"].shape) != tuple(target_ids.shape):
        raise ValueError("forget_batch['target_input_ids'] needs 'target_labels' of its shape and one row per "
                         f"forget row ({ids.shape[0]}), got {tuple(target_ids.shape)}")
    source = prompt_mask(batch["labels"], batch.get("attention_mask"), ignore_index=ignore_index)
    dest = prompt_mask(batch["target_labels"], batch.get("target_attention_mask"), ignore_index=ignore_index)
    if not torch.equal(source.sum(1), dest.sum(1)) or not torch.equal(ids[source], target_ids[dest]):
        raise ValueError("forget_batch['target_input_ids'] must repeat each forget row's prompt tokens "
                         "(the target answer follows the same prompt)")
    moved = delta.new_zeros(*target_ids.shape, delta.shape[-1])
    moved[dest] = delta[source]
    return moved
