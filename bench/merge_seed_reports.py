"""Merge the report.json of `unlearn-fast run` jobs that ran different seeds (one process per seed, so a
long job keeps the seeds it finished) into one multi-seed report: report.json / report.md / robustness.png
with the same aggregation (means, 95% intervals, paired comparisons) as one `run --seeds a,b,...`.

    python bench/merge_seed_reports.py runs/smollm2-s0/report.json runs/smollm2-s1/report.json \
        --output runs/smollm2-merged --title "SmolLM2-135M, 2 seeds"
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from unlearn_fast.eval.report import aggregate, write_report


def merge(reports: list[dict], title: str) -> dict:
    rows, models, per_seed, argv = {}, {}, {}, []
    for report in reports:
        for seed, seed_rows in report["rows"].items():
            if seed in rows:
                raise ValueError(f"seed {seed} appears in two reports")
            rows[seed] = seed_rows
            models[seed] = report["models"][seed]
            per_seed[seed] = report["timings"]["per_seed"][seed]
        argv.append(report["config"]["argv"])
    config = dict(reports[0]["config"], argv=argv, seeds=[int(s) for s in rows])
    totals = {k: sum(r["timings"][k] for r in reports) for k in ("total", "models", "retain_only_models",
                                                                  "unlearning", "attacks")}
    return {"title": title, **aggregate({int(s): r for s, r in rows.items()}), "rows": rows, "models": models,
            "config": config, "versions": reports[0]["versions"],
            "timings": {**totals, "per_seed": per_seed, "per_report_total": [r["timings"]["total"] for r in reports]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default="unlearn_fast main job (merged seeds)")
    args = parser.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    write_report(merge(reports, args.title), Path(args.output))
    print(Path(args.output) / "report.md")


if __name__ == "__main__":
    main()
