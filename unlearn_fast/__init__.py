"""unlearn_fast: kernel-optimised regularisation for robust LLM unlearning."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
