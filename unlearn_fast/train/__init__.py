"""Training (above objectives/ and data/): the ONE loop (``Trainer``), its config tree (``TrainConfig``
holding the objective's ``UnlearnConfig``), checkpoints, DDP/FSDP and building a run from a config.
Nothing else in the package steps an optimizer; the Trainer knows nothing of kernels."""
from .config import ConfigError, TrainConfig, build_config, load_config
from ..data.streams import BatchStream, read_records, tokenize_records
from .trainer import NonFiniteLoss, Trainer

__all__ = ["BatchStream", "ConfigError", "NonFiniteLoss", "TrainConfig", "Trainer", "build_config", "load_config",
           "read_records", "tokenize_records"]
