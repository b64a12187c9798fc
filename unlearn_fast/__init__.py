"""unlearn_fast: kernel-optimised regularisation for robust LLM unlearning."""
from . import ops, optim
from .averaging import WeightAverager
from .config import UnlearnConfig
from .flatten import FlatParameters, flatten_parameters
from .reference_nll import reference_nll
from .rmu import rmu_trainable
from .step import unlearning_gradients

__version__ = "0.1.0"
__all__ = ["ops", "optim", "flatten_parameters", "FlatParameters", "UnlearnConfig", "WeightAverager", "reference_nll", "rmu_trainable", "unlearning_gradients", "__version__"]
