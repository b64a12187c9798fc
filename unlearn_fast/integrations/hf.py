"""Hugging Face transformers integration: a logits-free causal-LM loss, and SAM/ILU for ``transformers.Trainer``.

1. ``apply(model)`` patches an existing causal LM (``AutoModelForCausalLM``,
   PEFT-wrapped too) so that ``model(input_ids, labels=...)`` computes its loss
   with ``uf.ops.linear_cross_entropy`` on the final hidden states: the [N, V]
   logits are never materialised. In that case the output has ``logits=None``
   (pass ``apply(model, keep_logits=True)`` to get them as well, materialised).
   Without ``labels`` the model's own forward runs unchanged. The loss is HF's:
   labels shifted by one inside, mean over non-ignored tokens, or the sum over
   ``num_items_in_batch`` when the Trainer passes it (gradient accumulation).
   ``remove(model)`` (or ``handle.remove()``, or ``with apply(model):``) restores it.

2. ``UnlearnTrainerMixin`` gives a ``transformers.Trainer`` subclass the
   unlearning objective of ``uf.unlearning_gradients`` — NPO/GA/GradDiff/SimNPO/RMU,
   SAM on the forget loss, the ILU logit penalty — in its ``training_step``:

       class MyTrainer(UnlearnTrainerMixin, transformers.Trainer):
           pass
       trainer = MyTrainer(model=model, args=args, train_dataset=UnlearnDataset(forget, retain, envs),
                           data_collator=UnlearnCollator(pad_token_id),
                           unlearn_config=uf.UnlearnConfig(method="graddiff", sam_rho=0.01,
                                                           irm="logit", irm_weight=0.5))
       trainer.train()

   Each training example is {"forget": ex, "retain": ex, "envs": [ex, ...]} (ex:
   1-D ``input_ids``/``labels``, plus ``ref_nll`` for NPO); override
   ``unlearning_batches(inputs)`` for another layout. The Trainer's optimizer,
   scheduler, clipping, accumulation, logging and checkpoints stay as they are.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

from .. import ops
from ..objectives.config import UnlearnConfig
from ..objectives.lm import lm_parts, shift, trainable_parameters
from ..data.collate import collate
from ..objectives.step import unlearning_gradients
from ..train.distributed import data_parallel

_ATTR = "_unlearn_fast_hf_forward"


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Handle(contextlib.AbstractContextManager):
    """Undo of ``apply``: ``handle.remove()`` or leave the ``with`` block."""

    def __init__(self, model: nn.Module):
        self.model = model

    def remove(self) -> None:
        remove(self.model)

    def __exit__(self, *exc):
        self.remove()
        return False


def apply(model: nn.Module, *, keep_logits: bool = False) -> Handle:
    """Make ``model(..., labels=...)`` compute its loss with the fused linear cross-entropy (no logits)."""
    base = _base(model)
    parts = lm_parts(model)  # raises a clear TypeError for models without a linear head
    if _ATTR in base.__dict__:
        raise RuntimeError("unlearn_fast.integrations.hf.apply: this model is already patched")
    original = base.forward  # the bound method of the class (an instance attribute, if someone patched before)
    had_instance_forward = "forward" in base.__dict__
    ignore_index = -100

    def forward(self, input_ids=None, *args, labels=None, num_items_in_batch=None, shift_labels=None, **kwargs):
        if labels is None and shift_labels is None or args:
            return original(input_ids, *args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        kwargs.setdefault("use_cache", False)
        out = parts.body(input_ids=input_ids, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if shift_labels is None:
            h, targets = shift(hidden, labels)
        else:  # labels already aligned with the positions that predict them (context parallelism)
            h, targets = hidden, shift_labels
        if num_items_in_batch is None:
            loss = ops.linear_cross_entropy(h, parts.head_weight, targets, linear_bias=parts.head_bias,
                                            ignore_index=ignore_index)
        else:
            total = ops.linear_cross_entropy(h, parts.head_weight, targets, linear_bias=parts.head_bias,
                                             ignore_index=ignore_index, reduction="sum")
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device)
        logits = nn.functional.linear(hidden, parts.head_weight, parts.head_bias) if keep_logits else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    base.__dict__[_ATTR] = (original if had_instance_forward else None,)
    base.forward = types.MethodType(forward, base)
    return Handle(model)


def remove(model: nn.Module) -> None:
    """Restore the forward that ``apply`` replaced."""
    base = _base(model)
    saved = base.__dict__.pop(_ATTR, None)
    if saved is None:
        raise RuntimeError("unlearn_fast.integrations.hf.remove: this model was not patched by apply()")
    (previous,) = saved
    if previous is None:
        del base.forward  # back to the class's forward
    else:
        base.forward = previous


def is_applied(model: nn.Module) -> bool:
    return _ATTR in _base(model).__dict__


# -- transformers.Trainer -----------------------------------------------------------------------

class UnlearnDataset(torch.utils.data.Dataset):
    """Example i = forget[i] with retain[i mod R] and each environment's [i mod E_k] (length: the forget set).

    ``ref_nll`` (one value per forget example, from ``uf.reference_nll``) is attached for NPO.
    """

    def __init__(self, forget, retain=None, envs=(), ref_nll=None):
        if not forget:
            raise ValueError("forget: needs at least one example")
        self.forget, self.retain, self.envs = list(forget), list(retain or []), [list(e) for e in envs]
        if ref_nll is not None and len(ref_nll) != len(self.forget):
            raise ValueError(f"ref_nll: needs one value per forget example ({len(self.forget)}), got {len(ref_nll)}")
        self.ref_nll = ref_nll

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, i):
        forget = dict(self.forget[i])
        if self.ref_nll is not None:
            forget["ref_nll"] = torch.as_tensor(self.ref_nll[i], dtype=torch.float32)
        item = {"forget": forget}
        if self.retain:
            item["retain"] = self.retain[i % len(self.retain)]
        if self.envs:
            item["envs"] = [env[i % len(env)] for env in self.envs]
        return item


class UnlearnCollator:
    """Right-pads each of forget / retain / envs[k] into its own batch dict (``ref_nll`` stacked)."""

    def __init__(self, pad_token_id: int = 0):
        self.pad = pad_token_id

    def _batch(self, examples):
        batch = collate(examples, self.pad)
        if "ref_nll" in examples[0]:
            batch["ref_nll"] = torch.stack([torch.as_tensor(ex["ref_nll"]) for ex in examples])
        return batch

    def __call__(self, items):
        out = {"forget": self._batch([it["forget"] for it in items])}
        if "retain" in items[0]:
            out["retain"] = self._batch([it["retain"] for it in items])
        if "envs" in items[0]:
            out["envs"] = [self._batch([it["envs"][k] for it in items]) for k in range(len(items[0]["envs"]))]
        return out


class UnlearnTrainerMixin:
    """Put before ``transformers.Trainer`` in the bases; its ``training_step`` runs ``uf.unlearning_gradients``.

    The step's gradient is exactly that of ``uf.unlearning_gradients`` on the
    batch (divided by the accumulation steps, as the Trainer's own loss is).
    Under several processes the gradients are averaged with the trainer's
    data-parallel hooks (the objective bypasses DDP's forward); only the
    one-process case is tested here.
    """

    def __init__(self, *args, unlearn_config: UnlearnConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if unlearn_config is not None and not isinstance(unlearn_config, UnlearnConfig):
            raise TypeError(f"unlearn_config must be a uf.UnlearnConfig, got {type(unlearn_config).__name__}")
        self.unlearn_config = unlearn_config or UnlearnConfig()
        self.args.remove_unused_columns = False  # the batches are nested dicts, not model inputs
        self.unlearn_metrics: dict = {}

    def unlearning_batches(self, inputs) -> tuple[dict, dict | None, list]:
        """(forget batch, retain batch or None, environment batches) from the collated inputs."""
        if "forget" not in inputs:
            raise ValueError("UnlearnTrainerMixin: each batch needs a 'forget' entry (see UnlearnCollator), "
                             f"got keys {sorted(inputs)}; override unlearning_batches() for another layout")
        return inputs["forget"], inputs.get("retain"), list(inputs.get("envs") or [])

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        forget, retain, envs = self.unlearning_batches(inputs)
        target = self.accelerator.unwrap_model(model)
        params = trainable_parameters(target)
        earlier = [p.grad for p in params]  # gradients of earlier micro-batches, kept aside
        for p in params:
            p.grad = None
        with data_parallel(params):
            metrics = unlearning_gradients(target, forget, retain, envs, self.unlearn_config,
                                           step=self.state.global_step)
        scale = 1.0 / max(1, getattr(self, "current_gradient_accumulation_steps", 1))
        with torch.no_grad():
            for p, old in zip(params, earlier):
                if p.grad is None:
                    p.grad = old
                    continue
                if scale != 1.0:
                    p.grad.mul_(scale)
                if old is not None:
                    p.grad.add_(old)
        self.unlearn_metrics = metrics
        return torch.tensor(metrics["loss"] * scale, device=self.args.device)

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.unlearn_metrics:  # the training log line: add the objective's terms
            logs = {**logs, **{f"uf_{k}": v for k, v in self.unlearn_metrics.items() if k != "loss"}}
        return super().log(logs, *args, **kwargs)
