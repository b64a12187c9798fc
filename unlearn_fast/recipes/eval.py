"""``unlearn-fast eval``: metrics and attacks on a checkpoint: the run's evaluation on the synthetic corpus
(plus MUSE KnowMem / VerbMem files), or with ``--benchmark tofu|muse|wmdp --data DIR`` the whole suite of
that benchmark into eval.json; lm-evaluation-harness tasks with ``--lm-eval-tasks``."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..data.benchmarks import load_benchmark
from ..data.corpus import build_corpus
from ..eval.benchmark_suite import EVALUATORS, run_benchmark
from ..eval.lm_eval_bridge import lm_eval_bridge
from ..eval.metrics import knowmem, verbmem
from ..eval.report import write_report
from .run import Data, _attacks, _output, _setup, build_eval_parser, evaluate, log, versions
from .teach import load_directory

USAGE_EXIT = 2


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fail(message: str) -> int:
    print(f"unlearn-fast eval: error: {message}", file=sys.stderr)
    return USAGE_EXIT


def check_benchmark_args(args) -> str | None:
    """The problem with the --benchmark / --data / --reference / --lm-eval-include arguments, or None;
    the benchmark's files are read here (cheap), before the model is loaded."""
    if args.lm_eval_include and not Path(args.lm_eval_include).is_dir():
        return f"--lm-eval-include {args.lm_eval_include}: not a directory of task YAML files"
    if args.lm_eval_include and not args.lm_eval_tasks:
        return "--lm-eval-include needs --lm-eval-tasks (the names of the tasks to run)"
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        return "--batch-size and --max-new-tokens must be positive integers"
    if args.benchmark is None:
        given = [f for f, v in (("--data", args.data), ("--reference", args.reference)) if v]
        return f"{' and '.join(given)} needs --benchmark tofu|muse|wmdp" if given else None
    if args.benchmark not in EVALUATORS:
        return f"--benchmark {args.benchmark!r}: unknown benchmark; choose from {', '.join(EVALUATORS)}"
    if not args.data:
        return f"--benchmark {args.benchmark} needs --data DIR (the benchmark's files)"
    if not Path(args.data).is_dir():
        return f"--data {args.data}: no such directory"
    if args.reference and not Path(args.reference).is_file():
        return f"--reference {args.reference}: no such file (the retain-only model's eval.json)"
    try:
        load_benchmark(args.benchmark, args.data)
        if args.reference:
            json.loads(Path(args.reference).read_text())
    except (FileNotFoundError, ValueError, ImportError) as exc:  # a missing split, a bad record, no pyarrow
        return str(exc)
    return None


def eval_main(argv: list[str] | None = None) -> int:
    """With --benchmark: the whole suite of that benchmark on --data, metrics in eval.json (the synthetic-corpus
    evaluation is skipped: a TOFU/MUSE/WMDP checkpoint does not know that corpus). Without: the run's evaluation
    on the synthetic corpus (report.json / report.md), plus KnowMem / VerbMem files and lm-eval tasks."""
    args = build_eval_parser().parse_args(argv)
    problem = check_benchmark_args(args)
    if problem:
        return _fail(problem)
    if not (Path(args.checkpoint) / "config.json").is_file():
        return _fail(f"--checkpoint {args.checkpoint}: not a model directory (no config.json)")
    try:  # an unknown --set field or attack, a bad --threads: one line, before the model is read
        spec = _setup(args, args.checkpoint)  # threads: every core for a large checkpoint
        attacks = _attacks(args.attacks)
    except ValueError as exc:
        return _fail(exc)
    args.seed = 0 if args.seed is None else args.seed
    out = _output(args.output)
    start = time.perf_counter()
    model, tokenizer = load_directory(args.checkpoint)
    extra = {}
    if args.lm_eval_tasks:
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):  # the harness tokenises with an HF tokenizer
            return _fail(f"--lm-eval-tasks needs a Hugging Face tokenizer in {args.checkpoint} "
                         f"(it has {type(tokenizer).__name__})")
        try:
            extra["lm_eval"] = lm_eval_bridge(model, tokenizer, [t for t in args.lm_eval_tasks.split(",") if t],
                                              include_path=args.lm_eval_include)
        except (ImportError, KeyError) as exc:  # no lm_eval; a task name the harness does not know
            return _fail(str(exc).strip('"'))
    if args.benchmark:
        log(f"evaluating {args.checkpoint} on {args.benchmark} ({args.data}) ...")
        result = run_benchmark(model, tokenizer, args.benchmark, args.data, reference=args.reference,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
        log(f"{args.benchmark}: {shown}")
        path = write_eval_json({"checkpoint": str(args.checkpoint), "benchmark": result, **extra,
                                "argv": list(argv or []), "versions": versions(),
                                "seconds": time.perf_counter() - start}, out)
        log(f"done: {path}")
        return 0
    corpus = build_corpus(args.seed, **spec.corpus)
    data = Data(corpus, tokenizer)
    log(f"evaluating {args.checkpoint} on the synthetic corpus (seed {args.seed}) ...")
    eval_start = time.perf_counter()
    row = evaluate(model, data, spec, seed=args.seed, attacks=attacks)
    if args.knowmem:
        extra["knowmem"] = knowmem(model, tokenizer, _read_jsonl(args.knowmem), pad_token_id=data.pad)
        log(f"KnowMem {extra['knowmem']:.3f}")
    if args.verbmem:
        extra["verbmem_rouge_l"] = verbmem(model, tokenizer, _read_jsonl(args.verbmem))
        log(f"VerbMem ROUGE-L {extra['verbmem_rouge_l']:.3f}")
    # "seconds" is the unlearning time in a run's report: a checkpoint's is unknown here, not its evaluation time
    row.update(extra, seconds=None, eval_seconds=time.perf_counter() - eval_start)
    report = {"title": f"unlearn_fast eval of {args.checkpoint}", "methods": {"checkpoint": row},
              "config": {"argv": list(argv or []), "checkpoint": str(args.checkpoint), "seed": args.seed,
                         "quick": args.quick, **asdict(spec)},
              "versions": versions(), "timings": {"total": time.perf_counter() - start}}
    write_report(report, out)
    log(f"done: {out / 'report.md'}")
    return 0


def write_eval_json(result: dict, output) -> Path:
    """``output``/eval.json: the benchmark's metrics under "benchmark" (``run_benchmark``'s ``reference``
    reads this file as it is)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return out / "eval.json"
