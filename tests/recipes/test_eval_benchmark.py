"""``unlearn-fast eval --benchmark``: the command end to end on a tiny saved model and exported benchmark
directories; eval.json must hold exactly what run_benchmark returns when called directly."""
import json

import pytest
import torch

from unlearn_fast.cli import main
from unlearn_fast.data.benchmark_corpus import export_benchmark
from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.data.tokenizer import WordTokenizer
from unlearn_fast.eval.benchmark_suite import run_benchmark
from unlearn_fast.recipes.teach import load_directory
from unlearn_fast.testing.tiny import tiny_llama

pytest.importorskip("scipy")
pytest.importorskip("rouge_score")

NEW_TOKENS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-benchmark")
    corpus = build_corpus(0, num_entities=6, forget_entities=2, general=6, utility=2, env_train=2, env_test=3)
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    models = {}
    for name, seed in (("unlearned", 1), ("retain", 2)):  # two different random models: no metric is 0 or 1 by luck
        models[name] = root / name
        tiny_llama(vocab=len(tokenizer), layers=2, seed=seed).save_pretrained(models[name])
        tokenizer.save_pretrained(models[name])
    data = {b: export_benchmark(corpus, b, root / "data" / b) for b in ("tofu", "muse", "wmdp")}
    return root, models, data


def values(result: dict) -> dict:
    """The metrics and the raw per-question values, flattened (not the config: it holds the timing)."""
    flat = {k: v for k, v in result.items() if k not in ("config", "raw")}
    flat.update({f"raw.{k}.{i}": x for k, v in result["raw"].items() for i, x in enumerate(v)})
    return flat


def test_tofu_eval_json_equals_run_benchmark_with_a_retain_reference(setup):
    root, models, data = setup
    common = ["--benchmark", "tofu", "--data", str(data["tofu"]), "--max-new-tokens", str(NEW_TOKENS),
              "--batch-size", "4"]
    assert main(["eval", "--checkpoint", str(models["retain"]), "--output", str(root / "ev-retain"), *common]) == 0
    reference = root / "ev-retain" / "eval.json"
    assert main(["eval", "--checkpoint", str(models["unlearned"]), "--output", str(root / "ev"),
                 "--reference", str(reference), *common]) == 0
    written = json.loads((root / "ev" / "eval.json").read_text())
    assert written["checkpoint"] == str(models["unlearned"]) and not (root / "ev" / "report.md").exists()

    model, tokenizer = load_directory(models["unlearned"])
    direct = run_benchmark(model, tokenizer, "tofu", data["tofu"], reference=reference, batch_size=4,
                           max_new_tokens=NEW_TOKENS, progress=False)
    got = written["benchmark"]
    assert set(got) == set(direct)
    assert {"forget_truth_ratio", "forget_quality", "model_utility", "privleak", "mia_min_k_plus_plus",
            "forget_Q_A_Prob", "retain_Truth_Ratio", "wf_Q_A_ROUGE", "ra_Truth_Ratio"} <= set(got)
    assert values(got) == pytest.approx(values(direct), rel=1e-12, abs=0)
    assert got["forget_quality"] is not None and 0 < got["forget_quality"] <= 1
    # the reference was read from the first command's file: the same model evaluated directly gives it
    retain_model, _ = load_directory(models["retain"])
    retain = run_benchmark(retain_model, tokenizer, "tofu", data["tofu"], batch_size=4, max_new_tokens=NEW_TOKENS,
                           progress=False)
    assert retain["raw"]["forget_truth_ratios"] == pytest.approx(
        json.loads(reference.read_text())["benchmark"]["raw"]["forget_truth_ratios"], rel=1e-12)


@pytest.mark.parametrize("benchmark", ["muse", "wmdp"])
def test_muse_and_wmdp_eval_json_equals_run_benchmark(setup, benchmark):
    root, models, data = setup
    out = root / f"ev-{benchmark}"
    assert main(["eval", "--checkpoint", str(models["unlearned"]), "--output", str(out), "--benchmark", benchmark,
                 "--data", str(data[benchmark]), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    got = json.loads((out / "eval.json").read_text())["benchmark"]
    model, tokenizer = load_directory(models["unlearned"])
    direct = run_benchmark(model, tokenizer, benchmark, data[benchmark], max_new_tokens=NEW_TOKENS, progress=False)
    expected_keys = {"muse": {"forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak"},
                     "wmdp": {"wmdp_bio", "wmdp_bio_acc_norm", "mmlu"}}[benchmark]
    assert expected_keys <= set(got) and set(got) == set(direct)
    assert values(got) == pytest.approx(values(direct), rel=1e-12, abs=0)


@pytest.mark.parametrize("case, expected", [
    ("unknown", "unknown benchmark; choose from tofu, muse, wmdp"),
    ("no-data-arg", "needs --data DIR"),
    ("missing-dir", "no such directory"),
    ("empty-dir", "no tofu 'forget' split"),
    ("missing-reference", "no such file"),
    ("data-without-benchmark", "--data needs --benchmark"),
    ("bad-checkpoint", "not a model directory"),
])
def test_bad_arguments_exit_2_with_one_line(setup, capsys, case, expected):
    root, models, data = setup
    (root / "empty").mkdir(exist_ok=True)
    argv = {"unknown": ["--benchmark", "tufo", "--data", str(data["tofu"])],
            "no-data-arg": ["--benchmark", "tofu"],
            "missing-dir": ["--benchmark", "tofu", "--data", str(root / "nowhere")],
            "empty-dir": ["--benchmark", "tofu", "--data", str(root / "empty")],
            "missing-reference": ["--benchmark", "tofu", "--data", str(data["tofu"]), "--reference",
                                  str(root / "nowhere.json")],
            "data-without-benchmark": ["--data", str(data["tofu"])],
            "bad-checkpoint": ["--benchmark", "tofu", "--data", str(data["tofu"])]}[case]
    checkpoint = root / "empty" if case == "bad-checkpoint" else models["unlearned"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(root / "ev-bad"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (root / "ev-bad" / "eval.json").exists()


def test_lm_eval_tasks_from_an_include_directory_beside_the_wmdp_suite(tmp_path):
    """One command: the WMDP suite on a local question file and the same questions as a local lm-eval task
    (--lm-eval-include); the harness's accuracy equals the project's multiple-choice accuracy in eval.json."""
    pytest.importorskip("lm_eval")
    from tests.eval.test_lm_eval_bridge import ITEMS, word_level_hf_tokenizer

    data = tmp_path / "wmdp"
    data.mkdir()
    (data / "wmdp-bio.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    (data / "meta.json").write_text(json.dumps({"mc_format": "text"}))  # the choice text is the continuation
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "uf_local_bio.yaml").write_text(
        "task: uf_local_bio\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data / 'wmdp-bio.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    tokenizer = word_level_hf_tokenizer()
    checkpoint = tmp_path / "model"
    tiny_llama(vocab=len(tokenizer), layers=2, seed=3).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(out), "--benchmark", "wmdp", "--data",
                 str(data), "--lm-eval-tasks", "uf_local_bio", "--lm-eval-include", str(tasks)]) == 0
    written = json.loads((out / "eval.json").read_text())
    harness, ours = written["lm_eval"]["uf_local_bio"], written["benchmark"]
    assert harness["acc,none"] == pytest.approx(ours["wmdp_bio"])
    assert harness["acc_norm,none"] == pytest.approx(ours["wmdp_bio_acc_norm"])
    assert 0 < ours["wmdp_bio"] < 1  # not a trivially equal 0 or 1


def test_retain_only_model_is_taught_without_the_forget_facts_and_cached(tmp_path, monkeypatch):
    """Forget quality's reference must never see the forget set: teach() gets the corpus minus its forget
    facts (retain, general text and tasks unchanged), with the default model's tokenizer; the second call
    reads the cache."""
    from unlearn_fast.recipes import teach as teach_module
    from unlearn_fast.recipes.teach import QUICK_MODEL, TeachSpec, retain_only_model

    corpus = build_corpus(0, num_entities=4, forget_entities=1, general=4, utility=2, env_train=2, env_test=2)
    tokenizer = WordTokenizer.from_texts(corpus.all_texts())
    seen = []
    real_teach = teach_module.teach

    def spy(model, tok, taught, spec, **kw):
        seen.append(taught)
        return real_teach(model, tok, taught, spec, **kw)

    monkeypatch.setattr(teach_module, "teach", spy)
    spec = TeachSpec(max_steps=2, min_steps=2, eval_every=1, batch_size=4, text_per_batch=2, env_per_batch=2)
    model, info = retain_only_model(corpus, tokenizer, spec=QUICK_MODEL, teach_spec=spec, cache_dir=tmp_path,
                                    progress=lambda _: None)
    assert len(seen) == 1 and seen[0].forget == [] and corpus.forget
    assert seen[0].retain == corpus.retain and seen[0].general_train == corpus.general_train
    assert seen[0].envs == corpus.envs and model.config.vocab_size == len(tokenizer)
    assert info["forget_acc"] is None and not info["cached"]
    again, info2 = retain_only_model(corpus, tokenizer, spec=QUICK_MODEL, teach_spec=spec, cache_dir=tmp_path,
                                     progress=lambda _: None)
    assert len(seen) == 1 and info2["cached"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_lm_eval_refusals_exit_2_with_one_line(setup, capsys, tmp_path):
    """A checkpoint with the word tokenizer (the harness needs a Hugging Face one), and an unknown task."""
    pytest.importorskip("lm_eval")
    from tests.eval.test_lm_eval_bridge import word_level_hf_tokenizer

    root, models, _ = setup
    (tmp_path / "no-tasks").mkdir()
    hf_tokenizer = word_level_hf_tokenizer()
    hf_checkpoint = tmp_path / "hf-model"
    tiny_llama(vocab=len(hf_tokenizer), layers=2, seed=3).save_pretrained(hf_checkpoint)
    hf_tokenizer.save_pretrained(hf_checkpoint)
    for checkpoint, expected in ((models["unlearned"], "needs a Hugging Face tokenizer"),
                                 (hf_checkpoint, "uf_no_such_task")):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "ev"),
                     "--lm-eval-tasks", "uf_no_such_task", "--lm-eval-include", str(tmp_path / "no-tasks")]) == 2
        err = capsys.readouterr().err  # (after the model loaded: its progress bar is there too)
        errors = [line for line in err.splitlines() if line.startswith("unlearn-fast eval: error:")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
