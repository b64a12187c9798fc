"""NPO's reference NLL, computed once before training (SPEC §1.1): no reference model during training."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .. import ops
from .._files import replace_file
from ..data.collate import collate
from .lm import final_hidden, lm_parts, shift


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24


def _checksum(t: torch.Tensor) -> tuple[int, int]:
    """Exact integer checksums of a tensor's bits, computed on its device: any changed entry changes them.

    (A sample of the values would miss a change elsewhere and serve a stale cache.) Sums of the
    raw bits, plain and weighted by position (mod a prime), in int64 (wrap-around is deterministic).
    """
    flat = t.detach().contiguous().reshape(-1)
    int_dtype = _INT_OF_SIZE.get(flat.element_size())
    bits = flat.view(int_dtype) if int_dtype is not None else flat.view(torch.uint8)
    plain = weighted = 0
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start:start + _CHUNK].to(torch.int64)
        position = torch.arange(start, start + part.numel(), device=part.device) % 65521 + 1
        plain += int(part.sum())
        weighted += int((part * position).sum())
    return plain, weighted


def fingerprint(model: nn.Module, examples) -> str:
    """sha256 over the model's tensor names, shapes, dtypes and exact checksums of all values, and the data's tokens."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{_checksum(t)}".encode())
    for ex in examples:
        for key in ("input_ids", "labels"):
            digest.update(torch.as_tensor(ex[key]).to(torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


@torch.no_grad()
def reference_nll(model: nn.Module, examples, *, batch_size: int = 8, cache_dir=None,
                  pad_token_id: int = 0) -> torch.Tensor:
    """Summed answer-token NLL of every example under ``model`` (fp32 [len(examples)], on the CPU).

    ``examples``: a sequence of dicts with 1-D ``input_ids`` and ``labels`` (aligned, -100 = no loss).
    With ``cache_dir`` the result is stored as safetensors keyed by a fingerprint of model and data,
    and read back on the next call with the same model and data.
    """
    examples = list(examples)
    path = None
    if cache_dir is not None:
        from safetensors.torch import load_file, save_file

        key = fingerprint(model, examples)
        path = Path(cache_dir) / f"ref_nll-{key[:24]}.safetensors"
        if path.exists():
            return load_file(str(path))["ref_nll"]
    was_training = model.training
    model.eval()
    parts = lm_parts(model)
    device = parts.head_weight.device
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id, device)
            hidden, labels = shift(final_hidden(parts, batch), batch["labels"])
            nll, _ = ops.sequence_nll(hidden, parts.head_weight, labels, linear_bias=parts.head_bias)
            out.append(nll.float().cpu())
    finally:
        model.train(was_training)
        ops.release_workspace()  # a one-off pass before training: it keeps no logits block resident
    result = torch.cat(out) if out else torch.zeros(0)
    if path is not None:
        with replace_file(path) as tmp:
            save_file({"ref_nll": result.contiguous()}, str(tmp), metadata={"fingerprint": key})
    return result
