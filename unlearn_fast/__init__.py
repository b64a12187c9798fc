"""unlearn_fast: kernel-optimised regularisation for robust LLM unlearning."""
import importlib

from . import ops, optim
from .objectives.adversarial import embedding_attack
from .optim.averaging import WeightAverager
from .objectives.config import UnlearnConfig
from .flatten import FlatParameters, flatten_parameters
from .objectives.reference_nll import reference_nll
from .objectives.rmu import rmu_trainable
from .objectives.step import unlearning_gradients

__version__ = "0.1.0"

# Heavier parts load on first use: ``uf.Trainer``, ``uf.TrainConfig``, ``uf.integrations``, ``uf.eval``.
_LAZY = {"Trainer": ("train", "Trainer"), "TrainConfig": ("train", "TrainConfig"),
         "integrations": ("integrations", None), "train": ("train", None), "eval": ("eval", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'unlearn_fast' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    return module if attr is None else getattr(module, attr)


__all__ = ["ops", "optim", "flatten_parameters", "FlatParameters", "UnlearnConfig", "WeightAverager",
           "reference_nll", "rmu_trainable", "unlearning_gradients", "Trainer", "TrainConfig", "integrations",
           "__version__"]
