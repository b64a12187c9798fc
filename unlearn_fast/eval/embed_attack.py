"""The embedding-space attack as an evaluation (SPEC §1.5): a universal δ fitted on the attacker's forget split.

The attacker sees the same forget samples as the relearning attack
(``relearn_split``); it fits one universal prompt perturbation that pulls the
model toward their answers, and is scored on the other forget questions with
that δ applied (``embed_forget_acc``: knowledge that comes back without the
weights changing). The model is never modified.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..objectives.adversarial import embedding_radius, input_embeddings, place_universal, universal_perturbation
from ..data.collate import collate
from .attacks import relearn_split


@dataclass
class EmbedAttackSpec:
    """An evaluation attacker is stronger than the training one (a larger ball, more steps).

    ``eps``: radius relative to the mean embedding-row norm. ``step_fraction``: one signed step moves a
    token's δ by this fraction of the radius (step size = fraction · radius / √H), so the attack is the same
    whatever the scale of the embeddings.
    """
    samples: int = 20  # the relearning protocol's number of shown forget samples
    eps: float = 0.5
    steps: int = 100
    step_fraction: float = 0.1

    def __post_init__(self):
        for name in ("eps", "step_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EmbedAttackSpec.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"EmbedAttackSpec.steps must be an int >= 1, got {self.steps!r}")


@torch.no_grad()
def attacked_answer_scores(model: nn.Module, examples, delta: torch.Tensor | None, *, batch_size: int = 32,
                           pad_token_id: int = 0) -> list[bool]:
    """Greedy exact match of each example's answer (as ``metrics.answer_scores``) with the universal δ [P, H]
    added to the prompt embeddings (None: no perturbation)."""
    was_training = model.training
    model.eval()
    embedding = input_embeddings(model)
    device = embedding.weight.device
    correct = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id, device)
            embeds = embedding(batch["input_ids"])
            if delta is not None:
                embeds = embeds + place_universal(delta, batch["labels"], batch["attention_mask"]).to(embeds.dtype)
            out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
            logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
            labels = batch["labels"][:, 1:]
            hit = (logits.argmax(-1) == labels.clamp(min=0)) | (labels == -100)
            correct += hit.all(dim=1).tolist()
    finally:
        model.train(was_training)
    return correct


def embed_attack(model: nn.Module, forget_train, forget_probe, spec: EmbedAttackSpec, *, seed: int = 0,
                 pad_token_id: int = 0) -> dict:
    """Fit a universal δ on the attacker's forget samples; forget accuracy on the held-out ones with δ.

    ``forget_train`` / ``forget_probe``: the same forget records encoded for training (with eos) and for
    scoring, as for ``relearn_attack``; the split is ``relearn_split(len, spec.samples, seed)``.
    Returns {"forget_acc": with δ, "forget_acc_before": without, "gain", "delta_norm": the largest
    per-token ‖δ_t‖, "radius", "samples", "scored"}.
    """
    shown, scored = relearn_split(len(forget_train), spec.samples, seed)
    device = input_embeddings(model).weight.device
    batch = collate([forget_train[i] for i in shown], pad_token_id, device)
    radius = embedding_radius(model, spec.eps)
    step_size = spec.step_fraction * radius / input_embeddings(model).weight.shape[1] ** 0.5
    was_training = model.training
    model.eval()  # the attacker queries the deployed model (no dropout)
    try:
        delta = universal_perturbation(model, batch["input_ids"], batch["labels"],
                                       attention_mask=batch["attention_mask"], eps=spec.eps, steps=spec.steps,
                                       step_size=step_size)
    finally:
        model.train(was_training)
    probe = [forget_probe[i] for i in scored]
    before = attacked_answer_scores(model, probe, None, pad_token_id=pad_token_id)
    after = attacked_answer_scores(model, probe, delta, pad_token_id=pad_token_id)
    acc_before, acc = sum(before) / len(before), sum(after) / len(after)
    return {"forget_acc": acc, "forget_acc_before": acc_before, "gain": acc - acc_before,
            "delta_norm": float(delta.float().norm(dim=-1).max()) if delta.numel() else 0.0,
            "radius": radius, "step_size": step_size, "samples": len(shown), "scored": len(probe)}
