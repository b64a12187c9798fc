"""SAM on the forget loss (SPEC §1.3) and the finite-difference Hessian-vector helpers (SPEC §1.2, §1.4).

Step order of ``SAM.step`` — every gradient the update needs except g_f is taken at θ, so the
weights move once and come back once:

    g_r = ∇ℓ_r(θ)         retain gradient, at the UNPERTURBED weights, into .grad
    g   = ∇ℓ_f(θ)         forget gradient at θ: only the direction, never stored in .grad
    θ' = θ + ρ g/‖g‖      one pass, backup written in the same pass
    g_f = ∇ℓ_f(θ')        accumulated into .grad
    restore θ             a copy of the backup (bit-exact) — or, with ``restore=False``, left
                          pending for ``FusedAdamW.step(sam_state=...)``, which restores and
                          updates in ONE pass (no separate restore pass).

With fp32 master weights (the trainer's bf16 mode) the model weights are recomputed from the
masters after every optimizer step, so the perturbation needs no backup at all:
``perturb(..., keep_backup=False)`` and ``restore_from_masters(state, masters)`` (or just the
usual masters → model copy after the step) put the model back to round(master), which is
exactly what it held before the perturbation.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .. import ops


def _param_list(params) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, got a single tensor")
    params = list(params)
    if not params:
        raise ValueError("params must not be empty")
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating tensor, got {p.dtype}")
    return params


def grads_of(loss: torch.Tensor, params) -> list[torch.Tensor]:
    """∇loss for every parameter as a list (zeros where the loss does not depend on it); ``.grad`` untouched."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # autograd returns some gradients as views of a private buffer; ``.data`` drops that base, so each
    # gradient is the sole owner of its storage (what lets SAM trade storage with it, ops.sam_perturb_)
    return [g.data if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)]


class SAM:
    """Sharpness-aware minimisation of the forget loss with the multi-tensor engine.

    ``SAM(params, rho=0.01, adaptive=False)``; ``perturb(grads)`` / ``restore()``, the context
    manager ``perturbed(grads)``, or the whole SPEC §1.3 gradient computation ``step(...)``.
    The backup buffer is allocated once and reused across steps.
    """

    def __init__(self, params, rho: float = 0.01, adaptive: bool = False, *, backend: str | None = None):
        self.params = _param_list(params)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
            raise ValueError(f"rho must be a non-negative number, got {rho!r}")
        self.rho, self.adaptive, self.backend = float(rho), bool(adaptive), backend
        self.state: ops.SAMState | None = None
        self._backup: list[torch.Tensor] | None = None
        self._backup_for: tuple | None = None

    def _reusable_backup(self, moved: list[torch.Tensor]) -> list[torch.Tensor] | None:
        key = tuple(id(p) for p in moved)
        if self._backup_for != key:
            self._backup, self._backup_for = None, key
        return self._backup

    @torch.no_grad()
    def perturb(self, grads=None, *, keep_backup: bool = True) -> ops.SAMState:
        """θ ← θ + ρ g/‖g‖ (ASAM: ρ|θ|²⊙g/‖|θ|⊙g‖); ``grads`` defaults to each parameter's ``.grad``."""
        if self.state is not None:
            raise RuntimeError("SAM.perturb: the weights are already perturbed; restore() first")
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"grads must have one entry per parameter ({len(self.params)}), got {len(grads)}")
        moved = [p for p, g in zip(self.params, grads) if g is not None]
        backup = self._reusable_backup(moved) if keep_backup else None
        state = ops.sam_perturb_(self.params, grads, self.rho, adaptive=self.adaptive, backend=self.backend,
                                 backup=backup, keep_backup=keep_backup)
        if keep_backup:
            self._backup = state.backup
        self.state = state
        return state

    def restore(self) -> None:
        """θ back exactly as before ``perturb``."""
        if self.state is None:
            raise RuntimeError("SAM.restore: the weights are not perturbed")
        state, self.state = self.state, None
        if not state.restored:
            backup = state.backup
            ops.sam_restore_(state)
            self._backup = backup  # keep the buffer for the next step

    def consumed(self, state: ops.SAMState) -> None:
        """Mark a pending state as restored by someone else (``FusedAdamW.step(sam_state=...)``)."""
        if state is self.state:
            self.state = None

    @contextlib.contextmanager
    def perturbed(self, grads=None):
        state = self.perturb(grads)
        try:
            yield state
        finally:
            self.restore()

    def step(self, forget_closure: Callable[[], torch.Tensor], retain_closure: Callable[[], torch.Tensor] | None = None,
             *, forget_weight: float = 1.0, retain_weight: float = 1.0, restore: bool = True,
             keep_backup: bool = True) -> dict:
        """Accumulate forget_weight·∇ℓ_f(θ') + retain_weight·∇ℓ_r(θ) into ``.grad`` (SPEC §1.3).

        The closures recompute their loss from the current weights. ``restore=False`` leaves the
        weights perturbed and returns the pending state under "sam_state" for
        ``FusedAdamW.step(sam_state=...)``, which restores and updates in one pass.
        ``keep_backup=False`` (needs ``restore=False``): no backup at all, for weights that are
        recomputed from fp32 masters after the optimizer step (``restore_from_masters``).
        """
        if not keep_backup and restore:
            raise ValueError("keep_backup=False needs restore=False (the weights come back from the fp32 masters)")
        out = {}
        if retain_closure is not None:
            retain = retain_closure()
            (retain_weight * retain).backward()
            out["retain_loss"] = retain.detach()
        forget = forget_closure()
        direction = grads_of(forget, self.params)
        state = self.perturb(direction, keep_backup=keep_backup)
        del direction
        perturbed = forget_closure()
        (forget_weight * perturbed).backward()
        out.update(forget_loss=forget.detach(), forget_loss_perturbed=perturbed.detach(), sam_norm=state.norm)
        if restore:
            self.restore()
        else:
            out["sam_state"] = state
            if not keep_backup:
                self.state = None  # nothing to restore from here: the caller recomputes from its masters
        return out


@torch.no_grad()
def restore_from_masters(state: ops.SAMState, masters) -> None:
    """Undo a backup-less perturbation: each moved weight ← its fp32 master, rounded (the value it held)."""
    if not isinstance(state, ops.SAMState):
        raise TypeError(f"state must be a SAMState, got {type(state).__name__}")
    masters = list(masters)
    if len(masters) != len(state.params):
        raise ValueError(f"masters must have one tensor per moved parameter ({len(state.params)}), got {len(masters)}")
    for p, m in zip(state.params, masters):
        if m.shape != p.shape:
            raise ValueError(f"a master of shape {tuple(m.shape)} does not match its weight {tuple(p.shape)}")
        p.copy_(m)
    state.restored = True


def _grads_while_moved(params, loss_fn, state: ops.SAMState) -> list[torch.Tensor]:
    """∇ℓ at the moved weights; the caller restores them (with its accumulate step), or this does on error."""
    try:
        return grads_of(loss_fn(), params)
    except BaseException:
        ops.sam_restore_(state)
        raise


def fd_hvp(params, loss_fn: Callable[[], torch.Tensor], vector, r: float = 1e-3, *, grads=None,
           backend: str | None = None) -> list[torch.Tensor]:
    """Hessian-vector product by finite differences (SPEC §1.2):

        H v ≈ [∇ℓ(θ + r v/‖v‖) − ∇ℓ(θ)] · ‖v‖ / r

    ``loss_fn()`` recomputes the loss from the current weights; ``grads`` is ∇ℓ(θ) if already known
    (saves one backward). r is the absolute step length along v/‖v‖. Returns fp32 tensors (fp64 for
    fp64 parameters). One extra forward/backward; the weights are restored bit-exactly, in the same
    pass as the accumulation on the compiled path.
    """
    params = _param_list(params)
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(f"vector must have one tensor per parameter ({len(params)}), got {len(vector)}")
    if not r > 0:
        raise ValueError(f"r must be positive, got {r!r}")
    g0 = grads_of(loss_fn(), params) if grads is None else list(grads)
    acc = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    state = ops.sam_perturb_(params, vector, r, backend=backend)
    g1 = _grads_while_moved(params, loss_fn, state)
    coeff = state.norm / r  # ‖v‖ / r on the device
    ops.fd_hvp_accumulate_(acc, g1, g0, coeff, restore=state, backend=backend)
    return acc


def gradient_penalty_grad(params, loss_fn: Callable[[], torch.Tensor], gamma: float, r: float = 1e-3, *,
                          backend: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """∇(ℓ + γ‖∇ℓ‖) in Zhao et al.'s form (SPEC §1.4): (1 − a)∇ℓ(θ) + a∇ℓ(θ + r ∇ℓ/‖∇ℓ‖), a = γ/r.

    Written as g0 + a·(g1 − g0), the finite-difference accumulate step. Returns (gradient, ℓ(θ)).
    """
    gradient, loss, _ = gradient_penalty_terms(params, loss_fn, gamma, r, backend=backend)
    return gradient, loss


def gradient_penalty_terms(params, loss_fn: Callable[[], torch.Tensor], gamma: float, r: float = 1e-3, *,
                           backend: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``gradient_penalty_grad`` plus ‖∇ℓ(θ)‖ (fp32 scalar tensor, no host sync): (gradient, ℓ(θ), norm)."""
    params = _param_list(params)
    if not r > 0:
        raise ValueError(f"r must be positive, got {r!r}")
    loss = loss_fn()
    g0 = grads_of(loss, params)
    acc = [g.detach().to(torch.promote_types(g.dtype, torch.float32), copy=True) for g in g0]
    state = ops.sam_perturb_(params, g0, r, backend=backend)
    g1 = _grads_while_moved(params, loss_fn, state)
    ops.fd_hvp_accumulate_(acc, g1, g0, gamma / r, restore=state, backend=backend)
    return acc, loss.detach(), state.norm
