"""Fused linear cross-entropy (+ IRM penalty) against its peers, side by side, fwd+bwd.

Variants (each in its own process, so its peak memory is its own):
  naive_ce        F.linear + F.cross_entropy (materialised fp32 logits)
  naive_ce_irm    naive CE per environment + IRMv1 penalty by double backprop (unlearn_fast/testing/reference.py)
  torch_chunked_bsK  torch's chunked F.linear_cross_entropy, LinearCrossEntropyOptions(batch_chunk_size=K,
                  chunking_method=None), for each K of --chunks; torch_chunked_auto its default options.
                  THE STRONG BASELINE is the fastest of these for the shape ("torch_chunked_best" in
                  the ratios; its chunk size is recorded)
  ours_ce         uf.ops.linear_cross_entropy
  ours_ce_irm     uf.ops.linear_cross_entropy_irm (env_loss.mean() + penalty: upstream known in backward only)
  ours_objective  uf.ops.irm_objective (the same loss as one scalar, gradient formed in the forward pass)
  naive_penalty   the IRMv1 penalty alone by double backprop (what ILU trains: no environment CE)
  ours_penalty    uf.ops.irm_penalty (gradient formed in the forward pass)
  liger_flce, cce on a GPU when those packages are installed.

    python bench/bench_linear_ce.py                 # CPU: N=4096 H=512 V=32000 fp32; GPU: N=16384 H=4096 V=128256 bf16
    python bench/bench_linear_ce.py --quick         # small shapes, a smoke run
    python bench/bench_linear_ce.py --model-only    # the GPU cost model (bench/cost_model.py), no run
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _common import (PeakMemory, environment, print_summary, ratios_of, run_variants, median_wall_and_cpu,  # noqa: E402
                     worker_report, write_results)  # noqa: E402

CPU_SHAPES = dict(N=4096, H=512, V=32000, E=4, dtype="float32")
GPU_SHAPES = dict(N=16384, H=4096, V=128256, E=4, dtype="bfloat16")
QUICK_SHAPES = dict(N=512, H=64, V=2000, E=4, dtype="float32")
TINY_SHAPES = dict(N=64, H=8, V=50, E=4, dtype="float32")  # CI sanity run
VARIANTS = ["naive_ce", "naive_ce_irm", "ours_ce", "ours_ce_irm", "ours_objective", "naive_penalty", "ours_penalty"]
CHUNKS = "256,512,1024,2048,auto"  # the sweep of torch's chunk size (the best is the strong baseline)
GPU_VARIANTS = ["liger_flce", "cce"]


def make_inputs(shapes, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, shapes["dtype"])
    n, hdim, vocab, envs = shapes["N"], shapes["H"], shapes["V"], shapes["E"]
    h = torch.randn(n, hdim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hdim, generator=g) / hdim**0.5).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    y[::17] = -100
    env = (torch.arange(n) * envs // n).to(device)  # contiguous blocks, like per-sequence environments
    return h, w, y, env


def loss_fn(variant, h, w, y, env, envs):
    import unlearn_fast as uf
    from unlearn_fast.testing.reference import naive_irm

    if variant == "naive_ce":
        return lambda: F.cross_entropy(F.linear(h, w).float(), y)
    if variant == "naive_ce_irm":
        def naive():
            env_loss, _, penalty = naive_irm(h, w, y, env, envs)
            return env_loss.mean() + penalty
        return naive
    if variant.startswith("torch_chunked_"):
        size = variant.removeprefix("torch_chunked_")
        opts = (torch.nn.LinearCrossEntropyOptions() if size == "auto" else
                torch.nn.LinearCrossEntropyOptions(batch_chunk_size=int(size.removeprefix("bs")), chunking_method=None))
        return lambda: F.linear_cross_entropy(h, w, y, options=opts)
    if variant == "ours_ce":
        return lambda: uf.ops.linear_cross_entropy(h, w, y)
    if variant == "ours_ce_irm":
        def ours():
            out = uf.ops.linear_cross_entropy_irm(h, w, y, env, num_envs=envs)
            return out.env_loss.mean() + out.penalty
        return ours
    if variant == "ours_objective":
        return lambda: uf.ops.irm_objective(h, w, y, env, num_envs=envs).loss
    if variant == "naive_penalty":
        return lambda: naive_irm(h, w, y, env, envs)[2]
    if variant == "ours_penalty":
        return lambda: uf.ops.irm_penalty(h, w, y, env, num_envs=envs).penalty
    if variant == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda: liger(w, h, y)
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda: cce(h, w, y)
    raise ValueError(f"unknown variant {variant}")


def worker(variant, shapes, repeat):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with PeakMemory(device):  # the first PeakMemory also fixes glibc's allocation policy (CPU)
        pass
    h, w, y, env = make_inputs(shapes, device)
    compute = loss_fn(variant, h, w, y, env, shapes["E"])

    def step():
        h.grad = w.grad = None
        compute().backward()

    step()  # warm-up (compilation, allocator)
    h.grad = w.grad = None  # so that the baseline below holds no gradient
    import unlearn_fast as uf

    uf.ops.release_workspace()  # the CPU path keeps its logits block between calls: counted in the peak below
    with PeakMemory(device) as mem:
        step()
    wall, cpu = median_wall_and_cpu(step, device, warmup=0, repeat=repeat)  # warmed up above
    worker_report(median_s=wall, median_cpu_s=cpu, peak_extra_mb=mem.extra / 2**20)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI: checks the plumbing only
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--chunks", default=CHUNKS, help="torch chunk sizes to sweep (comma-separated; 'auto')")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of the variant list (median)")
    parser.add_argument("--json", default=None, help="results path (default bench/results/linear_ce-<device>-<date>.json)")
    parser.add_argument("--note", default=None, help="a remark stored with the results (e.g. machine load)")
    parser.add_argument("--model-only", action="store_true", help="print the GPU cost model (bench/cost_model.py) and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import cost_model

    if args.model_only:
        return print(cost_model.table(cost_model.model()))
    cuda = torch.cuda.is_available()
    shapes = TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else (GPU_SHAPES if cuda else CPU_SHAPES)
    if args.worker:
        import json

        return worker(args.worker, json.loads(args.shapes), args.repeat)

    import json

    sweep = [f"torch_chunked_{c if c == 'auto' else 'bs' + c}" for c in args.chunks.split(",") if c]
    variants = args.variants.split(",") if args.variants else sweep + VARIANTS + (GPU_VARIANTS if cuda else [])
    device = torch.device("cuda" if cuda else "cpu")
    print(f"linear CE benchmark on {device}: {shapes}")
    loads = {}
    results = run_variants(__file__, variants, ["--shapes", json.dumps(shapes), "--repeat", str(args.repeat)],
                           rounds=args.rounds, loads=loads)
    ratios, targets = summarise(results, cuda)
    command = "python bench/bench_linear_ce.py" + (" --quick" if args.quick else "")
    if args.chunks != CHUNKS:
        command += f" --chunks {args.chunks}"
    if args.rounds != 1:
        command += f" --rounds {args.rounds}"
    if args.variants:
        command += f" --variants {args.variants}"
    if args.repeat != 3:
        command += f" --repeat {args.repeat}"
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        command = f"OMP_NUM_THREADS={threads} " + command
    payload = {
        "environment": environment(device),
        "command": command,
        "shapes": shapes,
        "baseline": {"name": "torch_chunked_best", "variant": best_torch(results),
                     "variant_by_cpu_time": best_torch(results, "median_cpu_s")},
        "variants": results,
        "loadavg": loads,
        "ratios": ratios,
        "targets": targets,
        "cost_model": cost_model.model()["variants"],  # predicted H100/H200 times at the GPU shapes
        "cost_model_parameters": cost_model.model()["parameters"],
    }
    if args.note:
        payload["note"] = args.note
    out = write_results("linear_ce" + ("-quick" if args.quick else ""), payload, args.json)
    print_summary(out, ratios, targets)
    return out


def best_torch(results, key: str = "median_s") -> str | None:
    """The fastest torch chunked variant by ``key`` (wall or CPU time): the strong baseline."""
    timed = {k: v[key] for k, v in results.items() if k.startswith("torch_chunked_") and key in v}
    return min(timed, key=timed.get) if timed else None


def summarise(results, cuda):
    results = dict(results)
    best, best_cpu = best_torch(results), best_torch(results, "median_cpu_s")
    if best is not None:
        results["torch_chunked_best"] = dict(results[best])
    if best_cpu is not None:  # the CPU-time ratios compare with the chunk size that is fastest in CPU time
        results["torch_chunked_best"]["median_cpu_s"] = results[best_cpu]["median_cpu_s"]
    pairs = {
        "ours_ce_over_torch_time": ("ours_ce", "torch_chunked_best", "median_s"),
        "ours_ce_over_torch_memory": ("ours_ce", "torch_chunked_best", "peak_extra_mb"),
        "ours_irm_over_torch_time": ("ours_ce_irm", "torch_chunked_best", "median_s"),
        "ours_irm_over_torch_memory": ("ours_ce_irm", "torch_chunked_best", "peak_extra_mb"),
        "ours_penalty_over_torch_time": ("ours_penalty", "torch_chunked_best", "median_s"),
        "ours_objective_over_torch_time": ("ours_objective", "torch_chunked_best", "median_s"),
        "ours_objective_over_torch_memory": ("ours_objective", "torch_chunked_best", "peak_extra_mb"),
        "ours_objective_over_ours_irm_time": ("ours_objective", "ours_ce_irm", "median_s"),
        "ours_objective_over_ours_ce_time": ("ours_objective", "ours_ce", "median_s"),
        "naive_irm_over_ours_irm_time": ("naive_ce_irm", "ours_ce_irm", "median_s"),
        "naive_irm_over_ours_irm_memory": ("naive_ce_irm", "ours_ce_irm", "peak_extra_mb"),
        "ours_irm_over_ours_ce_time": ("ours_ce_irm", "ours_ce", "median_s"),
        "naive_penalty_over_ours_penalty_time": ("naive_penalty", "ours_penalty", "median_s"),
        "naive_penalty_over_ours_penalty_memory": ("naive_penalty", "ours_penalty", "peak_extra_mb"),
        "ours_penalty_over_ours_ce_time": ("ours_penalty", "ours_ce", "median_s"),
    }
    if cuda:
        pairs.update({
            "ours_irm_over_liger_time": ("ours_ce_irm", "liger_flce", "median_s"),
            "ours_objective_over_liger_time": ("ours_objective", "liger_flce", "median_s"),
            "ours_irm_over_cce_memory": ("ours_ce_irm", "cce", "peak_extra_mb"),
        })
    ratios = ratios_of(results, pairs)
    ratios |= {f"{k}_cpu": v for k, v in ratios_of(
        results, {k: (a, b, "median_cpu_s") for k, (a, b, key) in pairs.items() if key == "median_s"}).items()}
    limits = (
        {"ours_irm_over_liger_time": 1.0, "ours_irm_over_cce_memory": 1.1, "ours_irm_over_ours_ce_time": 1.1}
        if cuda else
        {"ours_ce_over_torch_time": 1.0, "ours_ce_over_torch_memory": 1.2, "ours_irm_over_torch_time": 1.3,
         "ours_irm_over_torch_memory": 1.2, "ours_penalty_over_ours_ce_time": 1.1,
         "ours_objective_over_torch_time": 1.3}
    )
    targets = {f"{k} <= {v}": ratios[k] <= v for k, v in limits.items() if k in ratios}
    targets |= {f"{k} <= {v} (cpu time)": ratios[k + "_cpu"] <= v for k, v in limits.items() if k + "_cpu" in ratios}
    return ratios, targets


if __name__ == "__main__":
    main()
