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

FSDP2 (``parallel: fsdp``): ``shard_model`` applies ``fully_shard`` to every
decoder layer and to the root. Between steps each process holds only its shard
of the weights, gradients and optimizer state (DTensors sharded on dim 0; the
optimizer steps the local shards, ``FSDPSharding.local_params``). A step runs
in one of two ways:

* layer by layer (objectives that only call ``backward``: GA, GradDiff, NPO,
  SimNPO, with the ILU logit penalty): the objectives never call the root's
  forward (they run the body and read ``lm_head.weight`` directly), so the
  trainer gathers the root's own weights (embeddings, final norm, LM head) for
  the step; FSDP gathers each decoder layer for its forward and backward and
  frees it after. Gradients are FSDP's: layers reduce-scatter (average) at the
  end of their backward, the root's weights (whose gradient the fused loss
  writes) at the end of each backward pass.
* gathered (SAM, GP, RS, CR, parameter IRM, RMU): these take gradients with
  ``torch.autograd.grad`` with respect to ``model.parameters()`` and move the
  weights in place, neither of which survives a layer being freed and gathered
  again mid-step. The whole model is gathered for the step, gradients are
  averaged by the hooks above (so the SAM direction is the global one), and at
  the end each process keeps its shard of them. Peak memory inside such a step
  is that of data parallelism; FSDP still saves the optimizer state, fp32
  master weights and gradients between steps.

Gradient clipping needs the norm over all shards: ``ops.global_grad_norm``
all-reduces the squared norm (outside ``replicated_gradients``). Checkpoints
hold full tensors (the same files as without sharding): every process
gathers, process 0 writes. In one process ``parallel: fsdp`` changes nothing.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .. import ops
from ..objectives.lm import decoder_layers


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


# -- FSDP2 ------------------------------------------------------------------------------------------

def sharded_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one (``objectives.lm.decoder_layers``)."""
    try:
        return list(decoder_layers(model))
    except TypeError as exc:
        raise ValueError(f"parallel=fsdp: {exc}") from None


class FSDPSharding:
    """A model under FSDP2, its trainable parameters' local shards, and full <-> shard conversions.

    ``local_params`` are plain leaf tensors that share storage with the sharded parameters: the
    optimizer steps them (and reads their ``.grad``), the next step all-gathers the result.

    ``layerwise=False``: a step runs inside ``gathered()`` (whole model gathered, gradients averaged
    by ``data_parallel`` hooks, then cut into shards by ``gradients_to_shards``): needed whenever the
    objective takes ``autograd.grad`` or moves weights in place. ``layerwise=True`` (objectives that
    only call ``backward``): a step runs inside ``layerwise_step()``: FSDP all-gathers each decoder
    layer for its forward and again for its backward, frees it after each, and reduce-scatters
    (averages) its gradient; the root's own weights (embeddings, final norm, LM head, read directly
    by the fused loss) stay gathered for the step and FSDP reduce-scatters their gradients at the
    end of each backward.
    """

    def __init__(self, model: torch.nn.Module, *, layerwise: bool = False):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        for layer in sharded_layers(model):
            fully_shard(layer)
        fully_shard(model)
        self.model, self.layerwise = model, layerwise
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            layer = layerwise and unit is not model
            unit.set_reshard_after_forward(layer, recurse=False)
            unit.set_reshard_after_backward(layer, recurse=False)  # the root stays gathered for the whole step
            unit.set_requires_gradient_sync(layerwise, recurse=False)
        self._init_root()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        sharded = dict(model.named_parameters())
        self.sharded = [sharded[n] for n in self.names]
        self.local_params = [torch.nn.Parameter(p.to_local().detach(), requires_grad=True) for p in self.sharded]

    @torch.no_grad()
    def _init_root(self) -> None:
        # FSDP2 makes the first module to run forward the root; the objectives never call the root's
        # forward, so run it once on one token here (it is the root that knows every layer's state).
        device = self.local_device()
        self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        self.reshard()

    def local_device(self) -> torch.device:
        p = next(self.model.parameters())
        return p.to_local().device if hasattr(p, "to_local") else p.device

    def reshard(self) -> None:
        for unit in self.units:
            unit.reshard()

    @contextlib.contextmanager
    def gathered(self):
        """Inside the block the model holds full, plain weights (one all-gather per unit); freed after."""
        for unit in self.units:
            unit.unshard()
        try:
            yield
        finally:
            self.reshard()

    @contextlib.contextmanager
    def step(self):
        """The gradient computation of one optimizer step (all its micro-batches). Yields the parameters whose
        gradients the caller must average over processes (``data_parallel``), or None when FSDP reduces them
        (layer by layer); on leaving, ``local_params[i].grad`` holds this process's shard of the average."""
        if self.layerwise:
            with self.layerwise_step():
                yield None
            return
        with self.gathered():
            params = self.full_parameters()
            yield params
            self.gradients_to_shards(params)

    @contextlib.contextmanager
    def layerwise_step(self):
        """The root's weights gathered for the block; after it, FSDP's averaged gradient shards moved to
        ``local_params`` (the layers gather, free and reduce-scatter through FSDP's own hooks)."""
        self.model.unshard()  # not recursive: the root's own parameters only
        try:
            yield
        finally:
            self.model.reshard()
        with torch.no_grad():
            for local, sharded in zip(self.local_params, self.sharded):
                if sharded.grad is not None:
                    _add_grad(local, sharded.grad.to_local())
                    sharded.grad = None

    def full_parameters(self) -> list[torch.Tensor]:
        """The gathered trainable parameters, in ``local_params`` order (only inside ``gathered()``)."""
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    @torch.no_grad()
    def gradients_to_shards(self, full_params) -> None:
        """Each process keeps its shard of the (already averaged) full gradients; the full ones are dropped."""
        for i, (local, full) in enumerate(zip(self.local_params, full_params)):
            if full.grad is None:
                continue
            _add_grad(local, self.shard(i, full.grad).to(local.dtype))
            full.grad = None

    def shard(self, i: int, full: torch.Tensor) -> torch.Tensor:
        """This process's shard of a full tensor shaped like trainable parameter ``i`` (no communication)."""
        from torch.distributed.tensor import distribute_tensor

        ref = self.sharded[i]
        return distribute_tensor(full.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                                 src_data_rank=None).to_local()

    def full(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """The full tensor from every process's shard shaped like parameter ``i`` (a collective: all call it)."""
        from torch.distributed.tensor import DTensor

        ref = self.sharded[i]
        dt = DTensor.from_local(local.detach().contiguous(), ref.device_mesh, ref.placements, run_check=False,
                                shape=ref.shape, stride=ref.stride())
        return dt.full_tensor()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every model tensor gathered (a collective: all processes call it); tied names share one tensor."""
        full: dict[int, torch.Tensor] = {}
        out = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            if id(value) not in full:
                full[id(value)] = (value.full_tensor() if hasattr(value, "full_tensor") else value).detach()
            out[name] = full[id(value)]
        return out

    @torch.no_grad()
    def load_full_state_dict(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy full tensors into this process's shards; returns the model tensors found under none of their names."""
        from torch.distributed.tensor import distribute_tensor

        names: dict[int, list[str]] = {}
        loaded = set()
        for name, value in self.model.state_dict(keep_vars=True).items():
            names.setdefault(id(value), []).append(name)
            if name not in tensors or id(value) in loaded:
                continue
            full = tensors[name].to(dtype=value.dtype)
            if hasattr(value, "to_local"):
                shard = distribute_tensor(full, value.device_mesh, value.placements, src_data_rank=None).to_local()
                value.to_local().copy_(shard)
            else:
                value.copy_(full)
            loaded.add(id(value))
        return [group[0] for key, group in names.items() if key not in loaded]


def _add_grad(local: torch.Tensor, grad: torch.Tensor) -> None:
    """local.grad += grad (micro-batches accumulate), as an owned copy on the first one."""
    local.grad = grad.clone() if local.grad is None else local.grad.add_(grad)


def shard_model(model: torch.nn.Module, *, layerwise: bool = False) -> FSDPSharding:
    """FSDP2 on ``model`` (every decoder layer, then the root) over the default process group."""
    return FSDPSharding(model, layerwise=layerwise)
