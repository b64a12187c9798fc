"""Put a model's parameters (and their gradients) in one contiguous buffer per dtype.

After ``uf.flatten_parameters(model)`` every trainable parameter is a view of one flat buffer per
(device, dtype), in ``model.parameters()`` order, and its ``.grad`` is a view of a matching flat
gradient buffer (preallocated, zeroed). Autograd accumulates into an existing ``.grad`` in place, so
the gradients stay in the flat buffer as long as they are zeroed in place
(``optimizer.zero_grad(set_to_none=False)`` or ``FlatParameters.zero_grad()``), not set to None.
The multi-tensor ops then see the whole list as a few contiguous ranges and use single launches
over them (the Triton path, ``kernels/multi_tensor.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class FlatBuffer:
    """One (device, dtype) group: the flat weights, the flat gradients, and where each parameter lives."""

    data: torch.Tensor
    grad: torch.Tensor | None
    names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # start of each parameter in ``data``

    @property
    def numel(self) -> int:
        return self.data.numel()


@dataclass
class FlatParameters:
    """What ``flatten_parameters`` did: one ``FlatBuffer`` per (device, dtype)."""

    buffers: list[FlatBuffer]
    params: list[nn.Parameter]

    def zero_grad(self) -> None:
        """Zero the flat gradient buffers in place (keeps every ``.grad`` a view of them)."""
        for b in self.buffers:
            if b.grad is not None:
                b.grad.zero_()


@torch.no_grad()
def flatten_parameters(model: nn.Module, *, grads: bool = True) -> FlatParameters:
    """Make the trainable parameters of ``model`` views of one contiguous buffer per (device, dtype).

    ``grads=True`` also preallocates each ``.grad`` as a view of a zeroed flat gradient buffer.
    Parameters keep their identity (same ``nn.Parameter`` objects), so optimizers built before or
    after see the same tensors. Frozen parameters (requires_grad=False) are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    groups: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.device, p.dtype), []).append((name, p))
    buffers, flat_params = [], []
    for (device, dtype), named in groups.items():
        total = sum(p.numel() for _, p in named)
        data = torch.empty(total, dtype=dtype, device=device)
        grad = torch.zeros(total, dtype=dtype, device=device) if grads else None
        buf = FlatBuffer(data, grad)
        offset = 0
        for name, p in named:
            n = p.numel()
            data[offset:offset + n].copy_(p.detach().reshape(-1))
            old_grad = p.grad
            p.data = data[offset:offset + n].view(p.shape)
            if grad is not None:
                g = grad[offset:offset + n].view(p.shape)
                if old_grad is not None:
                    g.copy_(old_grad)
                p.grad = g
            buf.names.append(name)
            buf.offsets.append(offset)
            flat_params.append(p)
            offset += n
        buffers.append(buf)
    return FlatParameters(buffers, flat_params)


def _runs(tensors):
    """Split a list into maximal runs of tensors that lie back to back in one storage.

    Returns [(flat view over the run, number of tensors)] or None if a tensor is not contiguous.
    """
    runs = []
    start = prev = None
    count = total = 0
    for t in tensors:
        if not t.is_contiguous():
            return None
        if (prev is not None and t.untyped_storage().data_ptr() == prev.untyped_storage().data_ptr()
                and t.dtype == prev.dtype and t.storage_offset() == prev.storage_offset() + prev.numel()):
            count += 1
            total += t.numel()
        else:
            if start is not None:
                runs.append((start, total, count))
            start, total, count = t, t.numel(), 1
        prev = t
    if start is not None:
        runs.append((start, total, count))
    return [(s.detach().as_strided((n,), (1,), s.storage_offset()), c) for s, n, c in runs]


def flat_groups(tensors, others=None, *, max_runs: int = 8):
    """[(flat tensors, flat others)] covering the lists in a few contiguous runs, or None.

    None when a tensor is not contiguous, when the lists need more than ``max_runs`` runs (they are
    not really flat), or when ``others`` is not laid out run for run like ``tensors``.
    """
    tensors = list(tensors)
    if not tensors:
        return []
    runs = _runs(tensors)
    if runs is None or len(runs) > max_runs:
        return None
    if others is None:
        return [(flat, None) for flat, _ in runs]
    other_runs = _runs(list(others))
    if other_runs is None or [c for _, c in other_runs] != [c for _, c in runs]:
        return None
    return [(a, b) for (a, _), (b, _) in zip(runs, other_runs)]


def flat_like(tensors) -> list[torch.Tensor]:
    """Fresh tensors shaped like ``tensors``, views of one new buffer per run of ``tensors``."""
    tensors = list(tensors)
    runs = _runs(tensors) or [(t.reshape(-1), 1) for t in tensors]
    out, i = [], 0
    for flat, count in runs:
        buf = torch.empty_like(flat)
        offset = 0
        for t in tensors[i:i + count]:
            out.append(buf[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        i += count
    return out
