"""The thin trainer: config, data, checkpoints, loop."""
from .config import ConfigError, TrainConfig, build_config, load_config
from .data import BatchStream, read_records, tokenize_records
from .trainer import NonFiniteLoss, Trainer

__all__ = ["BatchStream", "ConfigError", "NonFiniteLoss", "TrainConfig", "Trainer", "build_config", "load_config",
           "read_records", "tokenize_records"]
