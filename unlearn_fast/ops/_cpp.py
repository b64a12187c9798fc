"""Build and load the compiled multi-tensor ops (csrc/) with ninja through torch.utils.cpp_extension.

The extension is compiled at first use into ~/.cache/unlearn_fast/<hash>/ (the hash covers the
sources, the torch version and the flags, so an edit or an upgrade rebuilds) and loaded from there
afterwards. The CUDA source is added only when torch has CUDA and a CUDA compiler is found. The
sources ship inside the package as ``unlearn_fast.csrc`` (package data mapped from the top-level
csrc/ directory, like ``unlearn_fast.kernels`` from kernels/), so editable and wheel installs find them.

UNLEARN_FAST_NO_CPP=1 turns the compiled path off (the ops fall back to torch._foreach_*).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

_NAME = "unlearn_fast_multi_tensor"
_CFLAGS = ["-O3", "-ffp-contract=off"]  # no FMA contraction: same roundings as the foreach path
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
    from torch.utils import cpp_extension

    cuda = _with_cuda()
    missing = _missing_tools(cuda)
    if missing:
        raise RuntimeError("missing " + " and ".join(missing))
    src = source_dir()
    sources = [src / "multi_tensor.cpp"] + ([src / "multi_tensor_cuda.cu"] if cuda else [])
    for s in sources:
        if not s.exists():
            raise RuntimeError(f"source file {s} not found (is the package installed with its csrc data?)")
    digest = hashlib.sha256()
    for s in sources:
        digest.update(s.read_bytes())
    digest.update(f"{torch.__version__} {torch.version.cuda} {_CFLAGS} {cuda}".encode())
    build_dir = Path(os.environ.get("UNLEARN_FAST_CACHE", Path.home() / ".cache" / "unlearn_fast")) / digest.hexdigest()[:16]
    build_dir.mkdir(parents=True, exist_ok=True)
    if not any(build_dir.glob(f"{_NAME}*.so")):
        # The first build takes a minute or two: say so rather than look hung.
        print(f"unlearn_fast: compiling the multi-tensor ops into {build_dir} (first use only)...",
              file=sys.stderr, flush=True)
    cpp_extension.load(
        name=_NAME,
        sources=[str(s) for s in sources],
        build_directory=str(build_dir),
        extra_cflags=_CFLAGS,
        extra_cuda_cflags=["-O3"],
        is_python_module=False,  # the ops register themselves with TORCH_LIBRARY
        verbose=False,
    )
    _built_with_cuda = cuda
    return torch.ops.unlearn_fast


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
