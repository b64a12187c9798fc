"""report.json, report.md (the table) and robustness.png of a run.

Two shapes of report:
- one seed (``methods`` -> name -> the row ``evaluate`` returns): ``markdown_table`` / ``plot``;
- several seeds: ``aggregate(rows_by_seed)`` turns per-seed rows into ``methods`` -> name -> metric ->
  {"mean", "ci_low", "ci_high", "per_seed", "n"}, ``comparisons`` -> "npo+sam vs npo" -> metric ->
  {"mean_diff", "ci_low", "ci_high", "p", "p_permutation", "n"} (paired over seeds: the same seed is the
  same corpus split, taught model and attack randomness), ``curves`` (the attack curves' mean and band)
  and ``seeds``; ``write_report`` recognises it by its ``seeds`` and writes the interval table, one
  sentence per comparison and the curves with bands.
"""
from __future__ import annotations

import json
from pathlib import Path

from .stats import paired_difference, summarize

COLUMNS = [  # (key in report.json, header)
    ("forget_acc", "forget acc ↓"),
    ("retain_acc", "retain acc ↑"),
    ("utility_ppl", "held-out ppl ↓"),
    ("relearn_forget_acc", "after relearning ↓"),
    ("finetune_forget_acc", "after fine-tuning ↓"),
    ("quant8_forget_acc", "8-bit ↓"),
    ("quant4_forget_acc", "4-bit ↓"),
    ("embed_forget_acc", "embedding attack ↓"),
    ("seconds", "unlearning s"),
]
REQUIRED = [key for key, _ in COLUMNS]
COLUMNS[5:5] = [("relearn_gain", "relearning gain ↓"), ("finetune_gain", "fine-tuning gain ↓"),
                ("finetune_task_acc", "task acc after fine-tuning")]
COLUMNS.insert(-1, ("embed_gain", "embedding gain ↓"))
# TOFU / MUSE measures on the corpus (eval.benchmark_suite.corpus_benchmark_metrics), beside the forget accuracy
COLUMNS[1:1] = [("forget_truth_ratio", "truth ratio"), ("forget_quality", "forget quality ↑"),
                ("mia_min_k_plus_plus", "min-k%++ AUC")]


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def markdown_table(methods: dict) -> str:
    lines = ["| method | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for name, row in methods.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    cfg = report.get("config", {})
    parts = [f"# {report.get('title', 'unlearn_fast robustness report')}", "",
             markdown_table(report["methods"]), "",
             "forget acc: greedy exact-match accuracy on the forget questions (the original model knows them); "
             "after relearning: on the forget questions not shown to the attacker, after fine-tuning on "
             f"{cfg.get('relearn', {}).get('samples', 'k')} others; after fine-tuning: mean over the unrelated "
             "tasks of the forget accuracy at the first-quartile, median and final checkpoints (the robustness "
             "score: lower is more robust); gains: what each attack brings back on the same questions; "
             "8/4-bit: round-to-nearest group-wise weight quantization; "
             "truth ratio: TOFU's forget truth ratio (mean of min(R, 1/R), R = P(perturbed)/P(paraphrased)); forget "
             "quality: KS-test p-value of the forget truth ratios against a model taught without the forget set; "
             "min-k%++ AUC: membership inference on forget vs never-seen facts (0.5: indistinguishable); "
             "embedding attack: on the relearning attack's unseen questions, with a universal prompt-embedding "
             "perturbation fitted on its samples (weights unchanged).", ""]
    tasks = {n: r.get("finetune") for n, r in report["methods"].items() if r.get("finetune")}
    if tasks:
        envs = sorted(next(iter(tasks.values())))
        parts += ["Fine-tuning attack per task (forget acc at Q1/median/end; task acc before → after):", "",
                  "| method | " + " | ".join(envs) + " |", "|---|" + "---|" * len(envs)]
        for name, per_env in tasks.items():
            cells = []
            for env in envs:
                r = per_env[env]
                ck = "/".join(f"{v:.2f}" for _, v in sorted((int(k), v) for k, v in r["checkpoints"].items()))
                cells.append(f"{ck}; task {r['task_acc_before']:.2f}→{r['task_acc']:.2f}")
            parts.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("")
    timings = report.get("timings", {})
    if timings:
        parts.append("Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    path.write_text("\n".join(parts) + "\n")


def plot(report: dict, path: Path) -> bool:
    """Forget accuracy along the fine-tuning (mean over tasks) and relearning attacks, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_ft, ax_rl) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in report["methods"].items():
        per_env = row.get("finetune") or {}
        if per_env:
            curves = [dict((int(s), a) for s, a in r["curve"]) for r in per_env.values()]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax_ft.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in steps], marker="o", label=name)
        curve = (row.get("relearn") or {}).get("curve")
        if curve:
            ax_rl.plot([s for s, _ in curve], [a for _, a in curve], marker="o", label=name)
    ax_ft.set(title="downstream fine-tuning (mean over tasks)", xlabel="fine-tuning step", ylabel="forget accuracy")
    ax_rl.set(title="relearning on a few forget samples", xlabel="relearning step",
              ylabel="forget accuracy (unseen questions)")
    for ax in (ax_ft, ax_rl):
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in (ax_rl, ax_ft):  # one legend, on a panel that has lines
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(report: dict, output) -> Path:
    """report.json, report.md and robustness.png under ``output`` (a multi-seed report if it has ``seeds``)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if "seeds" in report:
        write_seeds_markdown(report, out / "report.md")
        plot_seeds(report, out / "robustness.png")
    else:
        write_markdown(report, out / "report.md")
        plot(report, out / "robustness.png")
    return out


# ---------------------------------------------------------------- several seeds
METRICS = ("forget_acc", "forget_prob", "retain_acc", "utility_ppl", "relearn_forget_acc", "finetune_forget_acc",
           "relearn_gain", "finetune_gain", "quant8_forget_acc", "quant4_forget_acc", "embed_forget_acc", "seconds")
# (robust variant, its base): the papers' claims (SPEC §2)
COMPARISONS = (("npo+sam", "npo"), ("npo+ilu", "npo"), ("npo+sam+ilu", "npo"), ("npo+adv", "npo"), ("rmu+ilu", "rmu"))
SEED_COLUMNS = [  # (metric, header) of the interval table
    ("forget_acc", "forget acc ↓"), ("forget_prob", "forget prob ↓"), ("retain_acc", "retain acc ↑"),
    ("utility_ppl", "held-out ppl ↓"), ("relearn_forget_acc", "after relearning ↓"),
    ("finetune_forget_acc", "after fine-tuning ↓"), ("relearn_forget_prob", "prob after relearning ↓"),
    ("finetune_forget_prob", "prob after fine-tuning ↓"), ("relearn_gain", "relearning gain ↓"),
    ("finetune_gain", "fine-tuning gain ↓"), ("quant8_forget_acc", "8-bit ↓"), ("quant4_forget_acc", "4-bit ↓"),
    ("embed_forget_acc", "embedding attack ↓"), ("embed_gain", "embedding gain ↓"),
    ("seconds", "unlearning s"), ("steps", "steps"),
    # TOFU / MUSE measures on the corpus (issue 18): shown when the rows have them
    ("forget_truth_ratio", "truth ratio"), ("forget_quality", "forget quality ↑"),
    ("mia_min_k_plus_plus", "min-k%++ AUC"),
]


def _scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _curve_mean(per_seed_curves: list, level: float) -> dict | None:
    """{"steps", "mean", "ci_low", "ci_high"} over seeds of [[step, value], ...] curves (steps all share)."""
    curves = [dict((int(s), float(v)) for s, v, *_ in c) for c in per_seed_curves if c]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    summaries = [summarize([c[s] for c in curves], level=level) for s in steps]
    return {"steps": steps, "mean": [x.mean for x in summaries], "ci_low": [x.ci_low for x in summaries],
            "ci_high": [x.ci_high for x in summaries], "n": len(curves)}


def _finetune_curve(row: dict) -> list | None:
    """The fine-tuning attack's forget-accuracy curve averaged over the tasks (None if it did not run)."""
    per_env = row.get("finetune") or {}
    if not per_env:
        return None
    curves = [dict((int(s), a) for s, a, *_ in r["curve"]) for r in per_env.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [[s, sum(c[s] for c in curves) / len(curves)] for s in steps]


def aggregate(rows_by_seed: dict, *, comparisons=COMPARISONS, level: float = 0.95) -> dict:
    """Per-seed rows -> the multi-seed report's ``seeds``, ``methods``, ``comparisons`` and ``curves``.

    ``rows_by_seed``: seed -> method name -> row (what ``evaluate`` returns, plus ``seconds``). Every numeric
    scalar of the rows is summarised (``METRICS`` always, as None-summaries where absent); a method missing
    for a seed counts as None there. A comparison is made for each (variant, base) pair present.
    """
    if not isinstance(rows_by_seed, dict) or not rows_by_seed:
        raise ValueError("rows_by_seed must be a non-empty dict: seed -> method name -> row")
    seeds = sorted(rows_by_seed)
    names: list[str] = []
    for seed in seeds:
        if not isinstance(rows_by_seed[seed], dict):
            raise TypeError(f"rows_by_seed[{seed!r}] must be a dict of method name -> row")
        names += [n for n in rows_by_seed[seed] if n not in names]
    per_seed = {n: [rows_by_seed[s].get(n) for s in seeds] for n in names}
    methods, curves = {}, {}
    for name, rows in per_seed.items():
        keys = list(METRICS) + sorted({k for r in rows if r for k, v in r.items()
                                       if _scalar(v) and k not in METRICS})
        methods[name] = {k: summarize([r.get(k) if r and _scalar(r.get(k)) else None for r in rows],
                                      level=level).to_dict() for k in keys}
        curves[name] = {"relearn": _curve_mean([(r or {}).get("relearn", {}).get("curve") for r in rows], level),
                        "finetune": _curve_mean([_finetune_curve(r or {}) for r in rows], level)}
    compared = {}
    for variant, base in comparisons:
        if variant in methods and base in methods:
            compared[f"{variant} vs {base}"] = {
                k: paired_difference(methods[variant][k]["per_seed"], methods[base][k]["per_seed"],
                                     level=level).to_dict()
                for k in methods[variant] if k in methods[base]}
    return {"seeds": seeds, "level": level, "methods": methods, "comparisons": compared, "curves": curves}


def _interval_cell(summary: dict | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    mean = summary["mean"]
    if summary.get("ci_low") is None:
        return _fmt(mean)
    spec = ".1f" if abs(mean) >= 10 else ".3f"  # the interval in the mean's format
    return f"{mean:{spec}} [{summary['ci_low']:{spec}}, {summary['ci_high']:{spec}}]"


def seeds_table(methods: dict) -> str:
    """The markdown table: mean [95% interval] of each metric for each method (a column no method has is left
    out)."""
    columns = [(k, h) for k, h in SEED_COLUMNS
               if any((m.get(k) or {}).get("mean") is not None for m in methods.values())]
    lines = ["| method | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, metrics in methods.items():
        lines.append(f"| {name} | " + " | ".join(_interval_cell(metrics.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def _diff(d: dict) -> str:
    if d.get("mean_diff") is None:
        return "–"
    text = f"{d['mean_diff']:+.3f}"
    if d.get("ci_low") is not None:
        text += f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p {d['p']:.3f}"
    return text


def comparison_sentence(title: str, metrics: dict) -> str:
    """One plain sentence: the paired differences after relearning, fine-tuning and (when measured) the
    embedding attack, retain and forget level, and what the intervals allow one to say."""
    variant, _, base = title.partition(" vs ")
    attacks = [(label, metrics.get(key, {})) for label, key in (
        ("relearning", "relearn_forget_acc"), ("fine-tuning", "finetune_forget_acc"),
        ("the embedding attack", "embed_forget_acc"), ("relearning (answer probability)", "relearn_forget_prob"))]
    always = ("relearning", "fine-tuning")  # the others only when measured
    attacks = [(label, d) for label, d in attacks if label in always or d.get("mean_diff") is not None]
    n = max(d.get("n", 0) for _, d in attacks)
    verdicts = []
    for label, d in attacks:
        if d.get("ci_high") is not None and d["ci_high"] < 0:
            verdicts.append(f"recovers less than {base} under {label}")
        elif d.get("ci_low") is not None and d["ci_low"] > 0:
            verdicts.append(f"recovers more than {base} under {label}")
    verdict = (f"{variant} " + " and ".join(verdicts)) if verdicts else \
        f"the intervals cannot tell {variant} from {base} under {'any' if len(attacks) > 2 else 'either'} attack"
    after = "; ".join(f"after {label.removeprefix('the ')} {_diff(d)}" for label, d in attacks)
    return (f"**{title}** ({n} seeds, {variant} − {base}, 95% interval, paired t-test p): {after}; "
            f"retain acc {_diff(metrics.get('retain_acc', {}))}; "
            f"forget acc before the attacks {_diff(metrics.get('forget_acc', {}))} — {verdict}.")


def write_seeds_markdown(report: dict, path: Path) -> None:
    seeds = report["seeds"]
    parts = [f"# {report.get('title', 'unlearn_fast robustness report')}", "",
             f"Seeds {', '.join(map(str, seeds))}: each cell is the mean over seeds [95% Student-t interval].", "",
             seeds_table(report["methods"]), "",
             "forget acc / prob: greedy exact-match accuracy and mean answer-token probability on the forget "
             "questions; after relearning: forget accuracy on the forget questions not shown to the attacker; "
             "after fine-tuning: mean over the unrelated tasks of the forget accuracy at the first-quartile, "
             "median and final checkpoints; gains: what each attack brings back; 8/4-bit: round-to-nearest "
             "group-wise weight quantization.", ""]
    if report.get("comparisons"):
        parts += ["Paired comparisons (per-seed differences, same seeds):", ""]
        parts += [f"- {comparison_sentence(t, m)}" for t, m in report["comparisons"].items()]
        parts.append("")
    timings = report.get("timings", {})
    if timings:
        parts.append("Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()
                                               if _scalar(v) and k != "jobs")
                     + (f" (seconds summed over {timings['jobs']} worker processes but the total)"
                        if timings.get("jobs", 1) > 1 else ""))
    path.write_text("\n".join(parts) + "\n")


def plot_seeds(report: dict, path: Path) -> bool:
    """The attack curves: mean forget accuracy over seeds per method, with the 95% band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("finetune", "downstream fine-tuning (mean over tasks)", "fine-tuning step"),
              ("relearn", "relearning on a few forget samples", "relearning step"))
    for ax, (key, title, xlabel) in zip(axes, panels):
        for name, curves in report.get("curves", {}).items():
            c = (curves or {}).get(key)
            if not c:
                continue
            line, = ax.plot(c["steps"], c["mean"], marker="o", label=name)
            if all(v is not None for v in c["ci_low"]):
                ax.fill_between(c["steps"], [max(0.0, v) for v in c["ci_low"]],
                                [min(1.0, v) for v in c["ci_high"]], color=line.get_color(), alpha=0.15)
        ax.set(title=title, xlabel=xlabel, ylabel="forget accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[::-1]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            break
    fig.suptitle(f"mean over {len(report['seeds'])} seeds, band: 95% interval", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
