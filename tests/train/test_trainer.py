"""The trainer: checkpoints, exact resume after SIGKILL, non-finite stop, master weights, WA, config refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.helpers import same_weights, setup, weights
from unlearn_fast.train import ConfigError, NonFiniteLoss, Trainer, build_config

REPO = Path(__file__).resolve().parents[2]


def run(tmp_path, overrides, *, resume=False, name="out"):
    config = build_config({"max_steps": 6, "batch_size": 2, "save_every": 2, "lr": 1e-3, "max_length": 24}, overrides)
    model, tok, data = setup(config)
    trainer = Trainer(model, tok, config, forget=data["forget"], retain=data["retain"],
                      envs=[data["env"]] if config.unlearn.irm else (), output_dir=tmp_path / name, progress=False)
    metrics = trainer.train(resume=resume)
    return trainer, metrics


def test_npo_ilu_run_writes_checkpoints_metrics_and_final(tmp_path):
    trainer, metrics = run(tmp_path, ["method=npo", "irm=logit", "irm_weight=0.5", "grad_accum=2"])
    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all("irm_penalty" in r and r["grad_norm"] >= 0 for r in lines if "loss" in r)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "config.json").exists()
    assert (out / "ref_nll").is_dir() and any((out / "ref_nll").iterdir())
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    assert same_weights(weights(reloaded), weights(trainer.model))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full, _ = run(tmp_path, ["method=npo", "max_steps=5"], name="full")
    # a run stopped after its checkpoint at step 2, then resumed
    run(tmp_path, ["method=npo", "max_steps=2", "save_every=2"], name="cut")
    (tmp_path / "cut" / "final").rename(tmp_path / "cut" / "unused")
    resumed, _ = run(tmp_path, ["method=npo", "max_steps=5"], name="cut", resume=True)
    assert same_weights(weights(full.model), weights(resumed.model))


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.train.helpers import setup
from unlearn_fast.train import Trainer, build_config
import unlearn_fast.train.trainer as tr
config = build_config({{"max_steps": 8, "batch_size": 2, "save_every": 2, "lr": 1e-3, "max_length": 24,
                        "method": "npo", "irm": "logit", "irm_weight": 0.3}})
model, tok, data = setup(config)
slow = tr.unlearning_gradients
def slowed(*a, **k):
    time.sleep(float(sys.argv[2]))
    return slow(*a, **k)
tr.unlearning_gradients = slowed
Trainer(model, tok, config, forget=data["forget"], retain=data["retain"], envs=[data["env"]],
        output_dir=sys.argv[1], progress=False).train(resume=True)
"""


def test_sigkill_and_resume_ends_bit_identical(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, str(script), str(reference), "0"], check=True, env=env, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.3"], env=env)
    deadline = time.time() + 300
    while not (killed / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.25)  # somewhere inside steps 5-6, maybe mid-checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it was killed; the test checked nothing"
    subprocess.run([sys.executable, str(script), str(killed), "0"], check=True, env=env, timeout=600)
    from safetensors.torch import load_file

    a = load_file(str(reference / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    import unlearn_fast.train.trainer as tr

    real = tr.unlearning_gradients
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        metrics = real(*args, **kwargs)
        if calls["n"] == 3:
            metrics["forget_loss"] = float("nan")
        return metrics

    monkeypatch.setattr(tr, "unlearning_gradients", poisoned)
    with pytest.raises(NonFiniteLoss, match="step 3.*checkpoint-2"):
        run(tmp_path, ["method=ga"])
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").exists()


def test_bf16_with_master_weights_and_weight_averaging(tmp_path):
    config = build_config({"max_steps": 4, "batch_size": 2, "save_every": 10, "lr": 1e-3, "max_length": 24,
                           "method": "graddiff", "dtype": "bfloat16", "master_weights": True,
                           "wa_start": 1, "wa_every": 1})
    model, tok, data = setup(config)
    model.to(torch.bfloat16)
    trainer = Trainer(model, tok, config, forget=data["forget"], retain=data["retain"],
                      output_dir=tmp_path / "o", progress=False)
    seen = []
    real_update = trainer.averager.update

    def record(model, step):
        updated = real_update(model, step)
        if updated:
            seen.append({n: p.detach().float().clone() for n, p in model.named_parameters()})
        return updated

    trainer.averager.update = record
    trainer.train()
    assert all(m.dtype == torch.float32 for m in trainer.master.masters)
    assert len(seen) == 4
    name = "model.layers.0.mlp.down_proj.weight"
    expected = sum(s[name] for s in seen) / 4
    torch.testing.assert_close(dict(trainer.model.named_parameters())[name].float(),
                               expected.to(torch.bfloat16).float())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["lrr=1"], "lrr: unknown key"),
        (["lr=-1"], "lr: must be a number > 0"),
        (["method=foo"], "method must be one of"),
        (["batch_size=two"], "batch_size: must be int"),
        (["irm=logit"], "irm_weight must be > 0"),
        (["sam_adaptive=maybe"], "sam_adaptive: must be true or false"),
        (["parallel=zero3"], "parallel: must be one of ddp, fsdp"),
        (["parallel=fsdp", "lora_r=4"], "parallel: fsdp shards full fine-tuning only"),
    ],
)
def test_bad_config_is_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, overrides)
