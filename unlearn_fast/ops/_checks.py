"""Input validation shared by the public ops.

Every check runs before any kernel launches and raises a ValueError/TypeError
that names the argument and what was expected.
"""
from __future__ import annotations

import os

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "triton", "triton_chunked", "torch")


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Pick "triton_chunked", "triton" or "torch". ``None`` reads ``UNLEARN_FAST_BACKEND`` (default "auto").

    "auto" is "triton_chunked" on CUDA tensors (except float64: cuBLAS chunks and one Triton row
    kernel, no atomics) and the torch path otherwise. "triton" is the fully fused kernel pair
    (logits never leave registers, fp32 atomics in the backward).
    """
    if backend is None:
        backend = os.environ.get("UNLEARN_FAST_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and _triton_available()
        return "triton_chunked" if use_triton else "torch"
    if backend in ("triton", "triton_chunked"):
        if not _triton_available():
            raise RuntimeError(f"backend={backend!r} needs the triton package: pip install 'unlearn_fast[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend={backend!r} on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set before triton is imported); use backend='torch' on the CPU"
            )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {items[0][0]} is on {device}; all tensors must share a device")
    return device


def flatten_tokens(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    ignore_index: int,
    **per_token: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Validate an op's inputs; return input as [N, H], target as [N] int64 and per-token ids as [N].

    Target values must be ``ignore_index`` or lie in [0, V).
    """
    check_float("input", input)
    check_float("linear_weight", linear_weight)
    check_index("target", target)
    if linear_bias is not None:
        check_float("linear_bias", linear_bias)
    for name, t in per_token.items():
        check_index(name, t)
    check_same_device(input=input, linear_weight=linear_weight, target=target, linear_bias=linear_bias, **per_token)
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be [N, H] or [B, T, H], got shape {tuple(input.shape)}")
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be [V, H], got shape {tuple(linear_weight.shape)}")
    vocab, hidden = linear_weight.shape
    if input.shape[-1] != hidden:
        raise ValueError(
            f"input's last dimension ({input.shape[-1]}) must equal linear_weight's hidden size ({hidden})"
        )
    if linear_bias is not None and tuple(linear_bias.shape) != (vocab,):
        raise ValueError(f"linear_bias must have shape ({vocab},), got {tuple(linear_bias.shape)}")
    token_shape = tuple(input.shape[:-1])
    for name, t in (("target", target), *per_token.items()):
        if tuple(t.shape) != token_shape:
            raise ValueError(f"{name} must have shape {token_shape} (input's leading dims), got {tuple(t.shape)}")
    target = target.reshape(-1).long()
    if target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ValueError(f"target values must be in [0, {vocab}) or ignore_index={ignore_index}, found {value}")
    flat = {k: v.reshape(-1).long() for k, v in per_token.items()}
    return input.reshape(-1, hidden), target, flat


def check_ids(name: str, ids: torch.Tensor, count: int, count_name: str, valid: torch.Tensor) -> None:
    """ids of non-ignored tokens must lie in [0, count)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{count_name} must be a positive int, got {count!r}")
    used = ids[valid]
    if used.numel() and bool(((used < 0) | (used >= count)).any()):
        bad = used[(used < 0) | (used >= count)][0]
        raise ValueError(f"{name} ids must be in [0, {count_name}={count}), found {int(bad)}")
