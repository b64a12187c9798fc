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


# -- the CPU's fp32 GEMM engine for the linear-CE head ------------------------------------------------------
# torch's CPU matmuls go to MKL. On AMD processors MKL's sgemm runs well below the machine (measured on a
# Zen 5 EPYC, 1 thread, the head's shapes: 77-95 GFLOP/s), where oneDNN's fp32 GEMM, which picks its kernels
# by the ISA and not by the vendor, gives 114-196 GFLOP/s (logits, d input) and 140-150 (d weight in blocks).
# UNLEARN_FAST_CPU_GEMM=auto (default) takes oneDNN on AMD and MKL elsewhere; mkl | onednn force one.
_CPU_GEMM_CHOICES = ("auto", "mkl", "onednn")
_onednn_state: dict = {}  # "use": the resolved choice, "why": why oneDNN is off where it was asked for


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_gemm_engine() -> str:
    """"onednn" or "mkl": the engine of the CPU fp32 linear-CE head matmuls (see UNLEARN_FAST_CPU_GEMM)."""
    if "use" not in _onednn_state:
        import os

        asked = os.environ.get("UNLEARN_FAST_CPU_GEMM", "auto")
        if asked not in _CPU_GEMM_CHOICES:
            raise ValueError(f"UNLEARN_FAST_CPU_GEMM must be one of {_CPU_GEMM_CHOICES}, got {asked!r}")
        want = asked == "onednn" or (asked == "auto" and _cpu_vendor() == "AuthenticAMD")
        use = False
        if want:
            try:  # the op is torch's own (mkldnn::_linear_pointwise); checked once against torch.mm
                x, w = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3)
                use = bool(torch.equal(onednn_linear(x, w), x @ w.T))
                if not use:
                    _onednn_state["why"] = "its result differed from torch.mm on a probe"
            except (RuntimeError, AttributeError) as exc:
                _onednn_state["why"] = f"{type(exc).__name__}: {exc}"
        if asked == "onednn" and not use:
            import warnings

            warnings.warn(f"UNLEARN_FAST_CPU_GEMM=onednn, but oneDNN's linear is unusable here "
                          f"({_onednn_state['why']}): the CPU head matmuls stay on MKL", RuntimeWarning, stacklevel=2)
        _onednn_state["use"] = "onednn" if use else "mkl"
    return _onednn_state["use"]


def use_onednn(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a CPU head matmul in ``dtype`` goes to oneDNN (fp32 only: fp64 stays on MKL)."""
    return device.type == "cpu" and dtype == torch.float32 and cpu_gemm_engine() == "onednn"


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ (+ bias) by oneDNN, a new [rows, out] tensor (``weight`` [out, in], any strides)."""
    if x.numel() == 0 or weight.numel() == 0:  # oneDNN has no primitive for an empty product
        out = x.new_zeros(x.shape[0], weight.shape[0])
        return out.add_(bias) if bias is not None else out
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def dh_into(out: torch.Tensor, dz: torch.Tensor, weight: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """out ← dz @ weight (or out += it): d input of a logits block, by oneDNN where ``use_onednn`` says so."""
    if use_onednn(dz.dtype, dz.device) and out.dtype == dz.dtype:
        part = onednn_linear(dz, weight.T)
        return out.add_(part) if accumulate else out.copy_(part)
    return mm_into(out, dz, weight, accumulate=accumulate)


# vocabulary rows of d weight per oneDNN call: its [rows, H] result (and oneDNN's copy of the strided dzᵀ rows)
# are small temporaries; 1024-8192 rows ran at the same speed on Zen 5
_DW_ROWS = 1024


def dw_into(out: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, *, accumulate: bool = False) -> torch.Tensor:
    """out ← dzᵀ @ h (or out += it): d weight [V, H] of a logits block. With oneDNN, in blocks of vocabulary
    rows, each added into ``out`` (no [V, H] temporary); MKL's addmm elsewhere."""
    if use_onednn(dz.dtype, dz.device) and out.dtype == dz.dtype:
        for start in range(0, out.shape[0], _DW_ROWS):
            rows = slice(start, start + _DW_ROWS)
            part = None  # freed before the next block's exists
            part = onednn_linear(dz[:, rows].T, h.T)
            if accumulate:
                out[rows].add_(part)
            else:
                out[rows].copy_(part)
        return out
    return mm_into(out, dz.T, h, accumulate=accumulate)
