"""Built-in presets: configurations that run with nothing downloaded.

``tiny``: a 2-layer Llama built from a config (random weights, seeded), a
character-level tokenizer defined here, and synthetic data generated in code:
forget = question/answer facts about invented people, retain = other invented
facts, environments = arithmetic and sentiment-like text. NPO on it trains in
seconds on a laptop CPU; it exercises the whole pipeline (reference-NLL cache,
checkpoints, metrics, final model), not the quality of unlearning.
"""
from __future__ import annotations


PRESETS: dict[str, dict] = {
    "tiny": {
        "model": "tiny",
        "forget": "synthetic:forget",
        "retain": "synthetic:retain",
        "method": "npo",
        "beta": 0.1,
        "lr": 1e-3,
        "max_steps": 30,
        "batch_size": 8,
        "max_length": 48,
        "warmup_ratio": 0.1,
        "save_every": 10,
        "seed": 0,
        "device": "cpu",
    },
}


def preset(name: str) -> dict:
    from ..train.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"--preset {name}: unknown preset; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
