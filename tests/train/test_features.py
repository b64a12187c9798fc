"""Gradient checkpointing (same loss and gradient, layers really recomputed) and LoRA through peft."""
import sys

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.testing.tiny import make_batch, tiny_llama
from tests.train.helpers import setup, weights
from unlearn_fast.train import Trainer, build_config
from unlearn_fast.train.trainer import enable_gradient_checkpointing


def sam_gradients(model):
    """NPO + SAM + ILU: both backward() and torch.autograd.grad() go through the checkpointed layers."""
    config = uf.UnlearnConfig(method="graddiff", sam_rho=0.05, irm="logit", irm_weight=0.5)
    metrics = uf.unlearning_gradients(model, make_batch(1), make_batch(2), [make_batch(3)], config)
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain_metrics, plain = sam_gradients(tiny_llama(layers=2))
    model = tiny_llama(layers=2)
    enable_gradient_checkpointing(model)
    model.train()
    calls = {"n": 0}
    layer = model.model.layers[0].mlp
    # a pre-hook: the recomputation stops early, right after the last saved tensor, before forward hooks
    layer.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    ckpt_metrics, ckpt = sam_gradients(model)
    # 4 forwards (forget, perturbed forget, retain, env) and one recomputation in each of their backwards
    assert calls["n"] == 8, f"layer ran {calls['n']} times: checkpointing is not active"
    for key in ("forget_loss", "forget_loss_perturbed", "retain_loss", "irm_penalty"):
        assert ckpt_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-6)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_key_runs_in_the_trainer(tmp_path):
    config = build_config({"max_steps": 2, "batch_size": 2, "lr": 1e-3, "max_length": 24, "method": "ga",
                           "gradient_checkpointing": True, "save_every": 10})
    model, tok, data = setup(config)
    trainer = Trainer(model, tok, config, forget=data["forget"], output_dir=tmp_path, progress=False)
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing


def test_lora_trains_only_the_adapters_and_saves_merged_model_and_adapter(tmp_path):
    pytest.importorskip("peft")
    config = build_config({"max_steps": 3, "batch_size": 2, "lr": 1e-2, "max_length": 24, "method": "npo",
                           "lora_r": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"], "save_every": 2})
    model, tok, data = setup(config)
    start = weights(model)
    trainer = Trainer(model, tok, config, forget=data["forget"], retain=data["retain"], output_dir=tmp_path,
                      progress=False)
    peft_model = trainer.model
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trained)
    trainer.train()
    # the checkpoint holds base and adapters; the base weights never moved
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    base = {k.replace("base_model.model.", "").replace("base_layer.", ""): v for k, v in saved.items() if "lora_" not in k}
    assert base.keys() == start.keys() and all(torch.equal(base[k], start[k]) for k in start)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items())
    # final/: the merged model (W + alpha/r · B A) in HF format, and the adapter on its own
    adapter = load_file(str(tmp_path / "final" / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    assert b.abs().max() > 0  # the adapter trained
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    expected = start["model.layers.0.self_attn.q_proj.weight"] + (8 / 4) * b @ a
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight.detach(), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight.detach(),
                               start["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=0)


def test_lora_without_peft_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    config = build_config({"max_steps": 1, "batch_size": 2, "max_length": 24, "method": "ga", "lora_r": 4})
    model, tok, data = setup(config)
    with pytest.raises(ImportError, match="lora_r > 0 needs the 'peft' package"):
        Trainer(model, tok, config, forget=data["forget"], output_dir=tmp_path, progress=False)
