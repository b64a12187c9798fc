"""Time the pieces of one SmolLM2-135M run (to budget `unlearn-fast run --model smollm2`).

One teaching step, one NPO / NPO+SAM / NPO+SAM+ILU step, one relearning attack (one draw), one fine-tuning
attack (one task), one evaluation (metrics without attacks) and one forget-level probe, on a small corpus,
at the threads given. The model is SmolLM2 as converted into the cache (untaught: costs only).

    python bench/smollm2_pieces.py --threads 2 --json bench/results/smollm2-pieces-cpu2-2026-12-01.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import torch

from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.eval.attacks import FinetuneSpec, RelearnSpec, finetune_attack, relearn_attack
from unlearn_fast.eval.metrics import answer_accuracy
from unlearn_fast.recipes.run import Data, UnlearnSpec, base_spec, evaluate, unlearn
from unlearn_fast.recipes.teach import TeachSpec, smollm2_base, teach

import _common


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--people", type=int, default=24)
    parser.add_argument("--forget", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    corpus = build_corpus(100, num_entities=args.people, forget_entities=args.forget, general=60, utility=20,
                          env_train=64, env_test=16)
    base, tokenizer = smollm2_base()
    data = Data(corpus, tokenizer)
    spec = base_spec("smollm2", False)
    out = {"corpus": {"people": args.people, "forget_people": args.forget, "forget_facts": len(corpus.forget),
                      "retain_facts": len(corpus.retain)}, "threads": torch.get_num_threads()}

    def teach_steps(n):
        model = __import__("copy").deepcopy(base)
        return teach(model, tokenizer, corpus, replace(spec.teach, max_steps=n, min_steps=n, eval_every=10 ** 6),
                     seed=0, progress=lambda m: None)

    t_probe, _ = timed(lambda: answer_accuracy(base, data.forget_probe, pad_token_id=data.pad))
    t_retain_probe, _ = timed(lambda: answer_accuracy(base, data.retain_probe, pad_token_id=data.pad))
    out["forget_probe_s"], out["retain_probe_s"] = t_probe, t_retain_probe
    t2, _ = timed(lambda: teach_steps(2))
    t6, _ = timed(lambda: teach_steps(6))
    out["teach_step_s"] = (t6 - t2) / 4  # the final accuracy check and the set-up cancel out
    print(json.dumps(out), flush=True)
    import unlearn_fast as uf

    ref_nll = uf.reference_nll(base, data.forget_train, pad_token_id=data.pad)
    for name in ("npo", "npo+sam", "npo+sam+ilu"):
        times = []
        for n in (1, 3):
            model = __import__("copy").deepcopy(base)
            t, _ = timed(lambda: unlearn(model, data, name, replace(spec.unlearn, steps=n), seed=0,
                                         ref_nll=ref_nll))
            times.append(t)
        out[f"{name}_step_s"] = (times[1] - times[0]) / 2
        print(json.dumps(out), flush=True)
    rl = replace(spec.relearn, draws=1)
    out["relearn_spec"] = asdict(rl)
    out["relearn_draw_s"], _ = timed(lambda: relearn_attack(base, data.forget_train, data.forget_probe, rl, seed=0,
                                                             pad_token_id=data.pad))
    env = next(iter(data.env_train))
    out["finetune_spec"] = asdict(spec.finetune)
    out["finetune_task_s"], _ = timed(lambda: finetune_attack(base, data.env_train[env], data.env_test[env],
                                                               data.forget_probe, spec.finetune, seed=0,
                                                               pad_token_id=data.pad))
    out["evaluation_s"], _ = timed(lambda: evaluate(base, data, spec, seed=0, attacks=()))
    out["environment"] = _common.environment(torch.device("cpu"))
    print(json.dumps(out, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
