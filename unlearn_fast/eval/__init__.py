"""Evaluation (above train/): metrics of a model, the three attacks of SPEC §2 (relearning and downstream
fine-tuning run through the Trainer on a copy; quantization) and the report writer. Recipes compose them."""
