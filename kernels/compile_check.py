"""Compile gate: every GPU kernel of the package built for named CUDA targets, no GPU needed.

    python -m unlearn_fast.kernels.compile_check --json PATH     (exit 1 on any failure)

Triton: every ``@triton.jit`` kernel with every dtype, constexpr flag and block configuration its
launch helper can choose on CUDA (read from the helpers' own ``config``/``flags`` functions), compiled
by ``triton.compile`` for sm_80, sm_89 and sm_90. Registers and spills come from the ptxas log of
that build, shared memory from the kernel's metadata. A row fails on a compile error, on shared
memory above the target's per-block limit, or on any spill in a bf16/fp16 configuration (fp32
configurations may spill a little: they are the slow path anyway, and the row still records it).

CUDA C++: csrc/multi_tensor_cuda.cu compiled for sm_80 and sm_90 by nvcc with ``-Xptxas -v``
(device code only), 0 spills required. The CPU torch wheel lacks CUDA library headers that
ATen/cuda/CUDAContext.h pulls in (cuSPARSE, cuBLAS, cuSOLVER) and c10's generated
cuda_cmake_macros.h: both are stood in for from a temporary directory (the kernels use neither).
Without nvcc that part is skipped with a message (a row with ok=null), not failed.

The builds run in a pool of processes with a fresh Triton cache (a cached build runs no ptxas and
would report no registers). TRITON_INTERPRET must be off in them: it is removed from the
environment before triton is imported.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# per-block shared memory a kernel may use (opt-in maximum), bytes
ARCHS = {"sm_80": (80, 166912), "sm_89": (89, 101376), "sm_90": (90, 232448)}
NVCC_ARCHS = ("sm_80", "sm_90")
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Build:
    """One kernel variant: what ``triton.compile`` needs, and whether spills fail it."""

    kernel: str  # module.function
    variant: str
    signature: dict
    constexprs: dict
    num_warps: int
    low_precision: bool
    attrs: dict = field(default_factory=dict)


def _torch_dtype(name):
    import torch

    return getattr(torch, _DTYPES[name])


def _linear_ce_builds():
    from unlearn_fast.kernels import linear_ce as k

    out = []
    for dt in _DTYPES:
        cfg = dict(k.config(_torch_dtype(dt), interpret=False))
        warps = cfg.pop("num_warps")
        bwd_cfg = dict(k.config(_torch_dtype(dt), interpret=False, backward=True))
        bwd_warps = bwd_cfg.pop("num_warps")
        flags = k.flags(_torch_dtype(dt), interpret=False)
        ptr = f"*{dt}"
        strides = dict(stride_hn="i32", stride_hd="i32", stride_wv="i32", stride_wd="i32")
        for bias in (False, True):
            sig = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr, y_ptr="*i64", lse_ptr="*fp32", zy_ptr="*fp32",
                       ez_ptr="*fp32", N="i32", V="i32", D="i32", ignore_index="i32", **strides)
            out.append(Build("linear_ce._linear_ce_fwd_kernel", f"{dt} bias={int(bias)}", sig,
                             dict(HAS_BIAS=bias, **flags, **cfg), warps, dt != "fp32"))
            for has_b in (False, True):
                sig = dict(h_ptr=ptr, w_ptr=ptr, b_ptr=ptr, y_ptr="*i64", lse_ptr="*fp32", a_ptr="*fp32",
                           bcoef_ptr="*fp32", c_ptr="*fp32", dh_ptr="*fp32", dw_ptr="*fp32", db_ptr="*fp32",
                           N="i32", V="i32", D="i32", **strides)
                out.append(Build("linear_ce._linear_ce_bwd_kernel", f"{dt} bias={int(bias)} irm={int(has_b)}", sig,
                                 dict(HAS_BIAS=bias, HAS_B=has_b, **flags, **bwd_cfg), bwd_warps, dt != "fp32"))
    return out


def _rows_builds():
    from unlearn_fast.kernels import linear_ce_rows as k

    # (STATS, WANT_EZ, GRAD, HAS_B) as rows_ can call it: statistics only (with or without E_p[z]),
    # statistics and gradient in one launch, gradient only (lse known)
    modes = [(True, False, False, False), (True, True, False, False),
             (True, False, True, False), (True, True, True, False), (True, True, True, True),
             (True, False, True, True), (False, False, True, False), (False, False, True, True)]
    out = []
    for dt in _DTYPES:
        cfg = dict(k.config(_torch_dtype(dt), interpret=False))
        warps = cfg.pop("num_warps")
        sig = dict(z_ptr=f"*{dt}", y_ptr="*i64", lse_ptr="*fp32", zy_ptr="*fp32", ez_ptr="*fp32", a_ptr="*fp32",
                   b_ptr="*fp32", c_ptr="*fp32", V="i32", stride_z="i32", ignore_index="i32")
        for stats, ez, grad, has_b in modes:
            variant = f"{dt} stats={int(stats)} ez={int(ez)} grad={int(grad)} irm={int(has_b)}"
            out.append(Build("linear_ce_rows._rows_kernel", variant, sig,
                             dict(STATS=stats, WANT_EZ=ez, GRAD=grad, HAS_B=has_b, **cfg), warps, dt != "fp32"))
    return out


def _multi_tensor_builds():
    from unlearn_fast.kernels import multi_tensor as k

    block, tiles, warps = k.cuda_launch()
    out = []
    for dt in _DTYPES:
        p = f"*{dt}"
        low = dt != "fp32"
        for weighted in (False, True):
            out.append(Build("multi_tensor._squared_norm_kernel", f"{dt} weighted={int(weighted)}",
                             dict(x_ptr=p, w_ptr=p, partial_ptr="*fp32", n="i32"),
                             dict(WEIGHTED=weighted, BLOCK=block, TILES=tiles), warps, low))
        for adaptive in (False, True):
            out.append(Build("multi_tensor._perturb_kernel", f"{dt} adaptive={int(adaptive)}",
                             dict(p_ptr=p, g_ptr=p, b_ptr=p, scale_ptr="*fp32", n="i32"),
                             dict(ADAPTIVE=adaptive, BLOCK=block), warps, low))
        out.append(Build("multi_tensor._copy_kernel", dt, dict(dst_ptr=p, src_ptr=p, n="i32"), dict(BLOCK=block), warps,
                         low))
        for acc in sorted({dt, "fp32"}):  # fp32 accumulators of low-precision gradients too
            for base in (False, True):
                out.append(Build("multi_tensor._fd_hvp_kernel", f"acc={acc} grad={dt} base={int(base)}",
                                 dict(a_ptr=f"*{acc}", gm_ptr=p, g0_ptr=p, c_ptr="*fp32", n="i32"),
                                 dict(HAS_BASE=base, BLOCK=block), warps, low))
    return out


def all_builds(only: str | None = None) -> list[Build]:
    builds = _linear_ce_builds() + _rows_builds() + _multi_tensor_builds()
    return [b for b in builds if only is None or only in b.kernel]


def _no_interpreter():
    was = os.environ.pop("TRITON_INTERPRET", None)
    if was == "1" and any(m.startswith("unlearn_fast.kernels.") and m != __name__ for m in sys.modules):
        raise RuntimeError("the compile gate needs real (not interpreted) kernels: run it in a process where "
                           "TRITON_INTERPRET is unset before the kernels are imported")


def _init_worker(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's log printed to stdout (captured per build)
    _no_interpreter()


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> tuple[int | None, int | None]:
    """(max registers, max spill bytes stored+loaded) over the functions of a ptxas -v log."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [int(a) + int(b) for a, b in _PTXAS_SPILLS.findall(log)]
    return (max(regs) if regs else None), (max(spills) if spills else None)


def compile_build(build: Build, arch: str, keep_ir: bool = False) -> dict:
    """Compile one variant for one target; the gate's row (with the TTIR when ``keep_ir``)."""
    import importlib

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability, smem_limit = ARCHS[arch]
    module, name = build.kernel.split(".")
    fn = getattr(importlib.import_module(f"unlearn_fast.kernels.{module}"), name)
    row = dict(kernel=build.kernel, variant=build.variant, arch=arch, ok=False, registers=None, spills=None,
               shared_bytes=None, smem_limit=smem_limit, error=None, seconds=None)
    start = time.perf_counter()
    signature = {**build.signature, **{k: "constexpr" for k in build.constexprs}}
    src = ASTSource(fn, signature=signature, constexprs=build.constexprs, attrs=build.attrs)
    log = io.StringIO()
    try:
        if hasattr(knobs.nvidia, "dump_ptxas_log"):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v output goes to stdout: captured here
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                      options=dict(num_warps=build.num_warps))
    except Exception as exc:  # a compile error is a failed row, not a crash of the gate
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        row["seconds"] = round(time.perf_counter() - start, 2)
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["registers"], row["spills"] = parse_ptxas(log.getvalue())
    row["shared_bytes"] = int(compiled.metadata.shared)
    problems = []
    if row["shared_bytes"] > smem_limit:
        problems.append(f"shared memory {row['shared_bytes']} B > {smem_limit} B")
    if build.low_precision and row["spills"]:
        problems.append(f"spills {row['spills']} B in a low-precision configuration")
    if row["registers"] is None:
        problems.append("no ptxas log (registers unknown)")
    row["ok"] = not problems
    row["error"] = "; ".join(problems) or None
    if keep_ir:
        row["ttir"] = compiled.asm["ttir"]
    return row


def _compile_star(args):
    return compile_build(*args)


def run_triton(builds, archs, workers: int | None = None) -> list[dict]:
    jobs = [(b, a) for b in builds for a in archs]
    with tempfile.TemporaryDirectory(prefix="uf-compile-gate-") as cache:
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        if workers <= 1:
            _init_worker(cache)
            return [compile_build(b, a) for b, a in jobs]
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cache,)) as pool:
            return list(pool.map(_compile_star, jobs, chunksize=1))


# -- CUDA C++ ---------------------------------------------------------------------------------------

_STAND_INS = {
    # The real one includes cusparse.h, cublas_v2.h, cublasLt.h and cusolverDn.h (absent without the CUDA
    # math libraries) to declare library handles; the kernels need only the stream functions.
    "ATen/cuda/CUDAContext.h": "#pragma once\n#include <ATen/Context.h>\n#include <c10/cuda/CUDAFunctions.h>\n"
                               "#include <c10/cuda/CUDAStream.h>\n",
    # generated by a CUDA build of torch (absent from the CPU wheel): one line
    "c10/cuda/impl/cuda_cmake_macros.h": "#define C10_CUDA_BUILD_SHARED_LIBS\n",
}


def cuda_source() -> Path:
    from unlearn_fast.ops._cpp import source_dir

    return source_dir() / "multi_tensor_cuda.cu"


def run_nvcc(archs=NVCC_ARCHS) -> list[dict]:
    """nvcc -fatbin (device code only) for each target at once; one row per target (max over kernels)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("compile_check: nvcc not found: the CUDA C++ check is SKIPPED (not failed)", file=sys.stderr)
        return [dict(kernel="csrc/multi_tensor_cuda.cu", variant="all", arch=a, ok=None, registers=None, spills=None,
                     shared_bytes=None, error="skipped: nvcc not found", seconds=None) for a in archs]
    from torch.utils.cpp_extension import include_paths

    with tempfile.TemporaryDirectory(prefix="uf-nvcc-") as tmp:
        stand = Path(tmp) / "stand-ins"
        for rel, text in _STAND_INS.items():
            (stand / rel).parent.mkdir(parents=True, exist_ok=True)
            (stand / rel).write_text(text)
        includes = [f"-I{stand}"] + [f"-I{p}" for p in include_paths()]
        gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
        cmd = [nvcc, "-fatbin", str(cuda_source()), "-o", str(Path(tmp) / "mt.fatbin"), "-std=c++17", "-O3", "-w",
               "-Xptxas", "-v", *gencode, *includes]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
    log = proc.stdout + proc.stderr
    rows = []
    for a in archs:
        # ptxas prints "Compiling entry function '...' for 'sm_90'" before each function's lines
        parts = re.split(r"Compiling entry function '[^']*' for '(sm_\d+)'", log)
        arch_log = "".join(parts[i + 1] for i in range(1, len(parts) - 1, 2) if parts[i] == a)
        regs, spills = parse_ptxas(arch_log)
        functions = sum(1 for i in range(1, len(parts) - 1, 2) if parts[i] == a)
        ok = proc.returncode == 0 and functions > 0 and spills == 0
        error = None if ok else (log.strip().splitlines()[-1] if proc.returncode else f"spills {spills} B")
        rows.append(dict(kernel="csrc/multi_tensor_cuda.cu", variant=f"{functions} kernels", arch=a, ok=ok,
                         registers=regs, spills=spills, shared_bytes=None, error=error, seconds=seconds))
    return rows


# -- the gate -------------------------------------------------------------------------------------------

def gate(archs=tuple(ARCHS), only=None, nvcc=True, workers=None) -> dict:
    _no_interpreter()
    start = time.perf_counter()
    builds = all_builds(only)
    rows = []
    if nvcc:
        # nvcc runs beside the Triton pool (it is one long process)
        with ProcessPoolExecutor(1) as side:
            future = side.submit(run_nvcc)
            rows += run_triton(builds, archs, workers)
            rows += future.result()
    else:
        rows += run_triton(builds, archs, workers)
    import torch
    import triton

    failed = [r for r in rows if r["ok"] is False]
    return dict(
        benchmark="compile_gate", command="python -m unlearn_fast.kernels.compile_check --json PATH",
        host=dict(cpu=_cpu_model(), cpus=os.cpu_count(), nvcc=shutil.which("nvcc")),
        triton_version=triton.__version__, torch_version=torch.__version__,
        archs=list(archs), builds=len(rows), failed=len(failed), skipped=sum(r["ok"] is None for r in rows),
        seconds=round(time.perf_counter() - start, 1), rows=rows,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def summary(result: dict) -> str:
    lines = [f"compile gate: {result['builds']} builds, {result['failed']} failed, {result['skipped']} skipped, "
             f"{result['seconds']} s (triton {result['triton_version']}, torch {result['torch_version']})"]
    by_kernel: dict = {}
    for r in result["rows"]:
        k = by_kernel.setdefault((r["kernel"], r["arch"]), dict(n=0, regs=0, spills=0, smem=0, bad=0))
        k["n"] += 1
        k["regs"] = max(k["regs"], r["registers"] or 0)
        k["spills"] = max(k["spills"], r["spills"] or 0)
        k["smem"] = max(k["smem"], r["shared_bytes"] or 0)
        k["bad"] += r["ok"] is False
    lines.append(f"{'kernel':38} {'arch':6} {'builds':>6} {'max regs':>8} {'max spill B':>11} {'max smem B':>10} "
                 "failed")
    for (kernel, arch), k in sorted(by_kernel.items()):
        lines.append(f"{kernel:38} {arch:6} {k['n']:6d} {k['regs']:8d} {k['spills']:11d} {k['smem']:10d} {k['bad']}")
    for r in result["rows"]:
        if r["ok"] is False:
            lines.append(f"FAILED {r['kernel']} [{r['variant']}] {r['arch']}: {r['error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write the rows and the summary here")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    parser.add_argument("--only", default=None, help="only kernels whose name contains this")
    parser.add_argument("--no-nvcc", action="store_true", help="skip the CUDA C++ sources")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    archs = tuple(a for a in args.archs.split(",") if a)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"unknown arch {unknown}; known: {list(ARCHS)}")
    result = gate(archs, args.only, not args.no_nvcc, args.workers)
    print(summary(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
