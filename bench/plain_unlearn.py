"""A plain, well-written unlearning loop in torch alone: the baseline that shows what the method itself saves.

``bench/reference_unlearn.py`` is the public code as written (a reference model in memory, clones,
restore by subtraction). A practitioner who writes the same objective carefully, with no kernels of
their own, does better; this is that loop, so that ``bench/e2e.py`` can separate the method's saving
from the reference code's waste:

- NPO: the reference NLL is cached once before training (``batch["ref_nll"]``, as unlearn_fast does;
  no reference model in memory); the per-sequence NLL comes from the model's logits with fp32
  ``F.cross_entropy(reduction="none")``.
- Retain: ``model(..., labels=...).loss``; forget and retain are back-propagated separately (each
  graph freed before the next forward), gradients accumulating in ``.grad``.
- SAM (forget loss only): the strong foreach bookkeeping — global norm with native-dtype
  ``torch._foreach_norm``, ``_foreach_copy_`` into a backup allocated once, ``_foreach_add_``,
  ``_foreach_copy_`` back (exact), the forget gradient at θ' kept by swapping ``.grad`` lists (no clone).
- ILU (IRMv1 logit reading): ∂CE/∂w of the environment's logits scaled by w = 1, by
  ``torch.autograd.grad(create_graph=True)`` (there is no other way in plain torch), on the eager
  attention path (fused attention kernels have no double backward).
The optimizer (``torch.optim.AdamW(fused=True)``) and clipping are the benchmark worker's, shared by all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from reference_unlearn import per_sequence_nll


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


class PlainUnlearner:
    """One step's gradient (into ``.grad``) for npo[+sam][+ilu], written well in plain torch."""

    def __init__(self, model, *, beta=0.1, forget_weight=1.0, retain_weight=1.0, sam_rho=0.0, irm_weight=0.0):
        self.model = model
        self.beta, self.c_f, self.c_r = beta, forget_weight, retain_weight
        self.rho, self.irm_weight = sam_rho, irm_weight
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.backup = [torch.empty_like(p) for p in self.params] if sam_rho > 0 else None  # allocated once

    def npo_loss(self, batch):
        nll = per_sequence_nll(_logits(self.model, batch).float(), batch["labels"])
        delta = nll - batch["ref_nll"].to(nll)
        return -(2.0 / self.beta) * F.logsigmoid(self.beta * delta).mean()

    def retain_loss(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], use_cache=False).loss

    def irm_penalty(self, batch):
        logits = _logits(self.model, batch)
        w = torch.ones((), device=logits.device, requires_grad=True)
        scaled = (logits[:, :-1] * w).float()
        ce = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                             ignore_index=-100)
        (g,) = torch.autograd.grad(ce, w, create_graph=True)
        return g * g

    def _forget_gradient_at_perturbed(self):
        """The forget loss at θ (returned) and its gradient at θ + ρ g/‖g‖ left in ``.grad``; θ restored exactly."""
        forget_l = self.c_f * self.npo_loss(self._forget)
        forget_l.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)
            torch._foreach_copy_(self.backup, self.params)
            torch._foreach_add_(self.params, grads, alpha=float(self.rho / norm.clamp_min(1e-12)))
        for p in self.params:
            p.grad = None
        (self.c_f * self.npo_loss(self._forget)).backward()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.backup)
        return forget_l

    def gradients(self, forget, retain, env_batches=()) -> float:
        """Accumulate the step's gradient into ``.grad``; return the objective at θ (float)."""
        if self.rho > 0:
            self._forget = forget
            forget_l = self._forget_gradient_at_perturbed()
        else:
            forget_l = self.c_f * self.npo_loss(forget)
            forget_l.backward()
        total = float(forget_l.detach())
        retain_l = self.c_r * self.retain_loss(retain)
        retain_l.backward()
        total += float(retain_l.detach())
        if self.irm_weight > 0:
            for batch in env_batches:
                penalty = self.irm_weight * self.irm_penalty(batch)
                penalty.backward()
                total += float(penalty.detach())
        return total
