"""From a TrainConfig to the Trainer's inputs: model, tokenizer, and tokenized data sets.

Model sources: ``tiny`` (the preset's small Llama, ``data.models``), a local Hugging Face model
directory, or a model id already in the local Hugging Face cache (nothing is
downloaded). Data sources: ``synthetic:NAME`` (the preset's data), a JSON-lines
file, or ``hf:NAME[:SPLIT]``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.models import tiny_model
from ..data.streams import read_records, tokenize_records
from ..data.synthetic import synthetic_records
from ..data.tokenizer import CharTokenizer
from .config import ConfigError, TrainConfig


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        return torch.device(config.device)
    except RuntimeError:
        raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N; got {config.device!r}") from None


def load_model(config: TrainConfig):
    """(model, tokenizer) for ``config.model``, in ``config.dtype``, on the config's device."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    if config.model == "tiny":
        tokenizer = CharTokenizer()
        model = tiny_model(tokenizer.vocab_size, seed=config.seed, max_length=config.max_length)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(config.model).is_dir()
        if not local and (Path(config.model).is_absolute() or config.model.startswith((".", "~"))):
            # a path, not a hub id: say it is missing (transformers would call it a malformed repo id)
            raise ConfigError(f"model: directory {config.model!r} does not exist; allowed: tiny, a local "
                              "Hugging Face model directory, or a cached model id")
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(config.model, local_files_only=True, dtype=dtype)
        except OSError as exc:
            where = "directory" if local else "model id (not in the local Hugging Face cache)"
            raise ConfigError(f"model: cannot load {where} {config.model!r}: {str(exc).splitlines()[0]}; "
                              "allowed: tiny, a local Hugging Face model directory, or a cached model id") from None
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(device=resolve_device(config), dtype=dtype), tokenizer


def load_examples(source: str, tokenizer, config: TrainConfig, key: str) -> list[dict]:
    if source.startswith("synthetic"):
        name = source.partition(":")[2] or {"forget": "forget", "retain": "retain"}.get(key, "arith")
        try:
            records = synthetic_records(name)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    else:
        try:
            records = read_records(source)
        except FileNotFoundError:
            raise ConfigError(f"{key}: data source {source!r} not found; allowed: a JSON-lines file, "
                              "hf:NAME[:SPLIT], or synthetic:NAME") from None
    if not records:
        raise ConfigError(f"{key}: data source {source!r} is empty")
    examples = tokenize_records(records, tokenizer, max_length=config.max_length, text_key=config.text_key,
                                question_key=config.question_key, answer_key=config.answer_key)
    empty = sum(int((ex["labels"] != -100).sum()) == 0 for ex in examples)
    if empty == len(examples):
        raise ConfigError(f"max_length: {config.max_length} leaves no answer token in any {key} example; raise it")
    if empty:
        import warnings

        warnings.warn(f"{key}: {empty} of {len(examples)} examples keep no answer token at "
                      f"max_length={config.max_length}; they add nothing to the loss", stacklevel=2)
    return examples


def build_run(config: TrainConfig) -> dict:
    """Everything ``Trainer(...)`` needs besides the output directory."""
    if not config.forget:
        raise ConfigError("forget: required (a JSON-lines file, hf:NAME[:SPLIT], or synthetic:forget)")
    model, tokenizer = load_model(config)
    forget = load_examples(config.forget, tokenizer, config, "forget")
    retain = load_examples(config.retain, tokenizer, config, "retain") if config.retain else None
    envs = [load_examples(src, tokenizer, config, f"envs[{i}]") for i, src in enumerate(config.envs)]
    return dict(model=model, tokenizer=tokenizer, forget=forget, retain=retain, envs=envs)
