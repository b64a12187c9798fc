"""SAM bookkeeping (global norm, perturb, exact restore, AdamW) on a Llama-shaped list of tensors.

Variants (each in its own process, so its peak memory is its own; the list is run --rounds times,
interleaved, and each figure is the median over the rounds):
  naive_loop      the public SAM code's approach: per-parameter Python loop, per-tensor norms stacked,
                  e_w = scale·g kept per parameter, restore by subtraction (not exact in bf16)
  foreach_strong  THE STRONG BASELINE (the issue's): what a practitioner writes with torch alone, done well —
                  native-dtype torch._foreach_norm, _foreach_copy_ into a PREALLOCATED backup,
                  _foreach_add_(alpha=ρ/‖g‖), _foreach_copy_ back; the step with
                  torch.optim.AdamW(fused=True) (sam_step_s) and AdamW(foreach=True) (sam_step_foreach_adamw_s)
  foreach_swap    the same with davda54/sam's restore, ``p.data = old_p``: a storage trade with the
                  preallocated backup instead of the copy back (the two buffers ping-pong across steps)
  torch_out_swap  the strongest torch-only form we could write: torch.add(θ, g, alpha=s, out=backup) per
                  tensor (θ' straight into the backup), then the storage trade, and the trade back to restore
  uf_torch        uf.ops with backend="torch" (the project's own foreach fallback: fp32 temporaries)
  cpp_copy        uf.ops with backend="cpp", exchange=False: perturb with backup in one pass, restore by copy
  cpp             OURS: uf.ops with backend="cpp" (csrc/ multi-tensor ops), preallocated backup,
                  exchange=True (θ' written into the backup, which trades storage with θ; the restore
                  trades back); the step with uf.optim.FusedAdamW(step(sam_state=...))
  triton_flat     (GPU) flattened parameters, backend="triton"
The SAM bookkeeping (sam_s) is perturb + restore: every variant's perturb takes the global norm itself
(norm_s is that part timed alone; files before 2026-12-02's second run added it twice).
Achieved GB/s counts the bytes each variant's algorithm must move, in parameter-sized passes: norm 1
(read g); perturb with backup 4 (read θ, g, write θ, backup; foreach copy_ then add_ is 5), perturb into
the backup 3 (read θ, g, write backup); restore by copy 2, by storage trade 0. The machine's copy
bandwidth (dst.copy_(src), 2 bytes moved per byte copied) is measured in the same process.

    python bench/bench_sam.py            # CPU: 32 layers, hidden 384, ~69M params fp32; GPU: 7B shapes bf16
    python bench/bench_sam.py --quick    # small shapes, a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _common import (PeakMemory, environment, figure, print_summary, ratios_of, run_variants, sync,  # noqa: E402
                     worker_report, write_results)

CPU_SHAPES = dict(layers=32, hidden=384, intermediate=1024, vocab=16000, dtype="float32")
GPU_SHAPES = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, dtype="bfloat16")
QUICK_SHAPES = dict(layers=4, hidden=128, intermediate=352, vocab=1000, dtype="float32")
TINY_SHAPES = dict(layers=1, hidden=16, intermediate=40, vocab=50, dtype="float32")  # CI sanity run
VARIANTS = ["naive_loop", "foreach_strong", "foreach_swap", "torch_out_swap", "uf_torch", "cpp_copy", "cpp"]
# parameter-sized passes each variant's norm, perturb and restore move (see the docstring)
PASSES = {"foreach_strong": (1, 5, 2), "foreach_swap": (1, 5, 0), "torch_out_swap": (1, 3, 0), "cpp": (1, 3, 0)}
COPY_PASSES = (1, 4, 2)  # the others: perturb with backup, restore by copy
GPU_VARIANTS = ["triton_flat"]
RHO = 0.01


def llama_shapes(s):
    h, i, v = s["hidden"], s["intermediate"], s["vocab"]
    layer = [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]  # q k v o gate up down, 2 norms
    return [(v, h)] + layer * s["layers"] + [(h,), (v, h)]


def make_tensors(shapes, device, flat=False):
    dtype = getattr(torch, shapes["dtype"])
    sizes = llama_shapes(shapes)
    total = sum(torch.Size(s).numel() for s in sizes)
    if flat:
        p_buf = torch.empty(total, dtype=dtype, device=device)
        g_buf = torch.empty(total, dtype=dtype, device=device)
        params, grads, off = [], [], 0
        for s in sizes:
            n = torch.Size(s).numel()
            params.append(p_buf[off:off + n].view(s))
            grads.append(g_buf[off:off + n].view(s))
            off += n
    else:
        params = [torch.empty(s, dtype=dtype, device=device) for s in sizes]
        grads = [torch.empty(s, dtype=dtype, device=device) for s in sizes]
    gen = torch.Generator(device=device).manual_seed(0)
    for p, g in zip(params, grads):
        p.normal_(0, 0.02, generator=gen)
        g.normal_(0, 1e-3, generator=gen)
    return params, grads, total


# -- the naive reference (the public SAM code's loop) ---------------------------------------------

def naive_norm(grads):
    return torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)


def naive_perturb(params, grads):
    norm = naive_norm(grads)
    scale = RHO / (norm + 1e-12)
    e_ws = []
    for p, g in zip(params, grads):
        e_w = (g * scale).to(p.dtype)
        p.add_(e_w)
        e_ws.append(e_w)
    return e_ws


def naive_restore(params, e_ws):
    for p, e in zip(params, e_ws):
        p.sub_(e)


CPU_TIMES: dict[str, list[float]] = {}  # process CPU time of each timed call, by label (CPU runs)


def timed(fn, device, label=None):
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    if label is not None:
        CPU_TIMES.setdefault(label, []).append(time.process_time() - c)
    return time.perf_counter() - t, out


def strong_baseline(params, grads, backup, form="foreach_strong"):
    """The practitioner's well-written torch SAM bookkeeping: native dtype, preallocated backup, no clones.

    form: "foreach_strong" restores by copy; "foreach_swap" by trading storage with the backup (davda54/sam's
    ``p.data = old_p``); "torch_out_swap" writes θ' into the backup with one add per tensor and trades."""

    def norm():
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)), 2)

    def trade():
        for p, b in zip(params, backup):
            p.data, b.data = b.data, p.data

    @torch.no_grad()
    def perturb():
        scale = float(RHO / norm().clamp_min(1e-12))  # one host read of the scale: free on a CPU
        if form == "torch_out_swap":
            for p, g, b in zip(params, grads, backup):
                torch.add(p, g, alpha=scale, out=b)
            trade()
        else:
            torch._foreach_copy_(backup, params)
            torch._foreach_add_(params, grads, alpha=scale)
        return backup

    @torch.no_grad()
    def restore(_):
        if form == "foreach_strong":
            torch._foreach_copy_(params, backup)
        else:
            trade()

    return norm, perturb, restore


def worker(variant, shapes, repeat):
    import unlearn_fast as uf

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with PeakMemory(device):  # fixes glibc's allocation policy (CPU) before anything big is allocated
        pass
    params, grads, total = make_tensors(shapes, device, flat=variant == "triton_flat")
    es = params[0].element_size()
    backend = {"uf_torch": "torch", "cpp": "cpp", "cpp_copy": "cpp", "triton_flat": "triton"}.get(variant)
    exchange = variant == "cpp"
    strong = variant in ("foreach_strong", "foreach_swap", "torch_out_swap")
    extra = {}
    if backend == "cpp":
        from unlearn_fast.ops import _cpp

        uf.ops.global_grad_norm(grads[:1], backend="cpp")  # build / load the extension outside the timings
        extra["cpu_kernels"] = _cpp.capability() if device.type == "cpu" else "cuda"
        extra["auto_backend"] = uf.ops.multi_tensor.resolve_backend("auto", params, grads)

    if variant == "naive_loop":
        norm_fn = lambda: naive_norm(grads)  # noqa: E731
        perturb_fn = lambda: naive_perturb(params, grads)  # noqa: E731
        restore_fn = lambda st: naive_restore(params, st)  # noqa: E731
        one_fresh_step = lambda: restore_fn(perturb_fn())  # noqa: E731
    elif strong:
        norm_fn = strong_baseline(params, grads, [], variant)[0]

        def one_fresh_step():  # what one step allocates if the backup is not kept across steps
            _, perturb, restore = strong_baseline(params, grads, [torch.empty_like(p) for p in params], variant)
            restore(perturb())
    else:
        if variant == "triton_flat":
            from unlearn_fast.flatten import flat_like

            backup = flat_like(params)
        else:
            backup = [torch.empty_like(p) for p in params]
        norm_fn = lambda: uf.ops.global_grad_norm(grads, backend=backend)  # noqa: E731
        perturb_fn = lambda: uf.ops.sam_perturb_(params, grads, RHO, backend=backend, backup=backup,  # noqa: E731
                                                 exchange=exchange)
        restore_fn = uf.ops.sam_restore_
        one_fresh_step = lambda: uf.ops.sam_restore_(  # noqa: E731
            uf.ops.sam_perturb_(params, grads, RHO, backend=backend, exchange=exchange))

    # peak extra memory of one norm + perturb + restore, allocating what the method allocates
    # (a fresh backup, as sam_perturb_ does by default; the strong baselines likewise)
    one_fresh_step()
    with PeakMemory(device) as mem:
        norm_fn()
        one_fresh_step()
    if strong:  # the preallocated backup, made after the measurement
        backup = [torch.empty_like(p) for p in params]
        norm_fn, perturb_fn, restore_fn = strong_baseline(params, grads, backup, variant)

    norm_t, perturb_t, restore_t, copy_t = [], [], [], []
    st = perturb_fn()  # warm-up
    if exchange:  # what the exchange did: a list whose tensors do not own their storage falls back to copies
        extra["exchanged_tensors"] = len(st.exchanged)
    restore_fn(st)
    src = torch.empty(total, dtype=params[0].dtype, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    for _ in range(repeat):  # the copy that sets the bandwidth is timed between the ops, under the same load
        norm_t.append(timed(norm_fn, device, "norm")[0])
        t, st = timed(perturb_fn, device, "perturb")
        perturb_t.append(t)
        restore_t.append(timed(lambda: restore_fn(st), device, "restore")[0])
        copy_t.append(timed(lambda: dst.copy_(src), device, "copy")[0])
    src = dst = None  # the copy's buffers freed before the step below (the lambdas above are done)

    # one SAM step's bookkeeping: norm + perturb + restore + AdamW
    # the tensors become the optimizer's parameters in place (no plain alias left holding their storage,
    # which would stop the exchange)
    params[:] = [torch.nn.Parameter(p) if not isinstance(p, torch.nn.Parameter) else p for p in params]
    opt_params = params
    for p, g in zip(opt_params, grads):
        p.grad = g

    def step_time(opt, sam_step):
        sam_step()  # allocates the optimizer state
        times = [timed(sam_step, device)[0] for _ in range(repeat)]
        opt.state.clear()  # free the moments before the next optimizer
        return statistics.median(times)

    steps = {}
    if variant == "cpp":
        opt = uf.optim.FusedAdamW(opt_params, lr=1e-5, weight_decay=0.0, backend="cpp")

        def sam_step():
            state = uf.ops.sam_perturb_(opt_params, grads, RHO, backend="cpp", backup=backup, exchange=True)
            opt.step(sam_state=state)
        steps["sam_step_s"] = step_time(opt, sam_step)
    else:
        kinds = {"sam_step_s": dict(fused=True), "sam_step_foreach_adamw_s": dict(foreach=True)}
        if not strong:
            kinds = {"sam_step_s": dict(foreach=True)}
        for key, kind in kinds.items():
            opt = torch.optim.AdamW(opt_params, lr=1e-5, weight_decay=0.0, **kind)

            def sam_step():
                with torch.no_grad():
                    st = perturb_fn()
                    restore_fn(st)
                opt.step()
            steps[key] = step_time(opt, sam_step)

    norm_s, perturb_s, restore_s = (statistics.median(x) for x in (norm_t, perturb_t, restore_t))
    # every variant's perturb takes the global norm itself (norm_s is that part, timed alone): the SAM
    # bookkeeping is perturb + restore, and the norm's pass is counted once, in the perturb
    n_norm, n_perturb, n_restore = PASSES.get(variant, COPY_PASSES)
    moved = {"perturb": (n_norm + n_perturb) * total * es, "restore": n_restore * total * es}
    sam_s = perturb_s + restore_s
    copy_gbs = 2 * total * es / statistics.median(copy_t) / 1e9
    achieved = sum(moved.values()) / sam_s / 1e9
    if device.type == "cpu":
        # process CPU time (all threads): on a shared machine what the op costs whatever else runs;
        # with one thread it equals the wall time of a quiet machine
        cpu = {k: statistics.median(v) for k, v in CPU_TIMES.items()}
        threads = torch.get_num_threads()
        extra["sam_cpu_s"] = (cpu["perturb"] + cpu["restore"]) / threads
        extra["copy_gb_per_s_cpu"] = 2 * total * es / (cpu["copy"] / threads) / 1e9
        extra["fraction_of_copy_bw_cpu"] = sum(moved.values()) / extra["sam_cpu_s"] / 1e9 / extra["copy_gb_per_s_cpu"]
    worker_report(norm_s=norm_s, perturb_s=perturb_s, restore_s=restore_s, sam_s=sam_s, **steps,
                  gb_per_s=achieved, copy_gb_per_s=copy_gbs, fraction_of_copy_bw=achieved / copy_gbs,
                  peak_extra_mb=mem.extra / 2**20, param_mb=total * es / 2**20, tensors=len(params), **extra)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CI: checks the plumbing only
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of the variant list (median)")
    parser.add_argument("--dtype", default=None, help="override the dtype (float32, bfloat16)")
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--json", default=None, help="results path (default bench/results/sam-<device>-<date>.json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, json.loads(args.shapes), args.repeat)
    cuda = torch.cuda.is_available()
    shapes = dict(TINY_SHAPES if args.tiny else QUICK_SHAPES if args.quick else (GPU_SHAPES if cuda else CPU_SHAPES))
    if args.dtype:
        shapes["dtype"] = args.dtype
    variants = args.variants.split(",") if args.variants else VARIANTS + (GPU_VARIANTS if cuda else [])
    device = torch.device("cuda" if cuda else "cpu")
    total = sum(torch.Size(s).numel() for s in llama_shapes(shapes))
    print(f"SAM benchmark on {device}: {shapes}, {len(llama_shapes(shapes))} tensors, {total / 1e6:.1f}M params")
    loads = {}
    results = run_variants(__file__, variants, ["--shapes", json.dumps(shapes), "--repeat", str(args.repeat)],
                           rounds=args.rounds, loads=loads)
    ratios, targets = summarise(results, cuda)
    import os

    threads = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={threads} " if threads else "") + "python bench/bench_sam.py" + (" --quick" if args.quick else "") + (
        f" --dtype {args.dtype}" if args.dtype else "") + (f" --rounds {args.rounds}" if args.rounds != 3 else "") + (
        f" --variants {args.variants}" if args.variants else "") + (f" --repeat {args.repeat}" if args.repeat != 7 else "")
    payload = {
        "environment": environment(device),
        "command": command,
        "shapes": {**shapes, "tensors": len(llama_shapes(shapes)), "params_M": round(total / 1e6, 2)},
        "baseline": "foreach_strong",
        "variants": results,
        "loadavg": loads,
        "ratios": ratios,
        "targets": targets,
    }
    name = "sam" + ("-quick" if args.quick else "") + (f"-{args.dtype}" if args.dtype else "")
    out = write_results(name, payload, args.json)
    print_summary(out, ratios, targets)
    return out


def summarise(results, cuda):
    def fig(variant, key):
        return figure(results, variant, key)

    ours = "triton_flat" if cuda and "error" not in results.get("triton_flat", {"error": 1}) else "cpp"
    pairs = {
        "strong_over_ours_sam_time": ("foreach_strong", ours, "sam_s"),
        "strong_over_ours_step_time": ("foreach_strong", "cpp", "sam_step_s"),
        "foreach_swap_over_ours_sam_time": ("foreach_swap", ours, "sam_s"),
        "torch_out_swap_over_ours_sam_time": ("torch_out_swap", ours, "sam_s"),
        "copy_restore_over_ours_sam_time": ("cpp_copy", "cpp", "sam_s"),
        "uf_torch_over_ours_sam_time": ("uf_torch", ours, "sam_s"),
        "naive_over_ours_sam_time": ("naive_loop", ours, "sam_s"),
        "ours_over_strong_peak_memory": (ours, "foreach_strong", "peak_extra_mb"),
    }
    ratios = ratios_of(results, pairs)
    ratios |= {f"{k}_cpu": v for k, v in ratios_of(results, {
        "strong_over_ours_sam_time": ("foreach_strong", ours, "sam_cpu_s")}).items()}
    if fig(ours, "fraction_of_copy_bw_cpu") is not None:
        ratios["ours_fraction_of_copy_bw_cpu"] = fig(ours, "fraction_of_copy_bw_cpu")
    strong_steps = [x for x in (fig("foreach_strong", "sam_step_s"), fig("foreach_strong", "sam_step_foreach_adamw_s"))
                    if x is not None]
    if strong_steps and fig("cpp", "sam_step_s"):  # the strong step takes the faster of its two optimizers
        if fig("foreach_strong", "sam_step_foreach_adamw_s") is not None:
            ratios["strong_foreach_adamw_over_ours_step_time"] = (fig("foreach_strong", "sam_step_foreach_adamw_s")
                                                                  / fig("cpp", "sam_step_s"))
        ratios["strong_best_adamw_over_ours_step_time"] = min(strong_steps) / fig("cpp", "sam_step_s")
    if fig(ours, "peak_extra_mb") is not None and fig(ours, "param_mb"):
        ratios["ours_peak_over_param_size"] = fig(ours, "peak_extra_mb") / fig(ours, "param_mb")
    if fig(ours, "fraction_of_copy_bw") is not None:
        ratios["ours_fraction_of_copy_bw"] = fig(ours, "fraction_of_copy_bw")
    if fig("foreach_strong", "fraction_of_copy_bw") is not None:
        ratios["strong_fraction_of_copy_bw"] = fig("foreach_strong", "fraction_of_copy_bw")
    targets = {}
    if cuda:
        if "ours_fraction_of_copy_bw" in ratios:
            targets["ours_fraction_of_copy_bw >= 0.8"] = ratios["ours_fraction_of_copy_bw"] >= 0.8
    else:
        if "strong_over_ours_sam_time" in ratios:
            targets["strong_over_ours_sam_time >= 1.2"] = ratios["strong_over_ours_sam_time"] >= 1.2
        if "ours_fraction_of_copy_bw" in ratios:
            targets["ours_fraction_of_copy_bw >= 0.85"] = ratios["ours_fraction_of_copy_bw"] >= 0.85
        if "strong_best_adamw_over_ours_step_time" in ratios:
            targets["strong_best_adamw_over_ours_step_time >= 1.0"] = ratios["strong_best_adamw_over_ours_step_time"] >= 1.0
    if "ours_peak_over_param_size" in ratios:
        targets["ours_peak_over_param_size <= 1.05"] = ratios["ours_peak_over_param_size"] <= 1.05
    return ratios, targets


if __name__ == "__main__":
    main()
