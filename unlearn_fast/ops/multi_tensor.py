"""Multi-tensor SAM ops: global gradient norm, perturb with backup, exact restore (SPEC §1.3).

    n   = ‖g‖₂ over every tensor            (ASAM: ‖|θ|⊙g‖₂)
    s   = ρ / max(n, tiny)                  (n = 0 → s = 0: no perturbation, never NaN)
    θ  ← θ + s · g                          (ASAM: θ + s · |θ|²⊙g)
The norm stays on the device (no host sync); under torch.distributed the squared
norm is all-reduced before the square root. The backup is the weights as they
were, so the restore is a copy: bit-exact in every dtype.

This module is the torch (``torch._foreach_*``) path; faster engines plug in
behind the same three functions.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_TINY = 1e-12
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class SAMState:
    """What ``sam_restore_`` needs: the moved tensors, their backup, and the global norm (fp32 device scalar)."""

    params: list[torch.Tensor]
    backup: list[torch.Tensor]
    norm: torch.Tensor
    scale: torch.Tensor
    restored: bool = field(default=False)


def _check_list(name: str, tensors) -> list:
    if isinstance(tensors, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor")
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be a floating tensor, got {t.dtype}")
    return tensors


def _pairs(params, grads):
    params = _check_list("params", params)
    grads = _check_list("grads", grads)
    if len(params) != len(grads):
        raise ValueError(f"params and grads must have the same length, got {len(params)} and {len(grads)}")
    kept_p, kept_g = [], []
    device = None
    for i, (p, g) in enumerate(zip(params, grads)):
        if p is None or g is None:
            continue
        if p.shape != g.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, expected params[{i}]'s {tuple(p.shape)}")
        if device is None:
            device = p.device
        if p.device != device or g.device != device:
            raise ValueError(f"params[{i}] and grads[{i}] must be on {device}, got {p.device} and {g.device}")
        kept_p.append(p)
        kept_g.append(g)
    return kept_p, kept_g, device


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _squared_norm(tensors, weights=None) -> torch.Tensor:
    if weights is None:
        parts = [t.detach().float() for t in tensors]
    else:
        parts = [w.detach().float().abs() * t.detach().float() for t, w in zip(tensors, weights)]
    norms = torch._foreach_norm(parts, 2)
    return torch.stack(norms).square().sum()


def global_grad_norm(tensors, *, adaptive_params=None) -> torch.Tensor:
    """‖tensors‖₂ as one fp32 device scalar (‖|adaptive_params|⊙tensors‖₂ for ASAM); None entries are skipped."""
    tensors = _check_list("tensors", tensors)
    if adaptive_params is not None:
        adaptive_params = _check_list("adaptive_params", adaptive_params)
        if len(adaptive_params) != len(tensors):
            raise ValueError(f"adaptive_params must have the same length as tensors, got "
                             f"{len(adaptive_params)} and {len(tensors)}")
        kept = [(t, w) for t, w in zip(tensors, adaptive_params) if t is not None and w is not None]
        tensors, weights = [t for t, _ in kept], [w for _, w in kept]
    else:
        tensors, weights = [t for t in tensors if t is not None], None
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    return _all_reduce_sum(_squared_norm(tensors, weights)).sqrt()


@torch.no_grad()
def sam_perturb_(params, grads, rho: float, *, adaptive: bool = False) -> SAMState:
    """θ ← θ + ρ·g/‖g‖ in place (ASAM: ρ·|θ|²⊙g/‖|θ|⊙g‖), keeping a backup for ``sam_restore_``."""
    if not isinstance(rho, (int, float)) or rho < 0:
        raise ValueError(f"rho must be a non-negative number, got {rho!r}")
    params, grads, device = _pairs(params, grads)
    if not params:
        zero = torch.zeros((), dtype=torch.float32)
        return SAMState([], [], zero, zero)
    norm = _all_reduce_sum(_squared_norm(grads, params if adaptive else None)).sqrt()
    scale = rho / norm.clamp_min(_TINY)
    backup = [p.detach().clone() for p in params]
    steps = [g.detach().to(torch.float32, copy=True) for g in grads]  # never scale the caller's grads
    if adaptive:
        steps = [s.mul_(b.float().square()) for s, b in zip(steps, backup)]
    torch._foreach_mul_(steps, scale)
    for p, b, s in zip(params, backup, steps):
        p.copy_(s.add_(b.float()))  # in fp32, one rounding to p's dtype
    return SAMState(params, backup, norm, scale)


@torch.no_grad()
def sam_restore_(state: SAMState) -> None:
    """Put the weights back exactly as they were before ``sam_perturb_`` (a copy of the backup)."""
    if not isinstance(state, SAMState):
        raise TypeError(f"state must be the SAMState returned by sam_perturb_, got {type(state).__name__}")
    if state.restored:
        raise RuntimeError("this SAMState was already restored")
    if state.params:
        torch._foreach_copy_(state.params, state.backup)
    state.backup = []
    state.restored = True
