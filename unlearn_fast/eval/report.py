"""report.json, report.md (the table) and robustness.png of a run."""
from __future__ import annotations

import json
from pathlib import Path

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
             "score: lower is more robust); gains: what each attack brings back on the same questions; 8/4-bit: round-to-nearest group-wise weight quantization; embedding attack: "
             "on the same unseen questions, with a universal prompt-embedding perturbation fitted on the relearning "
             "samples (weights unchanged).", ""]
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
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, out / "report.md")
    plot(report, out / "robustness.png")
    return out
