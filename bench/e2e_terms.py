"""Where an NPO, ILU or SAM step's time goes, term by term, in one process (interleaved rounds, medians).

An NPO step is the forget term F (NPO on the forget batch, cached reference NLL), the retain term R
(CE on the retain batch) and the optimizer O (clip + fused AdamW). ILU adds the environment term E
(λ·IRM penalty on one environment batch the size of the retain batch); SAM takes the forget gradient as
a direction (F_dir: the same pass by ``autograd.grad``), moves the weights (S: global norm, θ' into the
direction's storage, storage trade; and the restore, trading back) and takes the forget term again at θ' (F').
So the step ratios bench/e2e.py measures have floors that these terms give:
    ILU/NPO = (F + R + E + O) / (F + R + O),   SAM/NPO = (F_dir + S + F' + R + O) / (F + R + O)
and the extra terms can be set against the work they repeat: E / R, F' / F. The whole steps
(``uf.unlearning_gradients`` + O) run in the same rounds, so the sum of the terms can be checked against them.
A term's time includes the page faults its allocations take in the heap the sequence before it left (glibc
hands freed memory back to the kernel and faults it in again): each job's median count is recorded, and
where a term's faults differ from those in the whole step, the step is the figure to trust.

    python bench/e2e_terms.py --quick             # CPU quick shape (bench/e2e.py's), 1 thread
    python bench/e2e_terms.py --model-size tiny   # a smoke run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from _common import RESULTS_DIR, environment, loadavg, sync, write_results  # noqa: E402
from e2e import HPARAMS, SHAPES, build_model, make_batches, ours_config, ours_stepper  # noqa: E402

METHODS = ("npo", "npo_ilu", "npo_sam")
TERMS = ("forget", "retain", "environment", "forget_direction", "sam_move", "forget_perturbed", "sam_restore",
         "optimizer")


def minor_faults() -> int:
    """This process's minor page faults so far (0 where getrusage is missing)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):
        return 0


def term_runners(model, forget, retain, env):
    """Each term as a function of nothing, run the way ``unlearning_gradients`` runs it (into ``.grad``)."""
    import unlearn_fast as uf
    from unlearn_fast.objectives.lm import lm_parts, trainable_parameters
    from unlearn_fast.objectives.losses import forget_loss, irm_logit_penalty, retain_loss
    from unlearn_fast.optim.sam import grads_of

    npo, ilu, sam = (ours_config(m) for m in METHODS)
    parts, params = lm_parts(model), trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=HPARAMS["lr"], fused=True)
    held = {}

    def forget_term():
        (npo.forget_weight * forget_loss(parts, forget, npo)[0]).backward()

    def direction():
        held["grads"] = grads_of(forget_loss(parts, forget, sam)[0], params)

    def sam_move():  # the direction's storage becomes the backup, as the trainer does (regularizers.sam_forget)
        grads = held.pop("grads")
        held["state"] = uf.ops.sam_perturb_(params, grads, sam.sam_rho, backup=grads, exchange=True)

    def sam_restore():
        uf.ops.sam_restore_(held.pop("state"))

    def optimizer():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    runners = {  # in this order, the SAM terms are a SAM step's forget part: direction, move, F' at θ', restore
        "forget": forget_term,
        "retain": lambda: (npo.retain_weight * retain_loss(parts, retain, npo)[0]).backward(),
        "environment": lambda: (ilu.irm_weight * irm_logit_penalty(parts, [env], ilu)[0]).backward(),
        "forget_direction": direction,
        "sam_move": sam_move,
        "forget_perturbed": forget_term,
        "sam_restore": sam_restore,
        "optimizer": optimizer,
    }
    return runners, opt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU quick shape (the default on the CPU)")
    parser.add_argument("--model-size", choices=sorted(SHAPES), default=None)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of every term and step (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--device", default=None, help="cpu | cuda (default cuda when available)")
    parser.add_argument("--json", default=None, help="results path (default bench/results/e2e-terms-<size>-<device>-<date>.json)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = args.model_size or ("quick" if args.quick or device.type == "cpu" else "1b")
    shape = SHAPES[size]
    HPARAMS["rmu_layer"] = shape["rmu_layer"]
    load_at_start = loadavg()
    model = build_model(shape, device, "sdpa")
    forget, retain, env = (make_batches(shape, 1, device, salt)[0] for salt in (1, 2, 3))
    steps = {m: ours_stepper(model, m, [forget]) for m in METHODS}  # also caches the forget batch's reference NLL
    runners, opt = term_runners(model, forget, retain, env)

    def timed(fn):
        sync(device)
        faults, start = minor_faults(), time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start, minor_faults() - faults

    def whole_step(method):
        opt.zero_grad(set_to_none=True)
        steps[method](forget, retain, [env] if "ilu" in method else [])
        runners["optimizer"]()

    jobs = {**{f"term_{t}": runners[t] for t in TERMS},
            **{f"step_{m}": lambda m=m: whole_step(m) for m in METHODS}}
    times, faults = {k: [] for k in jobs}, {k: [] for k in jobs}
    for r in range(args.rounds + 1):  # the first round warms up (allocator, kernels)
        for key, job in jobs.items():
            t, f = timed(job)
            if r:
                times[key].append(t)
                faults[key].append(f)
        if r:
            print(f"  round {r}/{args.rounds}: " + ", ".join(f"{k} {times[k][-1]:.3f}" for k in jobs), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    term = {t: med[f"term_{t}"] for t in TERMS}
    npo_terms = term["forget"] + term["retain"] + term["optimizer"]
    term["sam_move_restore"] = term["sam_move"] + term["sam_restore"]
    summary = {
        "environment_over_retain": term["environment"] / term["retain"],
        "forget_perturbed_over_forget": term["forget_perturbed"] / term["forget"],
        "sam_move_restore_over_npo_terms": term["sam_move_restore"] / npo_terms,
        "ilu_over_npo_from_terms": (npo_terms + term["environment"]) / npo_terms,
        "sam_over_npo_from_terms": (npo_terms - term["forget"] + term["forget_direction"] + term["sam_move_restore"]
                                    + term["forget_perturbed"]) / npo_terms,
        "ilu_over_npo_steps": med["step_npo_ilu"] / med["step_npo"],
        "sam_over_npo_steps": med["step_npo_sam"] / med["step_npo"],
        "npo_step_over_its_terms": med["step_npo"] / npo_terms,
    }
    for key, value in summary.items():
        print(f"  {key:34s} {value:.3f}")
    env_info = environment(device)
    day = _dt.date.today().isoformat()
    out = Path(args.json) if args.json else RESULTS_DIR / f"e2e-terms-{size}-{env_info['device']}-{day}.json"
    payload = {"environment": env_info, "command": f"python bench/e2e_terms.py --model-size {size} --rounds {args.rounds}"
               + ("" if device.type != "cpu" else f" --threads {args.threads}"),
               "shape_name": size, "shapes": shape, "hyperparameters": dict(HPARAMS), "rounds": args.rounds,
               "loadavg_at_start": load_at_start, "trainable_params": sum(p.numel() for p in opt.param_groups[0]["params"]),
               "variants": {k: {"median_s": med[k], "min_s": min(v), "max_s": max(v),
                                "median_minor_faults": statistics.median(faults[k])} for k, v in times.items()},
               "ratios": summary}
    out = write_results("e2e_terms", payload, str(out), regenerate=out.resolve().parent == RESULTS_DIR.resolve())
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
