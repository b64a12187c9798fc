"""bench/merge_seed_reports.py: reports of single-seed runs merge into the report one multi-seed run writes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from unlearn_fast.eval.report import aggregate

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _merge_module():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import merge_seed_reports

    return merge_seed_reports


def _rows(seed: int) -> dict:
    # npo+sam relearns less than npo by a seed-dependent margin: the paired difference is known
    return {"npo": {"forget_acc": 0.1, "relearn_forget_acc": 0.40 + 0.02 * seed, "retain_acc": 0.9, "seconds": 1.0},
            "npo+sam": {"forget_acc": 0.1, "relearn_forget_acc": 0.30 + 0.01 * seed, "retain_acc": 0.9,
                        "seconds": 2.0}}


def _report(seeds) -> dict:
    return {"rows": {str(s): _rows(s) for s in seeds}, "models": {str(s): {"steps": 30} for s in seeds},
            "config": {"argv": ["--seed", str(seeds[0])], "model": "smollm2"}, "versions": {"torch": "x"},
            "timings": {"total": 10.0 * len(seeds), "models": 1.0, "retain_only_models": 0.0, "unlearning": 2.0,
                        "attacks": 3.0, "per_seed": {str(s): {"model": 1.0} for s in seeds}}}


def test_merged_reports_equal_one_multi_seed_aggregation(tmp_path):
    m = _merge_module()
    merged = m.merge([_report([0]), _report([1, 2])], "t")
    reference = aggregate({s: _rows(s) for s in (0, 1, 2)})
    assert merged["seeds"] == reference["seeds"] and merged["config"]["seeds"] == [0, 1, 2]
    got = merged["comparisons"]["npo+sam vs npo"]["relearn_forget_acc"]
    assert got == reference["comparisons"]["npo+sam vs npo"]["relearn_forget_acc"]
    assert got["mean_diff"] == pytest.approx(-0.11)  # mean of -(0.10 + 0.01·seed) over seeds 0-2
    assert merged["methods"] == reference["methods"]
    assert merged["timings"]["total"] == 30.0 and merged["timings"]["per_report_total"] == [10.0, 20.0]
    with pytest.raises(ValueError, match="seed 1 appears in two reports"):
        m.merge([_report([1]), _report([1, 2])], "t")
    paths = []
    for i, r in enumerate((_report([0]), _report([1]))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    sys.argv = ["merge", *map(str, paths), "--output", str(tmp_path / "out")]
    m.main()
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["seeds"] == [0, 1] and (tmp_path / "out" / "report.md").exists()
