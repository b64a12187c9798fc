"""Smoothing and parameter-space invariance regularisers by finite differences (SPEC §1.2b/c, §1.3, §1.4).

The maths of the gradient penalty and of finite-difference Hessian-vector products has one home,
``optim.sam`` (``gradient_penalty_terms``, ``fd_hvp``); this module applies it to the forget loss.

Every gradient here is a combination of first-order gradients at a few points
θ + δ: the weights are moved in place by the multi-tensor SAM engine
(``ops.sam_perturb_``, one pass, backup in the same pass) and restored
exactly (``ops.sam_restore_``). No double backprop, no model copy.

A "loss function" is a closure returning (scalar loss, metrics). Gradients are
accumulated into ``.grad`` (``backward``) or taken as lists (``grads_of``);
the caller's ``.grad`` is never touched by intermediate gradients.
"""
from __future__ import annotations

import contextlib

import torch

from .. import ops
from ..optim.sam import fd_hvp, gradient_penalty_terms, grads_of


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for reductions (bf16/fp16 upcast; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _global_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(_wide(x)) for x in tensors])))


def accumulate(params, grads, scale: float) -> None:
    """p.grad += scale · g, as backward would."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = (g * scale).to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype), alpha=scale)


@contextlib.contextmanager
def moved_along(params, direction, step: float, *, adaptive: bool = False, consume: bool = False):
    """θ ← θ + step · direction / ‖direction‖ (ASAM-weighted when adaptive) inside the block; exact restore
    after.

    ``consume``: the direction's tensors become the backup of θ (the caller must not read them again):
    no parameter-sized buffer is allocated, which on the CPU also spares its page faults every step.
    The moved weights are written into the backup, which then trades storage with θ (``exchange=True``):
    one parameter-sized write to move, none to restore, wherever a parameter owns its storage alone."""
    # a direction that cannot hold θ (another dtype, a stride the kernels do not take) gets a fresh backup
    consume = consume and all(d is None or (d.dtype == p.dtype and d.is_contiguous() and p.is_contiguous())
                              for p, d in zip(params, direction))
    state = ops.sam_perturb_(params, direction, step, adaptive=adaptive, backup=direction if consume else None,
                             exchange=True)
    try:
        yield state
    finally:
        ops.sam_restore_(state)


@contextlib.contextmanager
def moved_by(params, change_):
    """Apply ``change_(i, p)`` in place to each parameter's data inside the block; restore bit-exactly after."""
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
        for i, p in enumerate(params):
            change_(i, p)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(params), backup)


def sam_forget(params, loss_fn, weight: float, rho: float, adaptive: bool) -> dict:
    """SAM on the forget loss: g_f = ∇ℓ_f(θ + ρ g/‖g‖), accumulated ×weight (SPEC §1.3)."""
    loss, metrics = loss_fn()
    grads = grads_of(loss, params)
    with moved_along(params, grads, rho, adaptive=adaptive, consume=True) as state:
        del grads  # their storage holds θ now
        perturbed, _ = loss_fn()
        (weight * perturbed).backward()
    metrics.update(forget_loss=float(loss.detach()), forget_loss_perturbed=float(perturbed.detach()),
                   sam_norm=float(state.norm))
    return metrics


def gp_forget(params, loss_fn, weight: float, gamma: float, r: float) -> dict:
    """ℓ_f + γ‖∇ℓ_f‖ by Zhao et al.'s form (SPEC §1.4): ``optim.sam.gradient_penalty_terms``, ×weight."""
    seen = {}

    def loss_only():
        loss, metrics = loss_fn()
        seen.setdefault("metrics", metrics)  # the metrics at θ (the first call)
        return loss

    grads, loss, norm = gradient_penalty_terms(params, loss_only, gamma, r)
    accumulate(params, grads, weight)
    metrics = seen["metrics"]
    metrics.update(forget_loss=float(loss), forget_grad_norm=float(norm))
    return metrics


def rs_forget(params, loss_fn, weight: float, samples: int, sigma: float, seed: int) -> dict:
    """ℓ_f averaged over ``samples`` Gaussian weight perturbations θ + σε (SPEC §1.4).

    ε is regenerated per tensor from (seed, sample, tensor index) while the weights are moved: never stored.
    """
    losses = []
    for k in range(samples):
        def add_noise(i, p, k=k):
            gen = torch.Generator(device=p.device).manual_seed(hash((seed, k, i)) & 0x7FFFFFFFFFFF)
            p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p.dtype), alpha=sigma)

        with moved_by(params, add_noise):
            loss, metrics = loss_fn()
            (weight / samples * loss).backward()
        losses.append(float(loss.detach()))
    metrics.update(forget_loss=sum(losses) / len(losses))
    return metrics


def cr_forget(params, loss_fn, weight: float, gamma: float, h: float, r: float) -> dict:
    """ℓ_f + γ‖∇ℓ_f(θ + h z) − ∇ℓ_f(θ)‖, z = ∇ℓ_f/‖∇ℓ_f‖ held constant (SPEC §1.4).

    With d = g(θ + hz) − g(θ) and u = d/‖d‖ the regulariser's gradient is (H(θ + hz) − H(θ)) u: two
    finite-difference Hessian-vector products along d (``optim.fd_hvp``, step r), at θ + hz and at θ.
    """
    loss, metrics = loss_fn()
    g0 = grads_of(loss, params)

    def loss_only():
        return loss_fn()[0]

    with moved_along(params, g0, h):
        g1 = grads_of(loss_only(), params)
        d = torch._foreach_sub(g1, g0)
        d_norm = _global_norm(d)
        hvp_moved = fd_hvp(params, loss_only, d, r, grads=g1)
    hvp_here = fd_hvp(params, loss_only, d, r, grads=g0)
    accumulate(params, g0, weight)
    scale = weight * gamma / d_norm if d_norm > 0 else 0.0
    accumulate(params, hvp_moved, scale)
    accumulate(params, hvp_here, -scale)
    metrics.update(forget_loss=float(loss.detach()), curvature=d_norm)
    return metrics


def param_irm(params, env_loss_fns, weight: float, reading: str, r: float) -> dict:
    """ILU's parameter readings (SPEC §1.2b/c), Hessian-vector products by finite differences.

    param_scalar:      P_e = u_e²,  u_e = ⟨θ, g_e⟩;      ∇P_e = 2 u_e (g_e + H_e θ)
    param_elementwise: P_e = ‖θ ⊙ g_e‖²;                ∇P_e = 2 θ⊙g_e⊙g_e + 2 H_e (θ⊙θ⊙g_e)
    with H v ≈ [∇ℓ(θ + r v/‖v‖) − ∇ℓ(θ)] · ‖v‖ / r.
    """
    total = 0.0
    for loss_fn in env_loss_fns:
        g = grads_of(loss_fn(), params)
        theta = [p.detach() for p in params]
        if reading == "param_scalar":
            u = float(sum((_wide(t) * _wide(x)).sum() for t, x in zip(theta, g)))
            total += u * u
            v = theta
            direct = [2.0 * u * x for x in g]
            hv_scale = 2.0 * u
        else:
            v = [t * t * x for t, x in zip(theta, g)]
            total += float(sum(((_wide(t) * _wide(x)) ** 2).sum() for t, x in zip(theta, g)))
            direct = [2.0 * t * x * x for t, x in zip(theta, g)]
            hv_scale = 2.0
        v_norm = _global_norm(v)
        accumulate(params, direct, weight)
        if v_norm == 0.0:
            continue
        with moved_along(params, [x.clone() for x in v], r):
            g_moved = grads_of(loss_fn(), params)
        hv = [(gm - x) * (v_norm / r) for gm, x in zip(g_moved, g)]
        accumulate(params, hv, weight * hv_scale)
    return {"irm_penalty": total}
