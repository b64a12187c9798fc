"""RMU (representation misdirection, SPEC §1.1) with a truncated forward.

    ℓ = mean ‖h^L_f(θ) − c·u‖² + α · mean ‖h^L_r(θ) − h^L_r(θ0)‖²

h^L is the output of decoder layer L; means are over non-padding tokens and
hidden units (compat="reference": over all positions). Only layers up to L
run. Layers below the first trainable layer k do not depend on θ: they run
once per batch without autograd, and their output feeds both the trainable
computation and the start-weight computation. h^L_r(θ0) is computed from that
shared input by layers k..L called with the start values of their trainable
tensors (``torch.func.functional_call``): the start values of the trainable
tensors are the only copy kept (for the Zephyr recipe, three down_proj
matrices), no second model.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import UnlearnConfig
from .lm import LMParts, decoder_layers


class _StopForward(Exception):
    pass


def steering_vector(hidden_size: int, seed: int, device, dtype) -> torch.Tensor:
    """u: entries U[0, 1), normalised to unit length; the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(hidden_size, generator=gen, dtype=torch.float32)
    return (u / u.norm()).to(device=device, dtype=dtype)


def rmu_trainable(model: nn.Module, layer: int, span: int = 3, pattern: str = "mlp.down_proj") -> list[str]:
    """Freeze everything except ``pattern`` weights of layers layer−span+1 .. layer (the Zephyr recipe)."""
    from .lm import lm_parts

    layers = decoder_layers(lm_parts(model).body)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i in range(max(0, layer - span + 1), layer + 1):
        for name, p in layers[i].named_parameters():
            if pattern in name:
                p.requires_grad_(True)
                names.append(f"layers.{i}.{name}")
    if not names:
        raise ValueError(f"no parameter matching {pattern!r} in layers {layer - span + 1}..{layer}")
    return names


class RMUModel:
    """Truncated forward of a causal LM for RMU, with the start values of its trainable tensors."""

    def __init__(self, parts: LMParts, layer: int):
        self.layers = decoder_layers(parts.body)
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"UnlearnConfig.rmu_layer must be in [0, {len(self.layers)}), got {layer}")
        self.body, self.layer = parts.body, layer
        in_layers = {id(p) for p in self.layers.parameters()}
        outside = [p for p in parts.body.parameters() if p.requires_grad and id(p) not in in_layers]
        trainable = [i for i, mod in enumerate(self.layers) if any(p.requires_grad for p in mod.parameters())]
        # k: the first layer that must run with autograd
        self.first = 0 if outside or not trainable else min(min(trainable), layer)
        self.bottom_needs_grad = bool(outside)
        self.start = {
            i: {n: p.detach().clone() for n, p in self.layers[i].named_parameters() if p.requires_grad}
            for i in range(self.first, layer + 1)
        }

    def bottom(self, batch: dict):
        """Input of layer k and the keyword arguments the body passes to its layers (run once per batch)."""
        captured = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        handle = self.layers[self.first].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.set_grad_enabled(self.bottom_needs_grad):
                self.body(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if "args" in captured and captured["args"]:
            x, rest = captured["args"][0], captured["args"][1:]
        else:
            x, rest = captured["kwargs"].pop("hidden_states"), ()
        return x, rest, captured["kwargs"]

    def top(self, bottom, *, start_weights: bool = False) -> torch.Tensor:
        """Output of layer L from the bottom's output, with current (or start) weights."""
        x, rest, kwargs = bottom
        for i in range(self.first, self.layer + 1):
            if start_weights and self.start[i]:
                out = torch.func.functional_call(self.layers[i], self.start[i], (x, *rest), kwargs)
            else:
                out = self.layers[i](x, *rest, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        return x


def _mean_sq(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    sq = diff.float().pow(2)
    if mask is None:
        return sq.mean()
    mask = mask.to(sq.dtype).unsqueeze(-1)
    return (sq * mask).sum() / (mask.sum() * sq.shape[-1]).clamp(min=1)


def _mask(batch: dict, config: UnlearnConfig):
    if config.compat == "reference":
        return None
    return batch.get("attention_mask")


def rmu_forget_loss(rmu: RMUModel, bottom, batch: dict, config: UnlearnConfig):
    act = rmu.top(bottom)
    target = config.rmu_steering * steering_vector(act.shape[-1], config.seed, act.device, torch.float32)
    loss = _mean_sq(act.float() - target, _mask(batch, config))
    return loss, {"rmu_forget": float(loss.detach())}


def rmu_retain_loss(rmu: RMUModel, bottom, batch: dict, config: UnlearnConfig):
    act = rmu.top(bottom)
    with torch.no_grad():
        frozen = rmu.top(bottom, start_weights=True)
    loss = config.rmu_alpha * _mean_sq(act.float() - frozen.float(), _mask(batch, config))
    return loss, {"rmu_retain": float(loss.detach())}
