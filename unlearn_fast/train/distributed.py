"""Data parallelism for the trainer (and the transformers mixin): replicated weights, averaged gradients.

Why not ``torch.nn.parallel.DistributedDataParallel``: the objectives call the
model's body directly (never ``model.forward``) and the regularisers take
gradients with ``torch.autograd.grad`` (SAM, GP, CR, parameter IRM); DDP's
reducer sees neither. Instead a hook on every trainable parameter averages its
gradient over the processes the moment autograd produces it, in ``backward``
and in ``autograd.grad`` alike. Every process therefore holds the gradient of
the global batch at every point of the step — in particular the SAM direction
g/‖g‖ is the global one, exactly as in one process with the whole batch.

The multi-tensor ops all-reduce the squared norm (the right thing for sharded
gradients). Here gradients are already replicated, so inside ``data_parallel``
that reduction is switched off; otherwise the norm would be √world too large.

Per-process losses are means over the local batch; their average is the global
mean when every process has the same number of sequences (NPO, SimNPO) or of
label tokens (token-mean CE) — equal-length batches, as in the tests. Terms that
are not means of per-example terms are computed per process and averaged: the
ILU logit penalty (Σ_e s_e² of each process's environment batches) and NPO's
``batch_mean`` form. The finite-difference regularisers (SAM, GP, CR, parameter
IRM) see the global gradient and match one process.

FSDP2 (sharded parameters) is not supported by the trainer yet.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import ops


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1); gloo on the CPU, nccl on CUDA."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return True


@torch.no_grad()
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Make every process start from process ``src``'s weights and buffers."""
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src)


def _average_hook(world: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad.div_(world)

    return hook


@contextlib.contextmanager
def data_parallel(params):
    """Inside the block every gradient of ``params`` is the average over processes (no-op in one process)."""
    world = world_size()
    if world == 1:
        yield
        return
    handles = [p.register_hook(_average_hook(world)) for p in params]
    try:
        with ops.replicated_gradients():  # averaged gradients: their norm needs no further reduction
            yield
    finally:
        for h in handles:
            h.remove()
