"""Cost of the embedding-space attack (SPEC §1.5) and of C-AdvUL's training step, side by side in one run.

Figures (median over repeats, wall clock and process CPU time):
- ``attack_step_s``: one attack step of ``uf.embedding_attack`` (a forward and an input-only backward: the
  parameters are frozen, so no weight-gradient matmul and no weight-gradient buffer), from a call of
  ``--attack-steps`` steps divided by their number;
- ``forget_fwd_bwd_s``: the full forget forward+backward of the same batch (GA's CE, parameter gradients);
- ``step_npo_s`` / ``step_npo_adv_s``: a whole ``uf.unlearning_gradients`` step of NPO (forget + retain)
  and of NPO with the attack (``adv_eps=0.05``, ``adv_steps`` as given);
- peak memory above what is live before each, each in a fresh process (CPU: the resident-set high-water
  mark), with a no-grad forget forward as the floor: what the attack holds beyond that floor must be less
  than a parameter-sized buffer (it forms no weight gradient).
Ratios: ``attack_step_over_fwd_bwd`` (target <= 0.75) and ``npo_adv_over_npo``.

    python bench/bench_embedding_attack.py                      # CPU, the e2e 'quick' Llama shape
    python bench/bench_embedding_attack.py --shape 1b --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _common import PeakMemory, environment, loadavg, median_wall_and_cpu, write_results  # noqa: E402

# Llama shapes of bench/e2e.py (random init; no hub access)
SHAPES = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1024, seq=32, batch=2,
                 dtype="float32"),
    "quick": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=32000, seq=128, batch=4,
                  dtype="float32"),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, seq=512, batch=4,
               dtype="bfloat16"),
}
PROMPT = 8  # -100 on the first tokens: the prompt the attack perturbs


def build(shape, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=max(shape["seq"], 64), attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, shape["dtype"])).train()


def batch_of(shape, device, salt):
    g = torch.Generator().manual_seed(salt)
    b, t = shape["batch"], shape["seq"]
    ids = torch.randint(1, shape["vocab"], (b, t), generator=g)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones(b, t, dtype=torch.long, device=device)}


def peak_mb(fn, device, repeat=3):
    """Smallest extra peak over a few calls, after a warm-up call (allocator state settled)."""
    import unlearn_fast as uf

    fn()
    out = []
    for _ in range(repeat):
        uf.ops.release_workspace()  # the CPU linear CE keeps its logits block between calls: count it
        with PeakMemory(device) as mem:
            fn()
        out.append(mem.extra / 2**20)
    return min(out)


def peak_in_fresh_process(which: str, args) -> float:
    """Each peak in its own process, so that one figure's allocations do not hide or inflate another's."""
    cmd = [sys.executable, __file__, "--peak", which, "--shape", args.shape, "--device", args.device,
           "--threads", str(args.threads), "--attack-steps", str(args.attack_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def attack_and_fwd_bwd(model, forget, *, attack_steps=10, eps=0.05, step_size=1e-4):
    """The two calls whose times make the per-attack-step fraction: ``attack()`` (one ``uf.embedding_attack``
    of ``attack_steps`` steps on the forget batch) and ``fwd_bwd()`` (the full forget forward+backward of the
    same batch: GA's CE, parameter gradients, dropped afterwards so that none is live at the next call)."""
    import unlearn_fast as uf
    from unlearn_fast.objectives.lm import lm_parts
    from unlearn_fast.objectives.losses import forget_loss

    parts, ga = lm_parts(model), uf.UnlearnConfig(method="ga")

    def attack():
        uf.embedding_attack(model, forget["input_ids"], forget["labels"], attention_mask=forget["attention_mask"],
                            eps=eps, steps=attack_steps, step_size=step_size)

    def fwd_bwd():
        loss, _ = forget_loss(parts, forget, ga)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return attack, fwd_bwd


def attack_step_fraction(model, forget, device, *, attack_steps=10, repeat=3) -> dict:
    """Median wall / process-CPU time of one attack step and of a full forget forward+backward, measured
    interleaved (a load change hits both alike), and their ratios (SPEC §1.5 target: <= 0.75)."""
    attack, fwd_bwd = attack_and_fwd_bwd(model, forget, attack_steps=attack_steps)
    attack(), fwd_bwd()  # warm-up
    runs = {"attack": [], "fwd_bwd": []}
    for _ in range(repeat):
        runs["attack"].append(median_wall_and_cpu(attack, device, repeat=1))
        runs["fwd_bwd"].append(median_wall_and_cpu(fwd_bwd, device, repeat=1))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    return {"attack_step_s": med["attack"][0] / attack_steps, "attack_step_cpu_s": med["attack"][1] / attack_steps,
            "forget_fwd_bwd_s": med["fwd_bwd"][0], "forget_fwd_bwd_cpu_s": med["fwd_bwd"][1],
            "attack_step_over_fwd_bwd": med["attack"][0] / attack_steps / med["fwd_bwd"][0],
            "attack_step_over_fwd_bwd_cpu": med["attack"][1] / attack_steps / med["fwd_bwd"][1]}


def main(argv=None):
    import unlearn_fast as uf
    from unlearn_fast.objectives.lm import lm_parts
    from unlearn_fast.objectives.losses import forget_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="results path (default bench/results/embedding_attack-...)")
    parser.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # worker: print one peak in MiB
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.attack_steps < 1 or args.threads < 1:
        raise ValueError("--repeat, --attack-steps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    model = build(shape, device)
    parts = lm_parts(model)
    forget, retain = batch_of(shape, device, 1), batch_of(shape, device, 2)
    examples = [{"input_ids": i, "labels": y} for i, y in zip(forget["input_ids"].cpu(), forget["labels"].cpu())]
    forget["ref_nll"] = uf.reference_nll(model, examples, batch_size=len(examples)).to(device)
    npo = uf.UnlearnConfig(method="npo", beta=0.1)
    npo_adv = uf.UnlearnConfig(method="npo", beta=0.1, adv_eps=0.05, adv_steps=args.attack_steps)
    ga = uf.UnlearnConfig(method="ga")
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    load_before = loadavg()

    # The gradients are dropped after each call, so that none is live when the next call's peak is measured.
    attack, fwd_bwd = attack_and_fwd_bwd(model, forget, attack_steps=args.attack_steps)

    def step(config):
        def run():
            uf.unlearning_gradients(model, forget, retain, config=config)
            model.zero_grad(set_to_none=True)
        return run

    def forward_only():
        with torch.no_grad():
            forget_loss(parts, forget, ga)

    if args.peak:
        fn = {"attack": attack, "forward_only": forward_only, "fwd_bwd": fwd_bwd, "npo": step(npo),
              "npo_adv": step(npo_adv)}[args.peak]
        with PeakMemory(device):  # the first PeakMemory fixes glibc's allocation policy (CPU)
            pass
        print(peak_mb(fn, device))
        return None

    # interleaved so that a change in the machine's load hits both sides of each ratio alike
    figures = {k: [] for k in ("attack", "fwd_bwd", "npo", "npo_adv")}
    fns = {"attack": attack, "fwd_bwd": fwd_bwd, "npo": step(npo), "npo_adv": step(npo_adv)}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for name, fn in fns.items():
            figures[name].append(median_wall_and_cpu(fn, device, repeat=1))
    med = {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for name, v in figures.items()}
    peaks = {name: peak_in_fresh_process(name, args) for name in ("attack", "forward_only", "fwd_bwd", "npo",
                                                                     "npo_adv")}
    steps = args.attack_steps
    variants = {
        "attack_step": {"median_s": med["attack"][0] / steps, "median_cpu_s": med["attack"][1] / steps,
                        "peak_extra_mb": peaks["attack"]},
        "forget_fwd_bwd": {"median_s": med["fwd_bwd"][0], "median_cpu_s": med["fwd_bwd"][1],
                           "peak_extra_mb": peaks["fwd_bwd"]},
        "forget_forward_no_grad": {"peak_extra_mb": peaks["forward_only"]},
        "npo_step": {"median_s": med["npo"][0], "median_cpu_s": med["npo"][1], "peak_extra_mb": peaks["npo"]},
        "npo_adv_step": {"median_s": med["npo_adv"][0], "median_cpu_s": med["npo_adv"][1],
                         "peak_extra_mb": peaks["npo_adv"]},
    }
    ratios = {
        "attack_step_over_fwd_bwd": variants["attack_step"]["median_s"] / variants["forget_fwd_bwd"]["median_s"],
        "attack_step_over_fwd_bwd_cpu": variants["attack_step"]["median_cpu_s"]
        / variants["forget_fwd_bwd"]["median_cpu_s"],
        "npo_adv_over_npo": variants["npo_adv_step"]["median_s"] / variants["npo_step"]["median_s"],
        "npo_adv_over_npo_cpu": variants["npo_adv_step"]["median_cpu_s"] / variants["npo_step"]["median_cpu_s"],
        # what the attack holds beyond a plain no-grad forward of the same batch, against the parameters' size
        "attack_extra_over_params": (peaks["attack"] - peaks["forward_only"]) / param_mb,
    }
    targets = {"attack_step_over_fwd_bwd <= 0.75": ratios["attack_step_over_fwd_bwd"] <= 0.75,
               "attack_step_over_fwd_bwd <= 0.75 (cpu time)": ratios["attack_step_over_fwd_bwd_cpu"] <= 0.75,
               "attack peak - no-grad forward peak < parameter size":
                   peaks["attack"] - peaks["forward_only"] < param_mb}
    env = environment(device)  # CPU model and vector extensions included (_common.cpu_info)
    command = (f"python bench/bench_embedding_attack.py --shape {args.shape} --device {args.device} "
               f"--threads {args.threads} --repeat {args.repeat} --attack-steps {steps}")
    payload = {"environment": env, "command": command, "shapes": {**shape, "prompt": PROMPT, "attack_steps": steps},
               "parameters_mb": param_mb, "variants": variants, "ratios": ratios, "targets": targets,
               "loadavg_before": load_before, "loadavg_after": loadavg()}
    day = time.strftime("%Y-%m-%d")
    out = write_results("embedding_attack", payload, args.json or str(
        Path(__file__).resolve().parent / "results" / f"embedding_attack-{args.shape}-{env['device']}-{day}.json"),
        regenerate=False)
    print(f"wrote {out}")
    for name, fig in variants.items():
        print(f"  {name:16s} " + "  ".join(f"{k}={v:.4g}" for k, v in fig.items()))
    for k, v in ratios.items():
        print(f"  {k:32s} {v:.3f}")
    for k, v in targets.items():
        print(f"  target {k}: {'met' if v else 'NOT met'}")
    print(f"  loadavg before {load_before} after {payload['loadavg_after']}")
    return payload


if __name__ == "__main__":
    main()
