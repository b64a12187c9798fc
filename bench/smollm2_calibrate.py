"""Calibrate the SmolLM2-135M protocol on a VALIDATION seed (never a reported one).

Teaches SmolLM2 the reduced corpus of PROFILES["smollm2"] (cached like `unlearn-fast run` does, so a run on
the same seed reuses it), then tries, in order and printing one JSON line per trial:
- the relearning and fine-tuning attacks on the ORIGINAL (taught) model at candidate lrs: an attack that
  takes the original's forget accuracy far down destroys the model instead of bringing anything back;
- NPO at candidate lrs with the matched-level stop: the step it reaches the level at, retain accuracy;
- the relearning attack on the NPO-unlearned model: what it brings back;
- the embedding-space attack (``--embed-eps``, radii relative to the mean embedding-row norm) on the original
  and on the NPO-unlearned model: a radius that takes the original's held-out answers down overfits the
  attacker's samples instead of bringing knowledge back.

    python bench/smollm2_calibrate.py --seed 100 --out bench/results/smollm2-calibration-seed100.jsonl \
        --unlearn-lrs 5e-5,1e-4 --relearn-lrs 1e-5,3e-5 --finetune-lrs 2e-5
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace

import torch

import unlearn_fast as uf
from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.eval.attacks import finetune_attack, relearn_over_draws
from unlearn_fast.eval.embed_attack import embed_attack
from unlearn_fast.eval.metrics import answer_accuracy, perplexity
from unlearn_fast.recipes.run import Data, base_spec, forget_level_stop, unlearn
from unlearn_fast.recipes.teach import smollm2_model


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--unlearn-lrs", default="5e-5")
    parser.add_argument("--relearn-lrs", default="3e-5")
    parser.add_argument("--finetune-lrs", default="2e-5")
    parser.add_argument("--embed-eps", default="", help="embedding-attack radii to try (default: none)")
    parser.add_argument("--ilu-weights", default="", help="ILU λ to try with npo+ilu at the first unlearning lr "
                                                          "(steps to the level, retain accuracy, perplexity)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.seed < 100:
        raise SystemExit("calibrate on validation seeds (>= 100) only: 0-99 are the reported ones")
    torch.set_num_threads(args.threads)
    spec = base_spec("smollm2", False)
    from unlearn_fast.recipes.run import apply_override

    for item in args.overrides:
        spec = apply_override(spec, item)
    out = open(args.out, "a")

    def record(**row):
        row.update(seed=args.seed, time=time.strftime("%H:%M:%S"))
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    t0 = time.perf_counter()
    corpus = build_corpus(args.seed, **spec.corpus)
    model, tokenizer, info = smollm2_model(corpus, teach_spec=spec.teach, seed=args.seed,
                                           progress=lambda m: print(m, flush=True))
    data = Data(corpus, tokenizer)
    kw = dict(pad_token_id=data.pad)
    f = answer_accuracy(model, data.forget_probe, **kw)
    r = answer_accuracy(model, data.retain_probe, **kw)["acc"]
    record(trial="teach", teach=asdict(spec.teach), corpus=spec.corpus, info=info, forget_acc=f["acc"],
           forget_prob=f["prob"], retain_acc=r, seconds=time.perf_counter() - t0)
    for lr in floats(args.relearn_lrs):
        t = time.perf_counter()
        rl = relearn_over_draws(model, data.forget_train, data.forget_probe, replace(spec.relearn, lr=lr),
                                seed=args.seed, **kw)
        record(trial="relearn original", lr=lr, spec=asdict(replace(spec.relearn, lr=lr)),
               forget_acc=rl["forget_acc"], gain=rl["gain"], curve=rl["curve"], seconds=time.perf_counter() - t)
    def embed_trials(target, name):
        for eps in floats(args.embed_eps):
            t = time.perf_counter()
            e = embed_attack(target, data.forget_train, data.forget_probe,
                             replace(spec.embed, eps=eps, samples=spec.relearn.samples), seed=args.seed, **kw)
            record(trial=f"embed {name}", eps=eps, forget_acc=e["forget_acc"], gain=e["gain"],
                   seconds=time.perf_counter() - t)

    embed_trials(model, "original")
    for lr in floats(args.finetune_lrs):
        t = time.perf_counter()
        ft = {env: finetune_attack(model, data.env_train[env], data.env_test[env], data.forget_probe,
                                   replace(spec.finetune, lr=lr), seed=args.seed, **kw)
              for env in spec.finetune.task_names(data.env_train)}
        record(trial="finetune original", lr=lr, spec=asdict(replace(spec.finetune, lr=lr)),
               forget_acc={e: v["forget_acc"] for e, v in ft.items()},
               task_acc={e: [v["task_acc_before"], v["task_acc"]] for e, v in ft.items()},
               seconds=time.perf_counter() - t)
    ref_nll = uf.reference_nll(model, data.forget_train, pad_token_id=data.pad)
    for lr in floats(args.unlearn_lrs):
        t = time.perf_counter()
        npo = copy.deepcopy(model)
        stop = forget_level_stop(data, spec.unlearn)
        terms = unlearn(npo, data, "npo", replace(spec.unlearn, lr=lr), seed=args.seed, ref_nll=ref_nll, stop=stop)
        f = answer_accuracy(npo, data.forget_probe, **kw)
        r = answer_accuracy(npo, data.retain_probe, **kw)["acc"]
        record(trial="npo", lr=lr, steps=terms["steps"], stopped_at=stop.stopped_at, history=stop.history,
               forget_acc=f["acc"], forget_prob=f["prob"], retain_acc=r, seconds=time.perf_counter() - t)
        for rlr in floats(args.relearn_lrs):
            t = time.perf_counter()
            rl = relearn_over_draws(npo, data.forget_train, data.forget_probe, replace(spec.relearn, lr=rlr),
                                    seed=args.seed, **kw)
            record(trial="relearn npo", npo_lr=lr, lr=rlr, forget_acc=rl["forget_acc"], gain=rl["gain"],
                   curve=rl["curve"], seconds=time.perf_counter() - t)
        embed_trials(npo, f"npo lr {lr}")
    for weight in floats(args.ilu_weights):
        t = time.perf_counter()
        ilu = copy.deepcopy(model)
        stop = forget_level_stop(data, spec.unlearn)
        lr = floats(args.unlearn_lrs)[0]
        terms = unlearn(ilu, data, "npo+ilu", replace(spec.unlearn, lr=lr, irm_weight=weight), seed=args.seed,
                        ref_nll=ref_nll, stop=stop)
        f = answer_accuracy(ilu, data.forget_probe, **kw)
        record(trial="npo+ilu", lr=lr, irm_weight=weight, steps=terms["steps"], stopped_at=stop.stopped_at,
               forget_acc=f["acc"], forget_prob=f["prob"],
               retain_acc=answer_accuracy(ilu, data.retain_probe, **kw)["acc"],
               utility_ppl=perplexity(ilu, data.utility, **kw), seconds=time.perf_counter() - t)


if __name__ == "__main__":
    main()
