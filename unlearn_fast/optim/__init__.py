"""Optimizer-side pieces built on the multi-tensor engine: SAM (forget-only, SPEC §1.3),
finite-difference Hessian-vector products (SPEC §1.2, §1.4) and a fused AdamW that can absorb
the SAM restore."""
from .adamw import FusedAdamW
from .sam import SAM, fd_hvp, gradient_penalty_grad, restore_from_masters

__all__ = ["SAM", "FusedAdamW", "fd_hvp", "gradient_penalty_grad", "restore_from_masters"]
