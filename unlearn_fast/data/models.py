"""The one builder of small Llama models with seeded random weights (tiny preset, default model, tests)."""
from __future__ import annotations

import torch


def build_llama(vocab_size: int, *, hidden_size: int = 64, intermediate_size: int | None = None,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                max_position_embeddings: int = 128, tie_word_embeddings: bool = False, seed: int | None = 0,
                attn_implementation: str | None = None, pad_token_id: int | None = 0):
    """A ``LlamaForCausalLM`` from a config (ids 0/1/2 = pad/bos/eos, as the package's tokenizers; the
    embedding row of ``pad_token_id`` starts at zero and gets no gradient).

    ``seed``: the weights are drawn from ``torch.manual_seed(seed)`` and the caller's RNG state is
    restored afterwards (building a model must not move a run's RNG); ``None`` draws them from the
    current global RNG and leaves it advanced.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=intermediate_size or 2 * hidden_size, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                         max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
                         pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2,
                         **({} if attn_implementation is None else {"attn_implementation": attn_implementation}))
    if seed is None:
        return LlamaForCausalLM(config)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_rng_state(state)


def tiny_model(vocab_size: int, seed: int = 0, *, hidden: int = 64, layers: int = 2, max_length: int = 128):
    """The ``tiny`` preset's model: a 2-layer Llama of a few hundred thousand parameters."""
    return build_llama(vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                       max_position_embeddings=max(128, max_length), seed=seed)
