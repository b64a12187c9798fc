"""The reference approach to robust unlearning, re-implemented the way the public code computes it (SPEC.md §3).

This is what ``bench/e2e.py`` compares unlearn_fast against. It is written the
way the public NPO / Unlearn-Smooth / ILU / WMDP-RMU training code is written,
costs included, and computes the same objective as ``uf.unlearning_gradients``
(the first-step losses agree, which ``bench/e2e.py`` records):

- NPO: the reference model (a frozen deep copy of the start model) runs a
  forward on the forget batch every time the forget loss is evaluated; the
  per-sequence NLL comes from full logits (``model(...).logits``, in the model's
  dtype, as the public code leaves them) and ``F.cross_entropy(reduction="none")``.
- Retain: ``model(..., labels=...).loss`` (Hugging Face's loss: full logits, fp32 CE).
- The forget, retain and penalty terms are summed into one loss and
  back-propagated once (a Trainer's ``compute_loss``), so their graphs are
  alive together.
- ILU (IRMv1 logit reading): a dummy scale w = 1 on the environment's logits,
  g = ∂CE/∂w by ``torch.autograd.grad(create_graph=True)``, penalty g²; the model
  runs with ``attn_implementation="eager"`` (the math attention path; fused
  attention kernels have no double backward).
- SAM (forget loss only): first pass, global norm by a Python loop over the
  parameters, e_w = ρ g/‖g‖ stored as a param-sized clone per tensor,
  θ += e_w, second pass, restore by subtraction θ −= e_w in the parameter dtype
  (not bit-exact in bf16), then the retain (+ penalty) pass at θ.
- RMU: a frozen deep copy of the start model; layer L's output is captured by a
  forward hook during a FULL model forward (head and logits included).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def per_sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per sequence from full logits [B, T, V] (labels aligned with inputs, -100 ignored)."""
    shifted_logits = logits[:, :-1].contiguous()
    shifted_labels = labels[:, 1:].contiguous()
    ce = F.cross_entropy(shifted_logits.transpose(-1, -2), shifted_labels, ignore_index=-100, reduction="none")
    return ce.sum(-1)


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _frozen_copy(model):
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class ReferenceUnlearner:
    """One reference-style unlearning step's gradient (into ``.grad``) for npo[+sam][+ilu] and rmu."""

    def __init__(self, model, method: str, *, beta=0.1, forget_weight=1.0, retain_weight=1.0, sam_rho=0.0,
                 irm_weight=0.0, rmu_layer=7, rmu_steering=6.5, rmu_alpha=1200.0, steering=None):
        if method not in ("npo", "rmu"):
            raise ValueError(f"method must be 'npo' or 'rmu', got {method!r}")
        if method == "rmu" and steering is None:
            raise ValueError("method='rmu' needs the steering vector u (steering=...)")
        self.model, self.method = model, method
        self.beta, self.c_f, self.c_r = beta, forget_weight, retain_weight
        self.rho, self.irm_weight = sam_rho, irm_weight
        self.rmu_layer, self.rmu_alpha = rmu_layer, rmu_alpha
        self.control = None if steering is None else rmu_steering * steering.view(1, 1, -1)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # Both methods keep a whole second model: NPO's reference model, RMU's frozen model.
        self.ref_model = _frozen_copy(model)
        self.e_w: dict = {}

    # -- losses -------------------------------------------------------------------------------------
    def npo_loss(self, batch):
        nll = per_sequence_nll(_logits(self.model, batch), batch["labels"])
        with torch.no_grad():  # the reference model's forward, every evaluation of the forget loss
            ref_nll = per_sequence_nll(_logits(self.ref_model, batch), batch["labels"])
        return -(2.0 / self.beta) * F.logsigmoid(self.beta * (nll.float() - ref_nll.float())).mean()

    def retain_loss(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False)
        return out.loss

    def irm_penalty(self, env_batches):
        penalty = 0.0
        for batch in env_batches:
            logits = _logits(self.model, batch)
            w = torch.tensor(1.0, device=logits.device, requires_grad=True)
            scaled = (logits * w)[:, :-1].float()
            ce = F.cross_entropy(scaled.reshape(-1, scaled.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=-100)
            (g,) = torch.autograd.grad(ce, w, create_graph=True)
            penalty = penalty + g * g
        return penalty

    def _layer_output(self, model, batch):
        """WMDP's forward_with_cache: a hook on layer L keeps its output while the whole model runs."""
        cache = []
        layer = model.model.layers[self.rmu_layer]
        handle = layer.register_forward_hook(lambda mod, args, out: cache.append(out[0] if isinstance(out, tuple) else out))
        try:
            _logits(model, batch)
        finally:
            handle.remove()
        return cache[0]

    # -- SAM ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _sam_first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in self.params if p.grad is not None]), p=2)
        scale = self.rho / (grad_norm + 1e-12)
        for p in self.params:
            if p.grad is None:
                continue
            e_w = p.grad * scale.to(p)
            p.add_(e_w)
            self.e_w[p] = e_w  # a param-sized clone per tensor
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _sam_second_step(self):
        for p, e_w in self.e_w.items():
            p.sub_(e_w)  # restore by subtraction, in the parameter dtype
        self.e_w.clear()

    def _rest(self, retain, env_batches):
        rest = self.c_r * self.retain_loss(retain)
        if self.irm_weight > 0:
            rest = rest + self.irm_weight * self.irm_penalty(env_batches)
        return rest

    # -- one step -----------------------------------------------------------------------------------
    def gradients(self, forget, retain, env_batches=()) -> float:
        """Accumulate the step's gradient into ``.grad``; return the objective at θ (float)."""
        if self.method == "rmu":
            act_f = self._layer_output(self.model, forget)
            act_r = self._layer_output(self.model, retain)
            with torch.no_grad():
                act_r0 = self._layer_output(self.ref_model, retain)
            forget_l = F.mse_loss(act_f.float(), self.control.to(act_f.device).float().expand_as(act_f))
            retain_l = self.rmu_alpha * F.mse_loss(act_r.float(), act_r0.float())
            loss = forget_l + retain_l
            loss.backward()
            return float(loss.detach())

        if self.rho > 0:
            forget_l = self.npo_loss(forget)
            (self.c_f * forget_l).backward()
            self._sam_first_step()
            (self.c_f * self.npo_loss(forget)).backward()
            self._sam_second_step()
            rest = self._rest(retain, env_batches)  # retain (+ penalty) at the restored θ
            rest.backward()
            return float(self.c_f * forget_l.detach() + rest.detach())
        loss = self.c_f * self.npo_loss(forget) + self._rest(retain, env_batches)
        loss.backward()
        return float(loss.detach())
