"""The main job (``unlearn-fast run``): build or load the default model, unlearn the forget set with
each method through the Trainer (in memory), attack every result four ways (relearning, downstream
fine-tuning, quantization, an embedding-space attack) and write report.json, report.md and robustness.png.

The command-line pieces shared with ``unlearn-fast eval`` (recipes/eval.py) live here too.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

import unlearn_fast as uf

from ..data.corpus import build_corpus
from ..eval.attacks import FinetuneSpec, RelearnSpec, finetune_attack, quantized_copy, relearn_attack, relearn_split
from ..eval.embed_attack import EmbedAttackSpec, embed_attack
from ..eval.benchmark_suite import corpus_benchmark_metrics
from ..eval.metrics import answer_accuracy, encode_qa, encode_text, perplexity
from ..eval.report import write_report
from ..objectives.rmu import rmu_trainable
from ..train.config import TrainConfig
from ..train.trainer import Trainer
from .methods import objective_settings, parse_method
from .teach import (DEFAULT_MODEL, QUICK_MODEL, TeachSpec, default_model, load_directory, retain_only_model,
                    smollm2_model)

ALL_METHODS = ("original", "ga", "npo", "npo+sam", "npo+ilu", "npo+sam+ilu", "npo+adv", "rmu", "rmu+ilu")


@dataclass
class UnlearnSpec:
    """The unlearning runs: every method the same steps and batches; NPO variants the same lr and β."""
    steps: int = 40
    batch_size: int = 16
    env_batch_size: int = 8
    lr: float = 5e-4
    ga_lr: float = 2e-4
    npo_beta: float = 0.1
    retain_weight: float = 1.0
    sam_rho: float = 0.01
    irm_weight: float = 0.3
    rmu_lr: float = 1e-2
    # the steering norm must exceed the natural activation norm at the RMU layer (~60 here; Zephyr's 6.5 is
    # for its own scale)
    rmu_steering: float = 300.0
    rmu_alpha: float = 3.0
    # +adv (C-AdvUL): ε relative to the mean embedding-row norm as in the public code. A signed step moves a
    # token by step·√H; on the default model (H 128, radius 0.030) the public 10 × 1e-4 reach 0.37 of the
    # radius and lower an NPO-unlearned model's forget CE 6.48 → 5.83, 10 × 1e-3 reach the boundary and lower
    # it to 4.50 (3e-4: 4.57, 3e-3: 4.48, 1e-2: 4.61; bench/adv_step_size.py)
    adv_eps: float = 0.05
    adv_steps: int = 10
    adv_step_size: float = 1e-3


@dataclass
class RunSpec:
    corpus: dict = field(default_factory=lambda: dict(num_entities=60, forget_entities=15, general=200, utility=60,
                                                      env_train=300, env_test=60))
    teach: TeachSpec = field(default_factory=TeachSpec)
    unlearn: UnlearnSpec = field(default_factory=UnlearnSpec)
    relearn: RelearnSpec = field(default_factory=RelearnSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    quant_group: int = 32
    embed: EmbedAttackSpec = field(default_factory=EmbedAttackSpec)


def quick_spec() -> RunSpec:
    """A shortened run for tests and smoke checks: tiny model, few steps (numbers are not meaningful)."""
    return RunSpec(corpus=dict(num_entities=12, forget_entities=4, general=30, utility=8, env_train=24, env_test=8),
                   teach=TeachSpec(lr=1e-2, batch_size=16, text_per_batch=4, max_steps=40, min_steps=40,
                                   eval_every=20),
                   unlearn=UnlearnSpec(steps=3, batch_size=4, env_batch_size=4),
                   relearn=RelearnSpec(samples=4, steps=2, eval_every=1, batch_size=2),
                   finetune=FinetuneSpec(steps=4, eval_every=2, batch_size=4), embed=EmbedAttackSpec(steps=10))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data
class Data:
    """The corpus encoded for one tokenizer: training examples (with eos) and probes (answer tokens only)."""

    def __init__(self, corpus, tokenizer):
        self.corpus, self.tokenizer = corpus, tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.forget_train = encode_qa(corpus.forget, tokenizer)
        self.forget_probe = encode_qa(corpus.forget, tokenizer, eos=False)
        self.retain_train = encode_qa(corpus.retain, tokenizer)
        self.retain_probe = encode_qa(corpus.retain, tokenizer, eos=False)
        self.utility = encode_text(corpus.utility, tokenizer)
        self.env_train = {n: encode_qa(e["train"], tokenizer) for n, e in corpus.envs.items()}
        self.env_test = {n: encode_qa(e["test"], tokenizer, eos=False) for n, e in corpus.envs.items()}


def method_config(name: str, spec: UnlearnSpec, num_layers: int, seed: int) -> tuple[uf.UnlearnConfig, float]:
    """The UnlearnConfig and learning rate of a method name such as 'npo+sam+ilu'."""
    method = parse_method(name)
    kw = dict(objective_settings(method, sam_rho=spec.sam_rho, irm_weight=spec.irm_weight, adv_eps=spec.adv_eps,
                                 adv_steps=spec.adv_steps, adv_step_size=spec.adv_step_size), seed=seed)
    lr = spec.lr
    if method.base == "ga":
        lr = spec.ga_lr
    elif method.base == "rmu":
        lr = spec.rmu_lr
        kw.update(rmu_layer=num_layers // 2, rmu_steering=spec.rmu_steering, rmu_alpha=spec.rmu_alpha)
    else:
        kw.update(retain_weight=spec.retain_weight)
        if method.base == "npo":
            kw.update(beta=spec.npo_beta)
    return uf.UnlearnConfig(**kw), lr


def unlearn(model, data: Data, name: str, spec: UnlearnSpec, *, seed: int, ref_nll=None) -> dict:
    """Unlearn ``data``'s forget set from ``model`` in place with method ``name`` through the Trainer (in
    memory: constant lr, clip 1, FusedAdamW); returns the last step's terms."""
    objective, lr = method_config(name, spec, model.config.num_hidden_layers, seed)
    if objective.method == "rmu":
        rmu_trainable(model, objective.rmu_layer, span=min(3, objective.rmu_layer + 1))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    config = TrainConfig(lr=lr, max_steps=spec.steps, batch_size=min(spec.batch_size, len(data.forget_train)),
                         env_batch_size=spec.env_batch_size, warmup_ratio=0.0, schedule="constant",
                         weight_decay=0.0, clip=1.0, seed=seed, save_every=spec.steps, unlearn=objective)
    trainer = Trainer(model, data.tokenizer, config, forget=data.forget_train,
                      retain=data.retain_train if objective.uses_retain else None,
                      envs=list(data.env_train.values()) if objective.irm else (), output_dir=None, progress=False,
                      ref_nll=ref_nll)
    terms = trainer.train()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return terms


# ---------------------------------------------------------------- evaluation
ATTACKS = ("relearn", "finetune", "quant", "embed")


def evaluate(model, data: Data, spec: RunSpec, *, seed: int, attacks=ATTACKS, reference_truth_ratios=None) -> dict:
    """Metrics of a model and the named attacks (each on a copy; a skipped attack's figures are None).
    ``reference_truth_ratios``: a retain-only model's forget truth ratios (forget quality; None without)."""
    kw = dict(pad_token_id=data.pad)
    forget = answer_accuracy(model, data.forget_probe, **kw)
    row = {"forget_acc": forget["acc"], "forget_prob": forget["prob"],
           "retain_acc": answer_accuracy(model, data.retain_probe, **kw)["acc"],
           "utility_ppl": perplexity(model, data.utility, **kw)}
    row.update(corpus_benchmark_metrics(model, data.tokenizer, data.corpus,
                                        reference_truth_ratios=reference_truth_ratios))
    row.update(relearn_forget_acc=None, finetune_forget_acc=None, quant8_forget_acc=None, quant4_forget_acc=None,
               embed_forget_acc=None)
    if "relearn" in attacks:
        row["relearn"] = relearn_attack(model, data.forget_train, data.forget_probe, spec.relearn, seed=seed, **kw)
        row["relearn_forget_acc"] = row["relearn"]["forget_acc"]
        # recovery: the attack's gain on the same questions (the relearning ones exclude the shown samples)
        row["relearn_gain"] = row["relearn_forget_acc"] - row["relearn"]["curve"][0][1]
    if "finetune" in attacks:
        row["finetune"] = {env: finetune_attack(model, data.env_train[env], data.env_test[env], data.forget_probe,
                                                spec.finetune, seed=seed, **kw) for env in data.env_train}
        row["finetune_forget_acc"] = sum(r["forget_acc"] for r in row["finetune"].values()) / len(row["finetune"])
        row["finetune_gain"] = row["finetune_forget_acc"] - row["forget_acc"]
        row["finetune_task_acc"] = sum(r["task_acc"] for r in row["finetune"].values()) / len(row["finetune"])
    if "quant" in attacks:
        for bits in (8, 4):
            row[f"quant{bits}_forget_acc"] = answer_accuracy(quantized_copy(model, bits, spec.quant_group),
                                                             data.forget_probe, **kw)["acc"]
    if "embed" in attacks:  # a universal δ fitted on the relearning attacker's samples, scored on the others
        t0 = time.perf_counter()
        row["embed"] = embed_attack(model, data.forget_train, data.forget_probe,
                                    replace(spec.embed, samples=spec.relearn.samples), seed=seed, **kw)
        row["embed"]["seconds"] = time.perf_counter() - t0
        row["embed_forget_acc"], row["embed_gain"] = row["embed"]["forget_acc"], row["embed"]["gain"]
    return row


def retain_reference(choice: str, corpus, tokenizer, spec: RunSpec, *, quick: bool, seed: int, cache_dir=None):
    """The forget truth ratios of a retain-only model (taught once, cached), the reference of forget quality;
    None for a model of another kind (``--model smollm2`` or a directory: no retain-only twin)."""
    if choice != "default":
        return None
    model, _ = retain_only_model(corpus, tokenizer, spec=QUICK_MODEL if quick else DEFAULT_MODEL,
                                 teach_spec=spec.teach, seed=seed, cache_dir=cache_dir, progress=log)
    return corpus_benchmark_metrics(model, tokenizer, corpus)["forget_truth_ratios"]


def _attacks(text: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split(",") if a.strip()) if text not in ("", "none") else ()
    bad = [a for a in names if a not in ATTACKS]
    if bad:
        raise ValueError(f"--attacks: unknown attack(s) {bad}; choose from {', '.join(ATTACKS)} or 'none'")
    return names


def versions() -> dict:
    import transformers

    return {"unlearn_fast": uf.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads()}


def load_model(choice: str, corpus, spec: RunSpec, *, quick: bool, seed: int, cache_dir=None):
    if choice == "default":
        return default_model(corpus, spec=QUICK_MODEL if quick else DEFAULT_MODEL, teach_spec=spec.teach, seed=seed,
                             cache_dir=cache_dir, progress=log)
    if choice == "smollm2":
        return smollm2_model(corpus, seed=seed, cache_dir=cache_dir, progress=log)
    model, tokenizer = load_directory(choice)
    return model, tokenizer, {"path": str(choice)}


# ---------------------------------------------------------------- command lines
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default=None, help="output directory (default runs/<timestamp>/)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the model and the attacks")
    parser.add_argument("--quick", action="store_true", help="shortened run (tests, smoke checks)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the models are small, more threads mostly add overhead)")
    parser.add_argument("--cache-dir", default=None, help="model cache (default $UNLEARN_FAST_CACHE or "
                                                          "~/.cache/unlearn_fast)")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"comma-separated attacks to run (default: {','.join(ATTACKS)}; 'none' for metrics only)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a setting, e.g. --set unlearn.irm_weight=0.3 --set relearn.lr=3e-3 "
                             "(sections: teach, unlearn, relearn, finetune, embed)")


def build_run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-fast run", description="The main job: unlearn with each method, "
                                     "attack each result, write report.json, report.md and robustness.png.")
    _common(parser)
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help=f"comma-separated methods (default: {','.join(ALL_METHODS)})")
    parser.add_argument("--model", default="default", help="default | smollm2 | PATH of a Hugging Face model dir")
    return parser


def build_eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn-fast eval", description="Metrics and attacks on a checkpoint.")
    _common(parser)
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model directory (e.g. a run's final/)")
    parser.add_argument("--knowmem", default=None, help="JSON-lines file of {question, answer}: MUSE KnowMem")
    parser.add_argument("--verbmem", default=None, help="JSON-lines file of {prompt, continuation}: MUSE VerbMem")
    parser.add_argument("--lm-eval-tasks", default=None,
                        help="comma-separated lm-evaluation-harness tasks (e.g. wmdp_bio,mmlu); needs lm_eval "
                             "and the task data available locally")
    parser.add_argument("--lm-eval-include", default=None, metavar="DIR",
                        help="a directory of lm-evaluation-harness task YAML files (local tasks for --lm-eval-tasks)")
    parser.add_argument("--benchmark", default=None, metavar="tofu|muse|wmdp",
                        help="run the whole suite of this benchmark on --data; metrics in OUTPUT/eval.json")
    parser.add_argument("--data", default=None, metavar="DIR", help="the benchmark's files (see data/benchmarks.py)")
    parser.add_argument("--reference", default=None, metavar="EVAL.JSON",
                        help="eval.json of a retain-only (retrained) model: forget quality and PrivLeak")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size (--benchmark)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation length (--benchmark; default open-unlearning's: TOFU 200, KnowMem 32, "
                             "VerbMem 128)")
    return parser


def _output(path) -> Path:
    return Path(path) if path else Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _setup(args) -> RunSpec:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = quick_spec() if args.quick else RunSpec()
    for item in args.overrides:
        spec = apply_override(spec, item)
    return spec


def apply_override(spec: RunSpec, item: str) -> RunSpec:
    """``section.field=value`` -> a RunSpec with that field replaced (the value parsed as the field's type)."""
    key, sep, value = item.partition("=")
    section, _, name = key.strip().partition(".")
    sub = getattr(spec, section, None) if sep else None
    if sub is None or not hasattr(sub, "__dataclass_fields__") or name not in sub.__dataclass_fields__:
        raise ValueError(f"--set expects SECTION.FIELD=VALUE with SECTION in teach, unlearn, relearn, finetune, embed and "
                         f"FIELD one of its settings, got {item!r}")
    kind = type(getattr(sub, name))
    try:
        parsed = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
    except ValueError:
        raise ValueError(f"--set {key}: {value!r} is not a valid {kind.__name__}") from None
    return replace(spec, **{section: replace(sub, **{name: parsed})})


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def run_main(argv: list[str] | None = None) -> int:
    args = build_run_parser().parse_args(argv)
    spec = _setup(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m != "original":
            method_config(m, spec.unlearn, 4, args.seed)  # fail early on an unknown name
    attacks = _attacks(args.attacks)
    out = _output(args.output)
    start = time.perf_counter()
    timings = {}
    corpus = build_corpus(args.seed, **spec.corpus)
    log(f"corpus: {len(corpus.forget)} forget / {len(corpus.retain)} retain facts, environments "
        f"{', '.join(corpus.envs)}")
    base, tokenizer, model_info = load_model(args.model, corpus, spec, quick=args.quick, seed=args.seed,
                                             cache_dir=args.cache_dir)
    timings["model"] = time.perf_counter() - start
    data = Data(corpus, tokenizer)
    t0 = time.perf_counter()
    reference = retain_reference(args.model, corpus, tokenizer, spec, quick=args.quick, seed=args.seed,
                                 cache_dir=args.cache_dir)
    timings["retain_only_model"] = time.perf_counter() - t0
    ref_nll = uf.reference_nll(base, data.forget_train, pad_token_id=data.pad)  # once: NPO's θ_ref term
    results = {}
    for i, name in enumerate(methods, 1):
        t0 = time.perf_counter()
        log(f"[{i}/{len(methods)}] {name}: unlearning ...")
        model = copy.deepcopy(base)
        terms = unlearn(model, data, name, spec.unlearn, seed=args.seed, ref_nll=ref_nll) if name != "original" else {}
        seconds = time.perf_counter() - t0
        log(f"[{i}/{len(methods)}] {name}: evaluating and attacking ...")
        row = evaluate(model, data, spec, seed=args.seed, attacks=attacks, reference_truth_ratios=reference)
        row.update(seconds=seconds, attack_seconds=time.perf_counter() - t0 - seconds,
                   last_step={k: v for k, v in terms.items() if isinstance(v, float)})
        results[name] = row
        log(f"[{i}/{len(methods)}] {name}: forget {row['forget_acc']:.3f} retain {row['retain_acc']:.3f} "
            f"ppl {row['utility_ppl']:.2f} | relearn {_f(row['relearn_forget_acc'])} finetune "
            f"{_f(row['finetune_forget_acc'])} q8 {_f(row['quant8_forget_acc'])} q4 {_f(row['quant4_forget_acc'])} "
            f"embed {_f(row['embed_forget_acc'])} "
            f"({seconds:.1f} s + {row['attack_seconds']:.1f} s attacks)")
        timings[name] = time.perf_counter() - t0
        del model
    timings["total"] = time.perf_counter() - start
    shown, scored = relearn_split(len(data.forget_train), spec.relearn.samples, args.seed)
    report = {"title": "unlearn_fast main job", "methods": results,
              "config": {"argv": list(argv or []), "seed": args.seed, "quick": args.quick, "model": args.model,
                         "model_info": model_info, **{k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                                       for k, v in asdict(spec).items()},
                         "relearn_scored": len(scored)},
              "versions": versions(), "timings": timings}
    write_report(report, out)
    log(f"done in {timings['total']:.0f} s: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(sys.argv[1:]))
