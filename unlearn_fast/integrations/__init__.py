"""Drop-in integrations with other training stacks (Hugging Face transformers)."""
