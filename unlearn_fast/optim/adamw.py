"""AdamW whose update is one pass over all parameters and can absorb a pending SAM restore.

``FusedAdamW`` is a ``torch.optim.Optimizer`` with torch.optim.AdamW's hyper-parameters, state
layout ("step", "exp_avg", "exp_avg_sq") and formulas, so its state_dict loads into
torch.optim.AdamW and back (the trainer's checkpoints keep working). ``step(sam_state=state)``
takes the weights from the SAM backup instead of the (perturbed) weights: the restore and the
update are the same pass, so a SAM step costs no separate restore pass.

Engines: the compiled op ``adamw_step_`` of csrc/ (CPU/CUDA) when it is available, else the same
formulas with torch ops.
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops import multi_tensor as mt


class FusedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, backend: str | None = None):
        if not lr >= 0:
            raise ValueError(f"lr must be non-negative, got {lr}")
        if not eps >= 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        if backend not in (None, "auto", "torch", "cpp"):
            raise ValueError(f"backend must be None, 'auto', 'torch' or 'cpp', got {backend!r}")
        # The same keys as torch.optim.AdamW's groups, so state dicts move between the two.
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False, fused=None)
        super().__init__(params, defaults)
        self.backend = backend

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key in ("amsgrad", "maximize"):
                group.setdefault(key, False)

    def _engine(self, tensors) -> str:
        if self.backend == "torch":
            return "torch"
        if not tensors:
            return "torch"
        usable = mt._cpp_compatible(tensors, None) and mt._cpp_usable(tensors[0].device)
        if self.backend == "cpp" and not usable:
            from ..ops import _cpp

            _cpp.load(tensors[0].device)  # raises with the reason
            raise ValueError("backend='cpp' needs contiguous CPU/CUDA tensors")
        return "cpp" if usable else "torch"

    @torch.no_grad()
    def step(self, closure=None, *, sam_state: ops.SAMState | None = None):
        """One AdamW step; with ``sam_state`` the weights are first restored from its backup, in the same pass."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        backup_of = {}
        if sam_state is not None:
            if not isinstance(sam_state, ops.SAMState):
                raise TypeError(f"sam_state must be a SAMState, got {type(sam_state).__name__}")
            if sam_state.restored:
                raise RuntimeError("sam_state was already restored")
            if not sam_state.has_backup:
                raise RuntimeError("sam_state has no backup (keep_backup=False): step the fp32 masters instead")
            sam_state.undo_exchange()  # exchanged weights are back by a storage trade; the update restores the rest
            backup_of = {id(p): b for p, b in zip(sam_state.params, sam_state.backup)}
        updated = set()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FusedAdamW supports neither amsgrad nor maximize")
            params, grads, exp_avgs, exp_avg_sqs, steps, backups = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("FusedAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                backups.append(backup_of.get(id(p)))
                updated.add(id(p))
            if params:
                self._update(group, params, grads, exp_avgs, exp_avg_sqs, steps, backups)
        if sam_state is not None:
            # Moved weights the update did not touch (no gradient, or not in this optimizer): plain restore.
            rest = [(p, b) for p, b in zip(sam_state.params, sam_state.backup) if id(p) not in updated]
            if rest:
                torch._foreach_copy_([p for p, _ in rest], [b for _, b in rest])
            sam_state.backup = []
            sam_state.restored = True
        return loss

    def _update(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, backups):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        # Steps advance together within a group unless a parameter joined late: bucket by step count.
        for s in steps:
            s += 1
        buckets: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            buckets.setdefault(float(s), []).append(i)
        for step, idx in buckets.items():
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            with_backup = [i for i in idx if backups[i] is not None]
            without = [i for i in idx if backups[i] is None]
            for sel, from_backup in ((with_backup, True), (without, False)):
                if not sel:
                    continue
                p = [params[i] for i in sel]
                g = [grads[i] for i in sel]
                m = [exp_avgs[i] for i in sel]
                v = [exp_avg_sqs[i] for i in sel]
                b = [backups[i] for i in sel] if from_backup else []
                engine = self._engine(p + g + m + v + b)
                if engine == "cpp" and all(x.dtype == y.dtype for x, y in zip(p, g)):
                    from ..ops import _cpp

                    _cpp.ops().adamw_step_([x.detach() for x in p], g, m, v, b, lr, beta1, beta2, eps, wd,
                                           bias_correction1, bias_correction2_sqrt)
                else:
                    _torch_adamw(p, g, m, v, b, lr, beta1, beta2, eps, wd, bias_correction1, bias_correction2_sqrt)


def _torch_adamw(params, grads, exp_avgs, exp_avg_sqs, backups, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt):
    """torch.optim.AdamW's single-tensor formulas (the fallback engine)."""
    if backups:
        torch._foreach_copy_(params, backups)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-(lr / bc1))
