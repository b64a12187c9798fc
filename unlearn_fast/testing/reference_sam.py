"""Naive per-parameter SAM references (the approach of the public SAM code): a Python loop, clones, fp64 maths.

Tests compare the multi-tensor engine against these; bench/bench_sam.py times them.
"""
from __future__ import annotations

import math

import torch


def naive_global_norm(grads, params=None) -> float:
    """‖g‖₂ over every tensor in fp64 (ASAM: ‖|θ|⊙g‖₂); None entries skipped."""
    total = 0.0
    for i, g in enumerate(grads):
        if g is None or (params is not None and params[i] is None):
            continue
        x = g.detach().double()
        if params is not None:
            x = params[i].detach().double().abs() * x
        total += float((x * x).sum())
    return math.sqrt(total)


def naive_perturbed(params, grads, rho, adaptive=False, scale=None):
    """The perturbed weights θ + ρ·w⊙g/n computed in fp64 and rounded once to each parameter's dtype.

    ``scale``: use this s = ρ/n (e.g. the engine's fp32 one) instead of the fp64 one, so that the
    comparison measures the elementwise update alone (the norm is checked on its own).
    """
    n = naive_global_norm(grads, params if adaptive else None)
    s = rho / max(n, 1e-12) if scale is None else scale
    out = []
    for p, g in zip(params, grads):
        if p is None or g is None:
            out.append(None if p is None else p.detach().clone())
            continue
        step = g.detach().double() * s
        if adaptive:
            step = step * p.detach().double().square()
        out.append((p.detach().double() + step).to(p.dtype))
    return out


def naive_sam_loop(params, grads, rho):
    """The reference code's loop: clone each parameter, add in its own dtype, restore later by subtraction."""
    n = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    backups, steps = [], []
    for p, g in zip(params, grads):
        e = (rho / (n + 1e-12) * g.float()).to(p.dtype)
        backups.append(p.detach().clone())
        p.data.add_(e)
        steps.append(e)
    return backups, steps


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (fp64 tensor), the subnormal spacing near zero."""
    info = torch.finfo(dtype)
    mantissa = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]
    _, exponent = torch.frexp(x.double().abs())
    spacing = torch.ldexp(torch.ones_like(x, dtype=torch.float64), (exponent - 1 - mantissa).to(torch.int32))
    tiny = info.smallest_normal * 2.0 ** -mantissa
    return spacing.clamp_min(tiny)


def max_ulps(actual: torch.Tensor, expected: torch.Tensor, operand: torch.Tensor | None = None) -> float:
    """Largest |actual − expected| in units of the last place of expected's dtype.

    With ``operand`` (the weights before the update) the unit is the last place of the largest of
    |expected|, |operand| and |expected − operand|: where θ + step cancels, the fp32 step has one
    rounding at its own scale.
    """
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs()
    if operand is not None:  # the larger of the result, θ and the step
        scale = torch.maximum(torch.maximum(scale, operand.double().abs()), (expected.double() - operand.double()).abs())
    return float((diff / ulp(scale, expected.dtype)).max()) if diff.numel() else 0.0
