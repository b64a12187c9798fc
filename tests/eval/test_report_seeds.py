"""The multi-seed report: aggregate() from per-seed rows, and the files write_report makes of it."""
import json
import math

import pytest

from unlearn_fast.eval.report import METRICS, aggregate, comparison_sentence, write_report
from unlearn_fast.eval.stats import t_quantile


def _row(forget, relearn, finetune, retain=0.9, seconds=1.0, curve_shift=0.0):
    """A row shaped like eval/run.py's evaluate() output (two fine-tuning tasks, a relearning curve)."""
    return {"forget_acc": forget, "forget_prob": forget / 2, "retain_acc": retain, "utility_ppl": 3.0,
            "relearn_forget_acc": relearn, "finetune_forget_acc": finetune, "relearn_gain": relearn - forget,
            "finetune_gain": finetune - forget, "quant8_forget_acc": forget, "quant4_forget_acc": None,
            "finetune_task_acc": 0.8, "seconds": seconds, "attack_seconds": 2.0, "last_step": {"loss": 1.0},
            "relearn": {"forget_acc": relearn, "curve": [[0, forget], [3, relearn + curve_shift]]},
            "finetune": {"a": {"curve": [[0, forget], [6, finetune]], "forget_acc": finetune},
                         "b": {"curve": [[0, forget], [6, finetune + 0.1]], "forget_acc": finetune}}}


RELEARN_NPO = [0.50, 0.40, 0.60]
RELEARN_SAM = [0.42, 0.35, 0.49]  # 0.08, 0.05, 0.11 lower: a consistent paired effect despite the spread


def _rows():
    return {s: {"npo": _row(0.2, RELEARN_NPO[i], 0.3), "npo+sam": _row(0.2, RELEARN_SAM[i], 0.3, seconds=2.0),
                "original": _row(1.0, 1.0, 1.0)} for i, s in enumerate((100, 101, 102))}


def test_aggregate_summaries_hand_computed():
    report = aggregate(_rows())
    assert report["seeds"] == [100, 101, 102]
    npo = report["methods"]["npo"]
    assert set(METRICS) <= set(npo)
    rl = npo["relearn_forget_acc"]
    half = t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # sd of 0.5, 0.4, 0.6 is 0.1
    assert rl["per_seed"] == RELEARN_NPO and rl["mean"] == pytest.approx(0.5)
    assert (rl["ci_low"], rl["ci_high"]) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half))
    assert npo["quant4_forget_acc"]["mean"] is None and npo["quant4_forget_acc"]["n"] == 0  # skipped: no NaN
    assert npo["finetune_task_acc"]["mean"] == pytest.approx(0.8)  # extra scalar metrics are kept
    assert "last_step" not in npo and "relearn" not in npo


def test_aggregate_comparisons_are_paired():
    report = aggregate(_rows())
    assert list(report["comparisons"]) == ["npo+sam vs npo"]  # npo+ilu, rmu+ilu absent: no comparison
    d = report["comparisons"]["npo+sam vs npo"]["relearn_forget_acc"]
    diffs = [a - b for a, b in zip(RELEARN_SAM, RELEARN_NPO)]  # -0.08, -0.05, -0.11: sd 0.03
    half = t_quantile(0.975, 2) * 0.03 / math.sqrt(3)
    assert sum(diffs) / len(diffs) == pytest.approx(-0.08)
    assert d["mean_diff"] == pytest.approx(-0.08)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(-0.08 - half), pytest.approx(-0.08 + half))
    assert d["ci_high"] < 0 and d["n"] == 3
    # unpaired, the spread of the seeds would swamp the difference: the intervals overlap
    m = report["methods"]
    assert m["npo+sam"]["relearn_forget_acc"]["ci_high"] > m["npo"]["relearn_forget_acc"]["ci_low"]
    same = report["comparisons"]["npo+sam vs npo"]["forget_acc"]
    assert (same["mean_diff"], same["p"]) == (0.0, 1.0)
    assert report["comparisons"]["npo+sam vs npo"]["seconds"]["mean_diff"] == pytest.approx(1.0)


def test_aggregate_curves_band_over_seeds():
    rows = _rows()
    rows[101]["npo"]["relearn"]["curve"] = [[0, 0.2], [3, 0.4], [6, 0.5]]  # an extra step: only shared steps
    curve = aggregate(rows)["curves"]["npo"]
    assert curve["relearn"]["steps"] == [0, 3]
    assert curve["relearn"]["mean"] == pytest.approx([0.2, 0.5])
    assert curve["finetune"]["mean"] == pytest.approx([0.2, 0.35])  # the mean over the two tasks, then seeds
    assert curve["relearn"]["ci_low"][1] < 0.5 < curve["relearn"]["ci_high"][1]


def test_aggregate_missing_method_for_a_seed():
    rows = _rows()
    del rows[102]["npo+sam"]
    report = aggregate(rows)
    assert report["methods"]["npo+sam"]["relearn_forget_acc"]["per_seed"] == RELEARN_SAM[:2] + [None]
    assert report["comparisons"]["npo+sam vs npo"]["relearn_forget_acc"]["n"] == 2


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match="rows_by_seed"):
        aggregate({})
    with pytest.raises(TypeError, match="rows_by_seed"):
        aggregate({0: [1, 2]})


def test_comparison_sentence_says_what_the_interval_allows():
    report = aggregate(_rows())
    text = comparison_sentence("npo+sam vs npo", report["comparisons"]["npo+sam vs npo"])
    assert "npo+sam recovers less than npo under relearning" in text and "fine-tuning" in text
    assert "3 seeds" in text and "-0.080" in text
    flat = {k: {"mean_diff": -0.01, "ci_low": -0.12, "ci_high": 0.1, "p": 0.8, "n": 5}
            for k in ("relearn_forget_acc", "finetune_forget_acc")}
    assert "cannot tell npo+ilu from npo under either attack" in comparison_sentence("npo+ilu vs npo", flat)
    assert "embedding" not in comparison_sentence("npo+ilu vs npo", flat)  # not measured: not mentioned
    robust = {**flat, "embed_forget_acc": {"mean_diff": -0.2, "ci_low": -0.3, "ci_high": -0.1, "p": 0.01, "n": 5}}
    text = comparison_sentence("npo+adv vs npo", robust)
    assert "after embedding attack -0.200 [-0.300, -0.100]" in text
    assert "npo+adv recovers less than npo under the embedding attack" in text
    robust["embed_forget_acc"].update(ci_high=0.05)
    assert "cannot tell npo+adv from npo under any attack" in comparison_sentence("npo+adv vs npo", robust)


def test_write_report_multi_seed_files(tmp_path):
    report = {"title": "test run", **aggregate(_rows()), "timings": {"total": 12.5}}
    write_report(report, tmp_path)
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["methods"]["npo"]["relearn_forget_acc"]["per_seed"] == RELEARN_NPO
    assert set(loaded["comparisons"]["npo+sam vs npo"]["relearn_forget_acc"]) >= {"mean_diff", "ci_low",
                                                                                  "ci_high", "p"}
    md = (tmp_path / "report.md").read_text()
    assert "| npo | 0.200 [0.200, 0.200] |" in md  # forget acc: no spread
    assert "0.500 [" in md and "Seeds 100, 101, 102" in md
    assert md.count("**npo+sam vs npo**") == 1
    assert (tmp_path / "robustness.png").stat().st_size > 1000
