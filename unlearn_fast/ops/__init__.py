"""Public functional ops of unlearn_fast: autograd functions with a Triton and a chunked PyTorch path."""
from .linear_ce import (
    IRMOutput,
    SequenceLoss,
    SequenceNLL,
    linear_cross_entropy,
    linear_cross_entropy_irm,
    sequence_loss,
    sequence_nll,
)
from ._torch_linear_ce import release_blocks as release_workspace
from .irm_losses import IRMObjective, irm_objective, irm_penalty
from .multi_tensor import (
    SAMState,
    fd_hvp_accumulate_,
    global_grad_norm,
    replicated_gradients,
    sam_perturb_,
    sam_restore_,
)
from .multi_tensor import BACKENDS as MULTI_TENSOR_BACKENDS

__all__ = [
    "IRMOutput",
    "SequenceNLL",
    "linear_cross_entropy",
    "linear_cross_entropy_irm",
    "irm_penalty",
    "IRMObjective",
    "irm_objective",
    "sequence_nll",
    "SequenceLoss",
    "sequence_loss",
    "release_workspace",
    "SAMState",
    "global_grad_norm",
    "sam_perturb_",
    "sam_restore_",
    "MULTI_TENSOR_BACKENDS",
    "fd_hvp_accumulate_",
    "replicated_gradients",
]
