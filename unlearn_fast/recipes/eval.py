"""``unlearn-fast eval``: metrics and attacks on a checkpoint (the run's evaluation, plus MUSE KnowMem /
VerbMem files and an lm-evaluation-harness bridge)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from ..data.corpus import build_corpus
from ..eval.metrics import knowmem, verbmem
from ..eval.report import write_report
from .run import Data, _attacks, _output, _setup, build_eval_parser, evaluate, log, versions
from .teach import load_directory


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lm_eval_bridge(model, tokenizer, tasks: list[str]) -> dict:
    """Run lm-evaluation-harness tasks on the in-memory model (the task data must be available locally)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError("--lm-eval-tasks needs lm-evaluation-harness: pip install lm-eval "
                          "(and the task data in the local Hugging Face datasets cache)") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks)
    return results.get("results", {})


def eval_main(argv: list[str] | None = None) -> int:
    args = build_eval_parser().parse_args(argv)
    spec = _setup(args)
    out = _output(args.output)
    start = time.perf_counter()
    model, tokenizer = load_directory(args.checkpoint)
    corpus = build_corpus(args.seed, **spec.corpus)
    data = Data(corpus, tokenizer)
    log(f"evaluating {args.checkpoint} on the synthetic corpus (seed {args.seed}) ...")
    row = evaluate(model, data, spec, seed=args.seed, attacks=_attacks(args.attacks))
    extra = {}
    if args.knowmem:
        extra["knowmem"] = knowmem(model, tokenizer, _read_jsonl(args.knowmem), pad_token_id=data.pad)
        log(f"KnowMem {extra['knowmem']:.3f}")
    if args.verbmem:
        extra["verbmem_rouge_l"] = verbmem(model, tokenizer, _read_jsonl(args.verbmem))
        log(f"VerbMem ROUGE-L {extra['verbmem_rouge_l']:.3f}")
    if args.lm_eval_tasks:
        try:
            extra["lm_eval"] = lm_eval_bridge(model, tokenizer, [t for t in args.lm_eval_tasks.split(",") if t])
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    row.update(extra, seconds=time.perf_counter() - start)
    report = {"title": f"unlearn_fast eval of {args.checkpoint}", "methods": {"checkpoint": row},
              "config": {"argv": list(argv or []), "checkpoint": str(args.checkpoint), "seed": args.seed,
                         "quick": args.quick, **asdict(spec)},
              "versions": versions(), "timings": {"total": time.perf_counter() - start}}
    write_report(report, out)
    log(f"done: {out / 'report.md'}")
    return 0
