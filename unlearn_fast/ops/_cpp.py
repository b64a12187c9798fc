"""Build and load the compiled multi-tensor ops (csrc/) with ninja through torch.utils.cpp_extension.

The same extension carries the CPU row op of the chunked linear CE (csrc/linear_ce_rows.cpp, used by
ops/_torch_linear_ce.py).

The extension is compiled at first use into ~/.cache/unlearn_fast/<hash>/ (the hash covers the
sources, the torch version, the compiler and the flags, so an edit, an upgrade or another machine
rebuilds) and loaded from there afterwards. The build runs on the machine that uses it, so the CPU
kernels are compiled for its vector unit: ``host_capability()`` reads the CPU's flags and picks
AVX-512 or AVX2 (the -m flags and the CPU_CAPABILITY macro that at::vec::Vectorized keys on, as
torch's own kernels), else the portable build; UNLEARN_FAST_CPU_CAPABILITY=default|avx2|avx512
overrides it. A vector build that fails falls back to the portable one. The CPU kernels write
buffers that are only written (the SAM backup, the restored weights) with non-temporal stores
when a list holds at least UNLEARN_FAST_STREAM_BYTES bytes (default 16 MiB, read once per process). The CUDA source is added only when torch has CUDA and a CUDA compiler is found. The
sources ship inside the package as ``unlearn_fast.csrc`` (package data mapped from the top-level
csrc/ directory, like ``unlearn_fast.kernels`` from kernels/), so editable and wheel installs find them.

UNLEARN_FAST_NO_CPP=1 turns the compiled path off (the ops fall back to torch._foreach_*).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch

_NAME = "unlearn_fast_multi_tensor"
_CFLAGS = ["-O3", "-ffp-contract=off"]  # no FMA contraction: same roundings as the foreach path
# The compiler flags of each vector build (those torch uses for its own AVX2 / AVX-512 kernels).
_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}
_CAPABILITY_NEEDS = {  # /proc/cpuinfo flags each build needs
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
}
_lock = threading.Lock()
_loaded = None  # the torch.ops namespace once built
_error: Exception | None = None  # why the last build failed (not retried in this process)


def disabled() -> bool:
    return os.environ.get("UNLEARN_FAST_NO_CPP", "0") not in ("", "0")


def source_dir() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("unlearn_fast.csrc")))
        if (path / "multi_tensor.cpp").exists():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "csrc"  # a source checkout without install


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where that is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_capability() -> str:
    """The vector build for this machine: "avx512", "avx2" or "default" (UNLEARN_FAST_CPU_CAPABILITY overrides)."""
    forced = os.environ.get("UNLEARN_FAST_CPU_CAPABILITY", "")
    if forced:
        if forced not in _CAPABILITY_FLAGS:
            raise ValueError(f"UNLEARN_FAST_CPU_CAPABILITY must be one of {sorted(_CAPABILITY_FLAGS)}, got {forced!r}")
        return forced
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "default"
    flags = cpu_flags()
    for cap in ("avx512", "avx2"):
        if _CAPABILITY_NEEDS[cap] <= flags:
            return cap
    return "default"


def _compiler_id() -> str:
    """The C++ compiler's version line (part of the cache key: another compiler is another build)."""
    import subprocess

    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _with_cuda() -> bool:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def _missing_tools(cuda: bool) -> list[str]:
    missing = []
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not on PATH; install g++ or set CXX)")
    return missing


def load(device: torch.device | None = None):
    """The ``torch.ops.unlearn_fast`` namespace, building the extension if needed.

    Raises RuntimeError naming what is missing when it cannot be built (or is turned off).
    """
    global _loaded, _error
    if disabled():
        raise RuntimeError("the compiled multi-tensor ops are turned off (UNLEARN_FAST_NO_CPP=1)")
    if _loaded is not None:
        _check_device(device)
        return _loaded
    if _error is not None:
        raise RuntimeError(f"the compiled multi-tensor ops could not be built: {_error}") from _error
    with _lock:
        if _loaded is None:
            try:
                _loaded = _build()
            except Exception as exc:  # keep the reason; later calls fall back or re-raise it
                _error = exc
                raise RuntimeError(f"the compiled multi-tensor ops could not be built: {exc}") from exc
    _check_device(device)
    return _loaded


def _check_device(device) -> None:
    if device is not None and device.type == "cuda" and not _built_with_cuda:
        raise RuntimeError("the compiled multi-tensor ops were built without CUDA (no CUDA compiler found)")


_built_with_cuda = False


def _build():
    global _built_with_cuda
    cuda = _with_cuda()
    missing = _missing_tools(cuda)
    if missing:
        raise RuntimeError("missing " + " and ".join(missing))
    src = source_dir()
    sources = [src / "multi_tensor.cpp", src / "linear_ce_rows.cpp"] + ([src / "multi_tensor_cuda.cu"] if cuda else [])
    for s in sources:
        if not s.exists():
            raise RuntimeError(f"source file {s} not found (is the package installed with its csrc data?)")
    wanted = host_capability()
    attempts = [wanted] + (["default"] if wanted != "default" else [])
    for i, cap in enumerate(attempts):
        try:
            _build_for(cap, sources, cuda)
            break
        except Exception:
            if i + 1 == len(attempts):
                raise
            print(f"unlearn_fast: the {cap} build failed; building the portable CPU kernels instead",
                  file=sys.stderr, flush=True)
    _built_with_cuda = cuda
    return torch.ops.unlearn_fast


def compile_flags(capability: str) -> list[str]:
    """The C++ flags of the build for one capability ("avx512", "avx2", "default")."""
    if capability not in _CAPABILITY_FLAGS:
        raise ValueError(f"capability must be one of {sorted(_CAPABILITY_FLAGS)}, got {capability!r}")
    return _CFLAGS + _CAPABILITY_FLAGS[capability]


def build_dir_for(cflags, sources, cuda: bool) -> Path:
    """The cache directory of one build: a hash of the sources, torch, the compiler and the flags."""
    digest = hashlib.sha256()
    for s in sources:
        digest.update(Path(s).read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {list(cflags)} {cuda} {_compiler_id()}".encode())
    root = Path(os.environ.get("UNLEARN_FAST_CACHE", Path.home() / ".cache" / "unlearn_fast"))
    return root / digest.hexdigest()[:16]


def _build_for(capability: str, sources, cuda: bool) -> None:
    from torch.utils import cpp_extension

    cflags = compile_flags(capability)
    build_dir = build_dir_for(cflags, sources, cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{_NAME}*.so")):
        # The first build takes a minute or two: say so rather than look hung.
        print(f"unlearn_fast: compiling the multi-tensor ops ({capability} CPU kernels) into {build_dir} "
              "(first use only)...", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(s) for s in sources],
        build_directory=str(build_dir),
        extra_cflags=cflags,
        extra_cuda_cflags=["-O3"],
        is_python_module=False,  # the ops register themselves with TORCH_LIBRARY
        verbose=False,
    )


def capability() -> str:
    """The vector instruction set the loaded CPU kernels were compiled for ("avx512", "avx2", "default")."""
    return str(load().cpu_capability())


def vectorised() -> bool:
    """True when the compiled CPU kernels use a vector unit (else auto keeps the foreach path on the CPU)."""
    try:
        return capability() != "default"
    except RuntimeError:
        return False


def ops():
    """The loaded op namespace (call ``load`` first)."""
    return load()


def available(device: torch.device | None = None) -> bool:
    """True when the compiled ops are (or can be) loaded for this device; never raises."""
    if disabled() or _error is not None:
        return False
    if device is not None and device.type not in ("cpu", "cuda"):
        return False
    try:
        load(device)
    except RuntimeError:
        return False
    return True
