"""The command line: refusals (exit 2, one line, no traceback), the preset and config runs, --resume, delegation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unlearn_fast.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--no-progress", "--set", "batch_size=2"]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--preset", "tiny", "--set", "lrr=1"], "lrr: unknown key"),
        (["train", "--preset", "tiny", "--set", "lr=-3"], "lr: must be a number > 0"),
        (["train", "--preset", "tiny", "--set", "method=sgd"], "method must be one of"),
        (["train", "--preset", "tiny", "--set", "batch_size=many"], "batch_size: must be int"),
        (["train", "--preset", "tiny", "--set", "lr"], "--set lr: expected key=value"),
        (["train", "--preset", "huge"], "--preset huge: unknown preset; allowed: tiny"),
        (["train", "missing.yaml"], "missing.yaml: config file not found"),
        (["train"], "train needs a CONFIG.yaml, --preset NAME, or --resume DIR"),
        (["train", "--preset", "tiny", "--set", "forget=nowhere.jsonl"], "forget: data source 'nowhere.jsonl' not found"),
        (["train", "--preset", "tiny", "--set", "irm=logit", "--set", "irm_weight=1"], "irm needs at least one environment"),
        (["train", "--preset", "tiny", "--set", "max_length=8"], "max_length: 8 leaves no answer token in any forget"),
        (["frobnicate"], "unknown command 'frobnicate'; allowed: train, eval, run, bench"),
    ],
)
def test_refusals_exit_2_with_one_line_naming_the_problem(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expected in one_error_line(capsys)


def test_bad_key_in_a_yaml_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny\nforget: synthetic:forget\nsam_rho: -1\n")
    assert main(["train", str(config)]) == 2
    assert "sam_rho must be a number >= 0" in one_error_line(capsys)


def test_delegation_to_a_missing_module_and_a_missing_bench(tmp_path, capsys, monkeypatch):
    from unlearn_fast import cli

    assert cli._delegate("unlearn_fast.no_such_module", "eval_main", []) == 2
    assert "unlearn_fast.no_such_module is not part of this installation" in one_error_line(capsys)
    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)  # an installed package without its checkout
    assert main(["bench"]) == 2
    assert "bench/e2e.py not found" in one_error_line(capsys)


def test_bench_finds_the_checkout_from_any_directory(tmp_path, monkeypatch):
    from unlearn_fast import cli

    monkeypatch.chdir(tmp_path)
    assert cli.bench_script() == Path(__file__).resolve().parent.parent / "bench" / "e2e.py"


def test_bench_runs_the_checkout_script_with_its_arguments(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "e2e.py").write_text("import sys\nprint('e2e', sys.argv[1:])\nsys.exit(3)\n")
    from unlearn_fast import cli

    monkeypatch.setattr(cli, "CHECKOUT", tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["bench", "--quick"]) == 3
    assert "e2e ['--quick']" in capsys.readouterr().out


def test_preset_run_and_resume_match_an_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    steps = ["--set", "max_steps=4", "--set", "save_every=2"]
    assert main(["train", "--preset", "tiny", "--output", str(tmp_path / "full"), *SMALL, *steps]) == 0
    # a run that died after its step-2 checkpoint: that checkpoint and config.json, nothing else
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    shutil.copy(tmp_path / "full" / "config.json", tmp_path / "cut")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0  # config from config.json
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "resumed" and records[0]["step"] == 2
    assert [r["step"] for r in records if "loss" in r] == [3, 4]
    full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert {"loss", "forget_loss", "tokens_per_s", "lr", "grad_norm"} <= full[-1].keys()
    assert full[-1]["loss"] == records[-1]["loss"]
    assert (tmp_path / "full" / "final" / "config.json").exists()


@pytest.mark.parametrize("name", ["tiny.yaml", "npo_sam_ilu.yaml", "npo_adv.yaml"])
def test_shipped_configs_load_and_run(name, tmp_path):
    assert main(["train", str(REPO / "configs" / name), "--output", str(tmp_path), *SMALL,
                 "--set", "max_steps=1", "--set", "grad_accum=1"]) == 0
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["step"] == 1
    if name == "npo_sam_ilu.yaml":
        assert metrics["sam_norm"] > 0 and metrics["irm_penalty"] >= 0
    if name == "npo_adv.yaml":
        # step 1 is at the reference weights, so the clean forget NLL equals the cached reference (npo_delta 0);
        # the attacked prompts bring the answers closer: the NLL at them is lower (measured -0.023)
        assert metrics["npo_delta"] < -1e-3


def test_python_m_entry_point_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "unlearn_fast", "train", "--preset", "tiny", "--set", "seed=x"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "unlearn-fast: error: seed: must be int, got 'x'"
