"""TrainConfig: the training settings plus the objective's ``UnlearnConfig`` (declared once, in
objectives/config.py), read from YAML with ``yaml.safe_load``.

A config file and ``--set`` use flat keys: a TrainConfig field sets the training, any other
UnlearnConfig field sets the objective (``unlearn.NAME`` names an objective field explicitly, and a
nested ``unlearn:`` mapping works too, as ``config.json`` stores it). ``seed`` is the run's seed and,
unless ``unlearn.seed`` is given, the objective's too. Unknown keys and invalid values raise
``ConfigError`` naming the key and what is allowed; the command line turns it into one line and exit 2.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from ..objectives.config import UnlearnConfig


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # what to unlearn from
    model: str = "tiny"  # "tiny", "default", "smollm2", or a local Hugging Face model directory
    forget: str = ""  # JSON-lines file, "hf:NAME[:SPLIT]", or "synthetic" (the preset's data)
    retain: str = ""
    envs: list = field(default_factory=list)  # one data source per fine-tuning environment
    text_key: str = "text"
    question_key: str = "question"
    answer_key: str = "answer"
    max_length: int = 128
    # the objective: every UnlearnConfig field, one default each (objectives/config.py)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    # what the steps minimise: "unlearn" (the objective below on forget/retain/envs) or "finetune"
    # (plain cross-entropy on the training data: teaching a model, the relearning and fine-tuning attacks)
    task: str = "unlearn"
    # optimisation
    lr: float = 5e-6
    max_steps: int = 125
    batch_size: int = 4
    env_batch_size: int = 0  # examples per environment batch; 0: batch_size
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # "linear" (warm-up then linear decay) or "constant" (after warm-up)
    min_lr_ratio: float = 0.0  # the schedule's floor, a fraction of lr
    weight_decay: float = 0.0
    clip: float = 1.0  # 0 disables clipping
    dtype: str = "float32"  # weights: "float32" or "bfloat16"
    master_weights: bool = False  # fp32 master copy of bf16 weights
    gradient_checkpointing: bool = False
    lora_r: int = 0  # > 0: train LoRA adapters (needs peft)
    lora_alpha: float = 16.0
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    wa_start: int = -1  # >= 0: weight averaging from this step (SPEC §1.4)
    wa_every: int = 5
    # bookkeeping
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2: sharded between steps)

    def __post_init__(self):
        _choose("task", self.task, ("unlearn", "finetune"))
        _choose("dtype", self.dtype, ("float32", "bfloat16"))
        _choose("schedule", self.schedule, ("linear", "constant"))
        _choose("parallel", self.parallel, ("ddp", "fsdp"))
        if self.parallel == "fsdp" and self.lora_r > 0:
            raise ConfigError("parallel: fsdp shards full fine-tuning only; use parallel: ddp with lora_r > 0")
        if self.parallel == "fsdp" and self.wa_start >= 0:
            raise ConfigError("parallel: fsdp does not support weight averaging (wa_start >= 0) yet; use parallel: ddp")
        for key in ("max_steps", "batch_size", "grad_accum", "save_every", "max_length", "log_every", "wa_every",
                    "keep_checkpoints"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be an integer >= 1, got {getattr(self, key)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"lr: must be a number > 0, got {self.lr!r}")
        if not isinstance(self.env_batch_size, int) or self.env_batch_size < 0:
            raise ConfigError(f"env_batch_size: must be an integer >= 0 (0: batch_size), got {self.env_batch_size!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        for key in ("weight_decay", "clip", "lora_alpha"):
            if not (isinstance(getattr(self, key), (int, float)) and getattr(self, key) >= 0):
                raise ConfigError(f"{key}: must be a number >= 0, got {getattr(self, key)!r}")
        if self.master_weights and self.dtype != "bfloat16":
            raise ConfigError("master_weights: only meaningful with dtype: bfloat16")
        if not isinstance(self.envs, list):
            raise ConfigError(f"envs: must be a list of data sources, got {self.envs!r}")
        if not isinstance(self.unlearn, UnlearnConfig):
            raise ConfigError(f"unlearn: must be an UnlearnConfig, got {type(self.unlearn).__name__}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choose(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _coerce(key: str, value, current):
    """A --set string or YAML value into the field's type."""
    kind = type(current)
    if isinstance(value, str) and current is not None and kind is not str:
        import yaml

        value = yaml.safe_load(value)
    if current is None or value is None:
        return value
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float, list, str) and not isinstance(value, kind):
        raise ConfigError(f"{key}: must be {kind.__name__}, got {value!r}")
    return value


TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "unlearn")
UNLEARN_KEYS = tuple(UnlearnConfig.field_names())


def config_keys() -> list[str]:
    """Every key a config file or ``--set`` accepts (flat; ``unlearn.NAME`` for the objective's seed)."""
    return list(TRAIN_KEYS) + [k for k in UNLEARN_KEYS if k not in TRAIN_KEYS] + [
        f"unlearn.{k}" for k in UNLEARN_KEYS if k in TRAIN_KEYS]


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def build_config(base: dict | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a dict (YAML) plus ``key=value`` overrides; unknown keys are refused."""
    train = {f.name: _default(f) for f in fields(TrainConfig) if f.name != "unlearn"}
    unlearn = {f.name: _default(f) for f in fields(UnlearnConfig)}
    items = []
    for key, value in (base or {}).items():
        if key == "unlearn" and isinstance(value, dict):  # nested, as config.json stores it
            items += [(f"unlearn.{k}", v) for k, v in value.items()]
        else:
            items.append((key, value))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected key=value")
        key, value = item.split("=", 1)
        items.append((key.strip(), value))
    explicit = set()
    for key, value in items:
        section, name = (unlearn, key[len("unlearn."):]) if key.startswith("unlearn.") else (
            (train, key) if key in train else (unlearn, key))
        if name not in section:
            known = config_keys()
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; allowed keys: {', '.join(known)}")
        current = section[name] if section[name] is not None else _typed_none(name)
        section[name] = _coerce(key, value, current)
        if section is unlearn:
            explicit.add(name)
    if "seed" not in explicit:
        unlearn["seed"] = train["seed"]
    try:
        objective = UnlearnConfig(**unlearn)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("UnlearnConfig.", "")) from None
    return TrainConfig(**train, unlearn=objective)


def _typed_none(key):
    return {"beta": 0.0}.get(key)


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return build_config(data, overrides)
