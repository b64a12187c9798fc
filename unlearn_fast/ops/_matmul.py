"""Matmuls with low-precision operands and fp32 results, the way cuBLAS does them on a GPU.

On CUDA, bf16/fp16 operands go to cuBLAS as they are (tensor cores, fp32 accumulation) and the
result is written in fp32 (``out_dtype``, torch ≥ 2.8): no fp32 copy of the [V, H] weight, and
the d weight sum over chunks stays in fp32. Elsewhere (the CPU, where tests force the CUDA
code path) the same numbers are formed by upcasting the operands: a bf16×bf16 product is exact
in fp32, so the only difference is the order of the fp32 sums.
"""
from __future__ import annotations

import torch


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype in which the chunked paths multiply: the input's on CUDA (bf16/fp16 tensor cores, fp32
    accumulation), fp32 on the CPU (which has no fast bf16 GEMM everywhere and keeps its numbers), fp64 for fp64."""
    if dtype == torch.float64:
        return torch.float64
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return dtype
    return torch.float32


_TORCH_HAS_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 8)  # mm/addmm out_dtype


_out_dtype_failed: str | None = None  # why cuBLAS's fp32-output GEMM was refused once (then not retried)


def _fp32_out_supported(a: torch.Tensor) -> bool:
    return (_TORCH_HAS_OUT_DTYPE and _out_dtype_failed is None and a.device.type == "cuda"
            and a.dtype in (torch.bfloat16, torch.float16))


def _refused(exc: Exception) -> None:
    global _out_dtype_failed
    import warnings

    _out_dtype_failed = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"torch.mm/addmm with out_dtype=float32 failed ({_out_dtype_failed}); the chunked linear CE "
                  "falls back to upcasting its matmul operands (correct, slower)", RuntimeWarning, stacklevel=3)


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool = False,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """out ← a @ b (+ bias) or, with ``accumulate``, out ← out + a @ b; ``out`` may be wider than a and b (fp32)."""
    if a.dtype == out.dtype:
        if accumulate:
            return out.addmm_(a, b)
        if bias is not None:
            return torch.addmm(bias.to(out.dtype), a, b, out=out)
        return torch.mm(a, b, out=out)
    if _fp32_out_supported(a):
        try:
            if accumulate:
                return torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            if bias is not None:
                return torch.addmm(bias.to(out.dtype).expand_as(out), a, b, out_dtype=out.dtype, out=out)
            return torch.mm(a, b, out_dtype=out.dtype, out=out)
        except (RuntimeError, TypeError) as exc:  # raised before any write: out is intact
            _refused(exc)
    a32, b32 = a.to(out.dtype), b.to(out.dtype)  # emulation: exact products, fp32 sums
    if accumulate:
        return out.addmm_(a32, b32)
    if bias is not None:
        return torch.addmm(bias.to(out.dtype), a32, b32, out=out)
    return torch.mm(a32, b32, out=out)
