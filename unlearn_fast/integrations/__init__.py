"""Drop-in integrations with other training stacks (Hugging Face transformers)."""
from . import hf

__all__ = ["hf"]
