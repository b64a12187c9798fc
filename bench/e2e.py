"""End-to-end unlearning steps, unlearn_fast against the reference approach, side by side.

Methods: npo (forget NPO + retain CE), npo_ilu (+ ILU logit penalty, one
environment), npo_sam (SAM on the forget loss), npo_sam_ilu, rmu, npo_adv (C-AdvUL: the forget loss at
embedding-attacked prompts; ours only, with the attack's per-step cost). Each runs in
up to three implementations — ``ours`` (``uf.unlearning_gradients``; NPO reads the
reference NLL cached once by ``uf.reference_nll``: no reference model),
``ref`` (``bench/reference_unlearn.py``: the public code's approach) and, for
the NPO methods, ``plain`` (``bench/plain_unlearn.py``: the same objective
written well in plain torch — cached reference NLL, no clones, foreach SAM with
one preallocated backup — the baseline that shows the method's own saving) —
each variant in its own process, from the same seeded model init and the same
batches, followed by gradient clipping (1.0) and an AdamW step.

Figures per variant: median step time over the steps after warm-up, tokens/s
(non-padding tokens of every batch the step consumes), peak memory above the
memory live after the model was loaded (set-up, warm-up and timed steps
included: optimizer state, reference/frozen model copies, caches, activations;
CPU: the process's resident-set high-water mark, CUDA: the allocator's peak),
the same peak less the training state both implementations hold alike (the
trainable weights' gradients and AdamW's two moments: ``peak_method_mb``, what
the method itself costs), and the objective at the first step (ours and ref
must agree).

    python bench/e2e.py --quick                        # CPU, small Llama, a few minutes
    python bench/e2e.py --model-size 1b                # GPU, Llama-3.2-1B shape, bf16, seq 512, batch 4
    python bench/e2e.py --model-size 8b                # GPU, Llama-3-8B shape (full parameters)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from unlearn_fast.recipes.methods import objective_settings, parse_method  # noqa: E402

from _common import (RESULTS_DIR, PeakMemory, environment, ratios_of, run_variants, sync, worker_report,  # noqa: E402
                     write_results)

METHODS = ["npo", "npo_ilu", "npo_sam", "npo_sam_ilu", "rmu", "npo_adv"]
IMPLS = ["ours", "ref", "plain"]
OURS_ONLY = ("npo_adv",)  # the reference code has no embedding attack
ALL_VARIANTS = [f"{impl}_{m}" for m in METHODS for impl in IMPLS
                if not (impl == "plain" and m == "rmu") and not (impl != "ours" and m in OURS_ONLY)]

# Llama shapes (random init from the config: no hub access). quick/tiny are CPU shapes.
SHAPES = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1024, seq=32, batch=2,
                 tie=False, dtype="float32", rmu_layer=1),
    "quick": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=32000, seq=128, batch=4,
                  tie=False, dtype="float32", rmu_layer=2),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, seq=512, batch=4,
               tie=True, dtype="bfloat16", rmu_layer=7),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, seq=512, batch=4,
               tie=False, dtype="bfloat16", rmu_layer=7),
}
HPARAMS = dict(beta=0.1, forget_weight=1.0, retain_weight=1.0, sam_rho=0.01, irm_weight=1.0, lr=5e-6,
               rmu_steering=6.5, rmu_alpha=1200.0, rmu_lr=5e-5, seed=0,
               adv_eps=0.05, adv_steps=10, adv_step_size=1e-4)  # C-AdvUL: the public code's attack
PROMPT = 8  # label -100 on the first tokens of every sequence (the "question")


# On the CPU each variant runs in two processes: one measures peak memory under the allocation policy
# that makes the resident set track live memory (every block over 128 KiB mmapped and returned at
# free: a fresh large tensor is new pages, faulted in as it is first written), the other ("@time")
# measures step times under glibc's default policy, the one a training script runs with (freed blocks
# up to 32 MiB are reused from the heap). On CUDA the caching allocator serves both in one process.
TIMING = "time"


# -- worker ---------------------------------------------------------------------------------------

def build_model(shape: dict, device: torch.device, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(shape["seq"], 64),
        tie_word_embeddings=shape["tie"], attn_implementation=attn,
    )
    dtype = getattr(torch, shape["dtype"])
    torch.manual_seed(HPARAMS["seed"])  # same init in every process, on one device kind
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype (8B: no fp32 copy)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def make_batches(shape: dict, count: int, device: torch.device, salt: int) -> list[dict]:
    """HF-style batches: random tokens, -100 on the prompt and on right padding (the last row is shorter)."""
    g = torch.Generator().manual_seed(1000 * salt + 7)
    out = []
    b, t, vocab = shape["batch"], shape["seq"], shape["vocab"]
    for _ in range(count):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if b > 1:
            mask[-1, t - t // 8:] = 0
        ids[mask == 0] = 0
        labels = ids.clone()
        labels[:, :min(PROMPT, t // 4)] = -100
        labels[mask == 0] = -100
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return out


def parse_variant(variant: str) -> tuple[str, str]:
    """'ours_npo_sam' -> ('ours', 'npo_sam'); the method part is read by the package's one method parser."""
    impl, _, method = variant.partition("_")
    if impl not in IMPLS or method not in METHODS or variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(ALL_VARIANTS)}")
    return impl, method


def ours_config(method):
    """The ``uf.UnlearnConfig`` of a method at the benchmark's hyper-parameters."""
    import unlearn_fast as uf

    hp = HPARAMS
    if method == "rmu":
        return uf.UnlearnConfig(method="rmu", rmu_layer=hp["rmu_layer"], rmu_steering=hp["rmu_steering"],
                                rmu_alpha=hp["rmu_alpha"], seed=hp["seed"], compat="reference")
    return uf.UnlearnConfig(
        **objective_settings(parse_method(method), sam_rho=hp["sam_rho"], irm_weight=hp["irm_weight"],
                             adv_eps=hp["adv_eps"], adv_steps=hp["adv_steps"], adv_step_size=hp["adv_step_size"]),
        beta=hp["beta"], forget_weight=hp["forget_weight"], retain_weight=hp["retain_weight"])


def ours_stepper(model, method, forget_batches):
    import unlearn_fast as uf

    config = ours_config(method)
    if method != "rmu":
        # NPO's reference NLL: once, before training, from the start model (SPEC §1.1)
        for batch in forget_batches:
            # unpadded examples: reference_nll re-pads them into this very batch
            examples = [{"input_ids": ids[m.bool()], "labels": y[m.bool()]}
                        for ids, y, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
            batch["ref_nll"] = uf.reference_nll(model, examples, batch_size=len(examples)).to(batch["input_ids"].device)

    def gradients(forget, retain, envs):
        return uf.unlearning_gradients(model, forget, retain, envs, config)["loss"]

    return gradients


def plain_stepper(model, method, forget_batches):
    from plain_unlearn import PlainUnlearner
    import unlearn_fast as uf

    hp = HPARAMS
    for batch in forget_batches:  # the reference NLL, cached once before training like ours
        examples = [{"input_ids": ids[m.bool()], "labels": y[m.bool()]}
                    for ids, y, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]
        batch["ref_nll"] = uf.reference_nll(model, examples, batch_size=len(examples)).to(batch["input_ids"].device)
    plain = PlainUnlearner(model, beta=hp["beta"], forget_weight=hp["forget_weight"],
                           retain_weight=hp["retain_weight"], sam_rho=hp["sam_rho"] if "sam" in method else 0.0,
                           irm_weight=hp["irm_weight"] if "ilu" in method else 0.0)
    return plain.gradients


def ref_stepper(model, method):
    from reference_unlearn import ReferenceUnlearner
    from unlearn_fast.objectives.rmu import steering_vector

    hp = HPARAMS
    if method == "rmu":
        u = steering_vector(model.config.hidden_size, hp["seed"], next(model.parameters()).device, torch.float32)
        ref = ReferenceUnlearner(model, "rmu", rmu_layer=hp["rmu_layer"], rmu_steering=hp["rmu_steering"],
                                 rmu_alpha=hp["rmu_alpha"], steering=u)
    else:
        ref = ReferenceUnlearner(model, "npo", beta=hp["beta"], forget_weight=hp["forget_weight"],
                                 retain_weight=hp["retain_weight"], sam_rho=hp["sam_rho"] if parse_method(method).sam else 0.0,
                                 irm_weight=hp["irm_weight"] if parse_method(method).ilu else 0.0)
    return ref.gradients


def worker(variant: str, shape: dict, steps: int, warmup: int, device: torch.device) -> None:
    variant, _, measure = variant.partition("@")
    impl, method = parse_variant(variant)
    timing = measure == TIMING
    if not timing:
        with PeakMemory(device):  # the first PeakMemory also fixes glibc's allocation policy (CPU)
            pass
    # The reference's double backprop needs the math attention path; everything else uses sdpa.
    attn = "eager" if impl in ("ref", "plain") and parse_method(method).ilu else "sdpa"
    model = build_model(shape, device, attn)
    HPARAMS["rmu_layer"] = shape["rmu_layer"]
    if method == "rmu":
        import unlearn_fast as uf

        uf.rmu_trainable(model, shape["rmu_layer"])
    n = max(1, min(steps + warmup, 4))  # a few distinct batches, cycled
    forget, retain, env = (make_batches(shape, n, device, salt) for salt in (1, 2, 3))
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    times, cpu_times, first_loss = [], [], None
    try:
        with (contextlib.nullcontext(None) if timing else PeakMemory(device)) as mem:
            gradients = (ours_stepper(model, method, forget) if impl == "ours" else
                         plain_stepper(model, method, forget) if impl == "plain" else ref_stepper(model, method))
            lr = HPARAMS["rmu_lr"] if method == "rmu" else HPARAMS["lr"]
            # torch's fused AdamW for every implementation: one pass, no foreach temporaries (a
            # weights-sized copy at 8B); the step is not what the implementations differ in
            opt = torch.optim.AdamW(params, lr=lr, fused=True)
            for i in range(warmup + steps):
                k = i % n
                envs = [env[k]] if parse_method(method).ilu else []
                sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                opt.zero_grad(set_to_none=True)
                loss = gradients(forget[k], retain[k], envs)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sync(device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
                if i == 0:
                    first_loss = float(loss)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    attack_cost = {}
    keeps_times = timing or device.type != "cpu"  # a CPU memory process's times are only the mmap-policy ones
    if fits and keeps_times and parse_method(method).adv:  # after the peak: one attack step vs a forget fwd+bwd
        from bench_embedding_attack import attack_step_fraction

        attack_cost = attack_step_fraction(model, forget[0], device, attack_steps=HPARAMS["adv_steps"],
                                           repeat=max(steps, 3))
    tokens = sum(int(b["attention_mask"].sum()) for b in (forget[0], retain[0]))
    if parse_method(method).ilu:
        tokens += int(env[0]["attention_mask"].sum())
    if not fits:
        worker_report(impl=impl, method=method, fits=False)
        return
    median = statistics.median(times)
    timed = dict(impl=impl, method=method, median_step_s=median, tokens_per_s=tokens / median,
                 median_cpu_s=statistics.median(cpu_times), fits=True, **attack_cost)
    if timing:
        worker_report(**timed)
        return
    base = mem.base
    # The training state both implementations hold alike: gradients of the trainable weights and the
    # optimizer's state. What is left of the peak is what the method itself costs (reference-model
    # copies, logits, clones, activations, workspaces).
    state_bytes = sum(p.numel() * p.element_size() for p in params) + sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    worker_report(**timed, peak_extra_mb=mem.extra / 2**20, peak_total_mb=(base + mem.extra) / 2**20,
                  training_state_mb=state_bytes / 2**20, peak_method_mb=(mem.extra - state_bytes) / 2**20,
                  model_mb=param_bytes / 2**20, first_loss=first_loss)


# -- driver ---------------------------------------------------------------------------------------

TIME_FIELDS = ("median_step_s", "tokens_per_s", "median_cpu_s")


def merge_timing(memory: dict, timing: dict) -> dict:
    """One variant's figures: peak memory (and the first-step objective) from its memory process, step
    times from its timing process; the memory process's own step times are kept as ``*_mmap_policy``."""
    if "error" in memory or "error" in timing or not memory.get("fits", True) or not timing.get("fits", True):
        return memory if "error" in memory or not memory.get("fits", True) else timing
    merged = dict(memory)
    for key in TIME_FIELDS:
        if key in memory:
            merged[f"{key}_mmap_policy"] = memory[key]
    merged.update({k: v for k, v in timing.items() if k not in ("impl", "method", "fits", "rounds")})
    merged["timing_allocator"] = "glibc default (own process)"
    return merged


def summarise(results: dict) -> tuple[dict, dict]:
    pairs = {
        "ilu_over_npo": ("ours_npo_ilu", "ours_npo", "median_step_s"),
        "sam_over_npo": ("ours_npo_sam", "ours_npo", "median_step_s"),
        "sam_ilu_over_npo": ("ours_npo_sam_ilu", "ours_npo", "median_step_s"),
        "ref_over_ours_time": ("ref_npo", "ours_npo", "median_step_s"),
        "ref_over_ours_memory": ("ref_npo", "ours_npo", "peak_extra_mb"),
        "ref_over_ours_method_memory": ("ref_npo", "ours_npo", "peak_method_mb"),
        "ref_over_ours_total_memory": ("ref_npo", "ours_npo", "peak_total_mb"),
        "ref_over_ours_time_sam_ilu": ("ref_npo_sam_ilu", "ours_npo_sam_ilu", "median_step_s"),
        "ref_over_ours_memory_sam_ilu": ("ref_npo_sam_ilu", "ours_npo_sam_ilu", "peak_extra_mb"),
        "ref_over_ours_method_memory_sam_ilu": ("ref_npo_sam_ilu", "ours_npo_sam_ilu", "peak_method_mb"),
        "ref_ilu_over_ref_npo": ("ref_npo_ilu", "ref_npo", "median_step_s"),
        "ref_over_ours_time_rmu": ("ref_rmu", "ours_rmu", "median_step_s"),
        "ref_over_ours_memory_rmu": ("ref_rmu", "ours_rmu", "peak_extra_mb"),
        # against the well-written plain loop: what the method itself saves
        "plain_over_ours_time": ("plain_npo", "ours_npo", "median_step_s"),
        "plain_over_ours_memory": ("plain_npo", "ours_npo", "peak_extra_mb"),
        "plain_over_ours_method_memory": ("plain_npo", "ours_npo", "peak_method_mb"),
        "plain_over_ours_time_ilu": ("plain_npo_ilu", "ours_npo_ilu", "median_step_s"),
        "plain_over_ours_time_sam": ("plain_npo_sam", "ours_npo_sam", "median_step_s"),
        "plain_over_ours_time_sam_ilu": ("plain_npo_sam_ilu", "ours_npo_sam_ilu", "median_step_s"),
        "plain_over_ours_method_memory_sam_ilu": ("plain_npo_sam_ilu", "ours_npo_sam_ilu", "peak_method_mb"),
        "adv_over_npo": ("ours_npo_adv", "ours_npo", "median_step_s"),
        "adv_over_npo_memory": ("ours_npo_adv", "ours_npo", "peak_extra_mb"),
    }
    ratios = ratios_of(results, pairs)
    adv = results.get("ours_npo_adv", {})
    if "attack_step_over_fwd_bwd" in adv:  # measured in the npo_adv worker (bench_embedding_attack's timing)
        ratios["attack_step_over_fwd_bwd"] = adv["attack_step_over_fwd_bwd"]
    npo_peak = results.get("ours_npo", {}).get("peak_extra_mb")
    if adv.get("peak_extra_mb") is not None and npo_peak is not None:
        # what the attack adds to the step's peak, in units of the parameters' size (no weight-gradient buffer)
        ratios["adv_extra_peak_over_params"] = (adv["peak_extra_mb"] - npo_peak) / adv["model_mb"]
    # The same time ratios from process CPU time: on a shared CPU machine (one intra-op thread) this is
    # what a step costs, whatever else the machine runs; wall-clock ratios there carry the load's noise.
    cpu_ratios = {f"{k}_cpu": r for k, r in ratios_of(
        results, {k: (a, b, "median_cpu_s") for k, (a, b, key) in pairs.items() if key == "median_step_s"}).items()}
    if "attack_step_over_fwd_bwd_cpu" in adv:
        cpu_ratios["attack_step_over_fwd_bwd_cpu"] = adv["attack_step_over_fwd_bwd_cpu"]
    limits = {"ilu_over_npo <= 1.4": ("ilu_over_npo", lambda r: r <= 1.4),
              "sam_over_npo <= 1.5": ("sam_over_npo", lambda r: r <= 1.5),
              "ref_over_ours_time >= 2": ("ref_over_ours_time", lambda r: r >= 2.0),
              "ref_over_ours_method_memory >= 2.5": ("ref_over_ours_method_memory", lambda r: r >= 2.5),
              "attack_step_over_fwd_bwd <= 0.75": ("attack_step_over_fwd_bwd", lambda r: r <= 0.75),
              "adv_extra_peak_over_params < 1": ("adv_extra_peak_over_params", lambda r: r < 1.0)}
    targets = {name: ok(ratios[key]) for name, (key, ok) in limits.items() if key in ratios}
    targets |= {f"{name} (cpu time)": ok(cpu_ratios[key + "_cpu"]) for name, (key, ok) in limits.items()
                if key + "_cpu" in cpu_ratios}
    return ratios | cpu_ratios, targets


def loss_agreement(results: dict) -> dict:
    """Relative difference of the first-step objective, ours against ref, per method (same init, same batches)."""
    out = {}
    for m in METHODS:
        a = results.get(f"ours_{m}", {}).get("first_loss")
        b = results.get(f"ref_{m}", {}).get("first_loss")
        if a is not None and b is not None:
            out[m] = abs(a - b) / max(abs(b), 1e-12)
    return out


def plot(path: Path, payload: dict) -> Path:
    """Step time and peak memory per method, ours beside ref, next to the JSON (same stem, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = payload["variants"]
    methods = [m for m in METHODS if any(f"{i}_{m}" in variants for i in IMPLS)]
    panels = [("median_step_s", "step time (s, median, wall clock)"),
              ("peak_extra_mb", "peak memory above model (MiB)")]
    if any("median_cpu_s" in v for v in variants.values()):
        panels.insert(1, ("median_cpu_s", "step time (s, median, process CPU time)"))
    if any("peak_method_mb" in v for v in variants.values()):
        panels.append(("peak_method_mb", "same, less gradients + AdamW state (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    impls = [i for i in IMPLS if any(f"{i}_{m}" in variants for m in methods)]
    width = 0.8 / max(len(impls), 1)
    names = {"ours": "unlearn_fast", "ref": "reference", "plain": "plain torch loop"}
    for ax, (key, label) in zip(axes, panels):
        for j, impl in enumerate(impls):
            vals = [variants.get(f"{impl}_{m}", {}).get(key) or 0.0 for m in methods]
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(methods))]
            bars = ax.bar(xs, vals, width, label=names[impl])
            ax.bar_label(bars, fmt="%.0f" if key.endswith("_mb") else "%.3g", fontsize=7)
        ax.margins(y=0.12)  # room for the bar labels
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylabel(label)
        ax.legend()
    env = payload["environment"]
    fig.suptitle(f"{payload['shape_name']} on {env['device']} — torch {env['versions'].get('torch')} — {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU shape: small Llama, a few steps")
    parser.add_argument("--model-size", choices=sorted(SHAPES), default=None,
                        help="1b | 8b (GPU, bf16, seq 512, batch 4); quick | tiny (CPU)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(ALL_VARIANTS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 10 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 3 on GPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: intra-op threads per worker (default 1: oversubscribed threads on a shared "
                             "machine make medians meaningless)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved runs of the variant list (median)")
    parser.add_argument("--json", default=None, help="results path (default bench/results/e2e-<device>-<date>.json)")
    parser.add_argument("--note", default=None, help="a remark stored with the results (e.g. machine load)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    steps = args.steps if args.steps is not None else (10 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    threads = args.threads if args.threads is not None else (torch.get_num_threads() if on_gpu else 1)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if args.worker:
        return worker(args.worker, json.loads(args.shape), steps, warmup, device)

    size = args.model_size or ("quick" if args.quick or not on_gpu else "1b")
    shape = dict(SHAPES[size])
    variants = args.variants.split(",") if args.variants else ALL_VARIANTS
    for v in variants:
        parse_variant(v)
    print(f"end-to-end unlearning steps on {device}, shape {size}: {shape}")
    worker_args = ["--shape", json.dumps(shape), "--steps", str(steps), "--warmup", str(warmup),
                   "--device", device.type, "--threads", str(threads)]
    loads = {}
    split = not on_gpu  # memory and step times from separate processes (see TIMING)
    runs = [w for v in variants for w in ((v, f"{v}@{TIMING}") if split else (v,))]
    results = run_variants(__file__, runs, worker_args, timeout=3600, loads=loads, rounds=args.rounds)
    if split:
        results = {v: merge_timing(results[v], results[f"{v}@{TIMING}"]) for v in variants}
    ratios, targets = summarise(results)
    env = environment(device)
    command = "python bench/e2e.py " + (f"--model-size {size}" if size not in ("quick",) else "--quick")
    if args.variants:
        command += f" --variants {args.variants}"
    command += f" --steps {steps} --warmup {warmup}" + ("" if on_gpu else f" --threads {threads}")
    if args.rounds != 1:
        command += f" --rounds {args.rounds}"
    payload = {
        "environment": env,
        "command": command,
        "shape_name": size,
        "shapes": {**shape, "steps": steps, "warmup": warmup},
        "hyperparameters": HPARAMS | {"rmu_layer": shape["rmu_layer"]},
        "variants": results,
        "loadavg": loads,
        "ratios": ratios,
        "targets": targets,
        "first_loss_rel_diff": loss_agreement(results),
    }
    if args.note:
        payload["note"] = args.note
    if size == "8b":
        payload["npo_sam_ilu_fits"] = {impl: results.get(f"{impl}_npo_sam_ilu", {}).get("fits")
                                       for impl in IMPLS}
    day = _dt.date.today().isoformat()
    out = Path(args.json) if args.json else RESULTS_DIR / f"e2e-{size}-{env['device']}-{day}.json"
    in_results = out.resolve().parent == RESULTS_DIR.resolve()
    if not args.no_plot:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload["plot"] = plot(out, payload).name
    out = write_results("e2e", payload, str(out), regenerate=in_results)
    print(f"wrote {out}" + (" and bench/RESULTS.md" if in_results else ""))
    for k, v in ratios.items():
        print(f"  {k:32s} {v:.3f}")
    for k, v in targets.items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")
    for k, v in payload["first_loss_rel_diff"].items():
        print(f"  first-step objective, ours vs ref, {k}: rel diff {v:.2e}")
    return payload


if __name__ == "__main__":
    main()
