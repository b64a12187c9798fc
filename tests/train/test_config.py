"""One configuration: every field of TrainConfig and of the UnlearnConfig it holds is reachable from a
config file and from --set, with one default each (UnlearnConfig's)."""
import dataclasses

import pytest
import yaml

from unlearn_fast.objectives.config import UnlearnConfig
from unlearn_fast.train.config import ConfigError, TrainConfig, build_config, config_keys

# key -> (a non-default value as --set spells it, the value it must become, other keys it needs)
TRAIN_VALUES = {
    "model": ("default", "default", []), "forget": ("a.jsonl", "a.jsonl", []), "retain": ("b.jsonl", "b.jsonl", []),
    "envs": ("[x.jsonl, y.jsonl]", ["x.jsonl", "y.jsonl"], []), "text_key": ("body", "body", []),
    "question_key": ("q", "q", []), "answer_key": ("a", "a", []), "max_length": ("64", 64, []),
    "lr": ("0.002", 0.002, []), "max_steps": ("7", 7, []), "batch_size": ("3", 3, []), "grad_accum": ("2", 2, []),
    "warmup_ratio": ("0.25", 0.25, []), "schedule": ("constant", "constant", []), "weight_decay": ("0.1", 0.1, []),
    "clip": ("0", 0.0, []), "dtype": ("bfloat16", "bfloat16", []),
    "master_weights": ("true", True, ["dtype=bfloat16"]), "gradient_checkpointing": ("true", True, []),
    "lora_r": ("8", 8, []), "lora_alpha": ("32", 32.0, []), "lora_targets": ("[q_proj]", ["q_proj"], []),
    "wa_start": ("3", 3, []), "wa_every": ("2", 2, []), "seed": ("11", 11, []), "save_every": ("5", 5, []),
    "keep_checkpoints": ("4", 4, []), "log_every": ("3", 3, []), "device": ("cpu", "cpu", []),
    "parallel": ("fsdp", "fsdp", []), "task": ("finetune", "finetune", []), "env_batch_size": ("2", 2, []),
    "min_lr_ratio": ("0.05", 0.05, []),
}
UNLEARN_VALUES = {
    "method": ("simnpo", "simnpo", []), "beta": ("0.5", 0.5, []), "npo_form": ("batch_mean", "batch_mean", []),
    "simnpo_delta": ("0.5", 0.5, []), "forget_weight": ("2", 2.0, []), "retain_weight": ("0.5", 0.5, []),
    "retain_loss": ("kl", "kl", []), "irm": ("param_scalar", "param_scalar", ["irm_weight=0.5"]),
    "irm_weight": ("0.7", 0.7, ["irm=logit"]), "irm_fd_step": ("0.01", 0.01, []), "sam_rho": ("0.05", 0.05, []),
    "sam_adaptive": ("true", True, []), "rs_samples": ("2", 2, []), "rs_sigma": ("0.001", 0.001, []),
    "gp_weight": ("0.3", 0.3, []), "gp_step": ("0.01", 0.01, []), "cr_weight": ("0.2", 0.2, []),
    "cr_step": ("0.05", 0.05, []), "fd_step": ("0.01", 0.01, []), "rmu_layer": ("2", 2, []),
    "rmu_steering": ("10", 10.0, []), "rmu_alpha": ("5", 5.0, []), "seed": ("13", 13, []),
    "compat": ("reference", "reference", []), "ignore_index": ("-1", -1, []),
    "adv_eps": ("0.05", 0.05, []), "adv_steps": ("3", 3, []), "adv_step_size": ("0.001", 0.001, []),
    "adv_toward_weight": ("0.3", 0.3, []), "adv_away_weight": ("0.4", 0.4, []),
    "adv_cutoffs": ("[0.4, -4.0]", (0.4, -4.0), []),
}


def test_the_tables_cover_every_field():
    assert set(TRAIN_VALUES) == {f.name for f in dataclasses.fields(TrainConfig)} - {"unlearn"}
    assert set(UNLEARN_VALUES) == set(UnlearnConfig.field_names())


@pytest.mark.parametrize("name", sorted(TRAIN_VALUES))
def test_every_training_field_is_set_by_set_and_by_a_config_file(name):
    text, expected, needs = TRAIN_VALUES[name]
    assert getattr(TrainConfig(), name) != expected  # a real change, not the default
    assert getattr(build_config({}, [*needs, f"{name}={text}"]), name) == expected
    from_file = build_config(yaml.safe_load(f"{name}: {text}\n"), needs)
    assert getattr(from_file, name) == expected


@pytest.mark.parametrize("name", sorted(UNLEARN_VALUES))
def test_every_objective_field_is_set_by_set_and_by_a_config_file(name):
    text, expected, needs = UNLEARN_VALUES[name]
    key = "unlearn.seed" if name == "seed" else name  # a flat ``seed`` is the run's (and the objective's) seed
    assert getattr(UnlearnConfig(), name) != expected
    assert getattr(build_config({}, [*needs, f"{key}={text}"]).unlearn, name) == expected
    assert getattr(build_config(yaml.safe_load(f"{key}: {text}\n"), needs).unlearn, name) == expected
    nested = build_config({"unlearn": {name: yaml.safe_load(text)}}, needs)  # as config.json stores it
    assert getattr(nested.unlearn, name) == expected


def test_one_default_each_and_the_run_seed_seeds_the_objective():
    config = build_config({})
    assert config.unlearn == UnlearnConfig()
    assert build_config({"seed": 4}).unlearn.seed == 4
    assert build_config({"seed": 4, "unlearn.seed": 9}).unlearn.seed == 9
    assert not {f.name for f in dataclasses.fields(TrainConfig)} & (set(UnlearnConfig.field_names()) - {"seed"})


def test_stored_config_round_trips():
    config = build_config({}, ["method=simnpo", "gp_weight=0.1", "gp_step=0.02", "lr=0.01", "seed=3"])
    assert build_config(config.to_dict()) == config


def test_unknown_keys_name_the_allowed_ones():
    with pytest.raises(ConfigError, match="unlearn.frob: unknown key") as info:
        build_config({}, ["unlearn.frob=1"])
    assert "gp_step" in str(info.value) and "lr" in str(info.value)
    assert "unlearn.seed" in config_keys()
