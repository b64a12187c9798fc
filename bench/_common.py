"""Shared benchmark plumbing: timing, peak memory, one process per variant, results files, RESULTS.md.

A benchmark script calls ``run_variants`` (each variant measured in a fresh
process so that its peak memory is its own), then ``write_results``, which
writes ``bench/results/<name>-<device>-<date>.json`` and regenerates
``bench/RESULTS.md`` from every results file.
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent


def device_name(device: torch.device) -> str:
    """Names the machine in results files: the GPU model, or cpu<count>-<vendor>-<vector level>."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    model = cpu_info()["cpu_model"].lower()
    vendor = next((v for v in ("intel", "amd", "arm", "apple") if v in model), platform.machine().lower())
    return f"cpu{os.cpu_count()}-{vendor}-{torch.backends.cpu.get_cpu_capability().lower()}"


_VECTOR_FLAG_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "neon", "asimd", "sve")


def cpu_info() -> dict:
    """The CPU model and its vector extensions (from /proc/cpuinfo), as results files record them."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    vector = sorted(f for f in set(flags) if f.startswith(_VECTOR_FLAG_PREFIXES))
    return {"cpu_model": model, "cpu_vector_extensions": vector, "cpu_count": os.cpu_count()}


def torch_build_info() -> dict:
    """What torch computes with on the CPU: its vector dispatch level and BLAS / oneDNN."""
    info = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available()}
    for line in torch.__config__.show().splitlines():
        line = line.strip()
        if line.startswith("- Build settings:"):
            for item in line.split(":", 1)[1].split(","):
                k, _, v = item.strip().partition("=")
                if k in ("BLAS_INFO", "LAPACK_INFO"):
                    info[k.lower()] = v
    return info


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where /proc/loadavg is missing)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


def environment(device: torch.device) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    cpu = cpu_info()
    from unlearn_fast.ops._matmul import cpu_gemm_engine

    return {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu["cpu_model"],
        **cpu,
        "cpu_gemm_engine": cpu_gemm_engine(),  # of the CPU linear-CE head matmuls (UNLEARN_FAST_CPU_GEMM)
        **torch_build_info(),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, *, warmup: int = 1, repeat: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_wall_and_cpu(fn, device: torch.device, *, warmup: int = 1, repeat: int = 5) -> tuple[float, float]:
    """(median wall s, median process-CPU s, all threads) of ``fn`` over ``repeat`` calls after ``warmup``:
    on a shared machine the CPU time is what the call costs."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeat):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


class PeakMemory:
    """Extra peak memory (bytes) of the code run inside the context, above what was live at entry.

    CUDA: torch's allocator statistics. CPU: the process's resident-set high-water
    mark, reset at entry through /proc/self/clear_refs, with a sampling thread as
    a fallback where the reset is not allowed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.extra = 0

    def __enter__(self):
        gc.collect()
        _mmap_large_allocations()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = _rss()
        self.can_reset = _reset_hwm()
        self.sampled = self.base
        self._thread = None
        if not self.can_reset:  # the kernel's high-water mark needs no sampling (which would take CPU time)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = _hwm() if self.can_reset else max(self.sampled, _rss())
        self.extra = max(0, peak - self.base)
        return False


def _mmap_large_allocations() -> None:
    """Make glibc return freed blocks over 128 KiB to the OS at once, so resident memory tracks live memory.

    Without this, a block freed in a warm-up step stays resident and hides the next step's peak.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed, so glibc stops raising it)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_variants(script: str, variants: list[str], args: list[str], *, timeout: float = 1800, rounds: int = 1,
                 loads: dict | None = None) -> dict:
    """Run ``python script --worker VARIANT args...`` for each variant; each prints one JSON line last.

    With ``rounds`` > 1 the whole list is run that many times, interleaved (v1 v2 v3 v1 v2 v3 ...), so
    that a load spike on a shared machine hits every variant alike; each figure is the median over
    the rounds. ``loads`` (a dict) receives each variant's /proc/loadavg before and after its runs.
    """
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    errors: dict[str, dict] = {}
    for r in range(rounds):
        for variant in variants:
            if variant in errors:
                continue
            tag = f" (round {r + 1}/{rounds})" if rounds > 1 else ""
            print(f"  {variant}{tag} ...", end=" ", flush=True)
            before = loadavg()
            cmd = [sys.executable, script, "--worker", variant, *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            if loads is not None:
                loads.setdefault(variant, []).append({"before": before, "after": loadavg()})
            if proc.returncode != 0:
                print("FAILED")
                sys.stderr.write(proc.stderr[-4000:])
                errors[variant] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                continue
            fig = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[variant].append(fig)
            print(", ".join(f"{k}={_fmt(v)}" for k, v in fig.items()), flush=True)
    results = {}
    for variant in variants:
        results[variant] = errors[variant] if variant in errors else _median_figures(runs[variant])
    return results


def _median_figures(figs: list[dict]) -> dict:
    """One variant's figures over its rounds: the median of each number, the first value of anything else."""
    if len(figs) == 1:
        return figs[0]
    out = {}
    for key, first in figs[0].items():
        values = [f.get(key) for f in figs]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        out[key] = statistics.median(values) if numeric else first
    if figs:
        out["rounds"] = len(figs)
    return out


def figure(results: dict, variant: str, key: str):
    """A numeric figure of one variant (None when missing, failed or not a number)."""
    v = results.get(variant, {}).get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def ratios_of(results: dict, pairs: dict) -> dict:
    """{name: results[a][key] / results[b][key]} for each name -> (a, b, key) whose figures exist."""
    out = {}
    for name, (a, b, key) in pairs.items():
        x, y = figure(results, a, key), figure(results, b, key)
        if x is not None and y:
            out[name] = x / y
    return out


def print_summary(path, ratios: dict, targets: dict) -> None:
    print(f"wrote {path} and bench/RESULTS.md")
    width = max((len(k) for k in ratios), default=0) + 2
    for k, v in ratios.items():
        print(f"  {k:{width}s} {v:.3f}")
    for k, v in targets.items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")


def worker_report(**figures) -> None:
    print(json.dumps(figures), flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(name: str, payload: dict, path: str | None = None, *, regenerate: bool = True) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = payload.get("environment", {})
    day = _dt.date.today().isoformat()
    out = Path(path) if path else RESULTS_DIR / f"{name}-{env.get('device', 'unknown')}-{day}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(payload)
    payload.setdefault("loadavg_at_write", loadavg())
    out.write_text(json.dumps({"benchmark": name, **payload}, indent=2) + "\n")
    inside = out.resolve().parent == RESULTS_DIR.resolve()
    if regenerate and inside:  # results written elsewhere (smoke tests) leave RESULTS.md alone
        regenerate_results_md()
    return out


def regenerate_results_md() -> Path:
    """bench/RESULTS.md: one section per results file, newest first within each benchmark."""
    files = sorted(RESULTS_DIR.glob("*.json"))
    runs = []
    for f in files:
        try:
            runs.append((f, json.loads(f.read_text())))
        except json.JSONDecodeError:
            continue
    lines = ["# Benchmark results", "", "Generated by `bench/_common.py` from `bench/results/*.json`; do not edit by hand.", ""]
    for f, run in sorted(runs, key=lambda r: (r[1].get("benchmark", ""), r[1].get("environment", {}).get("date", "")),
                         reverse=False):
        env = run.get("environment", {})
        lines += [f"## {run.get('benchmark', f.stem)} — {env.get('device', '?')} — {env.get('date', '?')}", ""]
        versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
        lines += [f"File `{f.relative_to(REPO)}`; {versions}; threads {env.get('threads', '?')}.", ""]
        if env.get("cpu_model"):
            blas = env.get("blas_info") or ("mkl" if env.get("mkl") else "?")
            lines += [f"Machine: {env['cpu_model']}, {env.get('cpu_count', '?')} CPUs; vector extensions "
                      f"{' '.join(env.get('cpu_vector_extensions', [])) or '?'}; torch CPU capability "
                      f"{env.get('torch_cpu_capability', '?')}, BLAS {blas}.", ""]
        if run.get("loadavg"):
            lines += ["Load average (1 min) before/after each variant: " + ", ".join(
                f"{v} " + " ".join(f"{x['before'][0]:.1f}/{x['after'][0]:.1f}" for x in runs if x['before'] and x['after'])
                for v, runs in run["loadavg"].items()), ""]
        if run.get("command"):
            lines += [f"Command: `{run['command']}`", ""]
        if run.get("note"):
            lines += [f"Note: {run['note']}", ""]
        if run.get("shapes"):
            lines += ["Shapes: " + ", ".join(f"{k}={v}" for k, v in run["shapes"].items()), ""]
        variants = run.get("variants", {})
        columns = []
        for fig in variants.values():
            columns += [k for k in fig if k not in columns]
        if variants:
            lines += ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for name, fig in variants.items():
                lines.append(f"| {name} | " + " | ".join(_fmt(fig.get(c, "")) for c in columns) + " |")
            lines.append("")
        if run.get("ratios"):
            lines += ["Ratios: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in run["ratios"].items()), ""]
        if run.get("targets"):
            lines += ["Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in run["targets"].items()), ""]
        for key, label in (("first_loss_rel_diff", "First-step objective, ours vs reference (relative difference)"),
                           ("npo_sam_ilu_fits", "NPO+SAM+ILU fits the device")):
            if run.get(key):
                lines += [f"{label}: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in run[key].items()), ""]
        if run.get("plot") and (f.parent / run["plot"]).exists():
            lines += [f"![{run.get('benchmark', f.stem)}]({(f.parent / run['plot']).relative_to(BENCH_DIR)})", ""]
    out = BENCH_DIR / "RESULTS.md"
    out.write_text("\n".join(lines))
    return out
