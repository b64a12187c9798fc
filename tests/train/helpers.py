"""A deterministic tiny setup for the trainer tests: the package's char-level tokenizer, QA records, a tiny Llama."""
from __future__ import annotations

import torch

from unlearn_fast.data.tokenizer import CharTokenizer
from unlearn_fast.testing.tiny import tiny_llama


def records(kind: str, n: int = 12):
    names = ["ada", "bob", "cyd", "dee", "eve", "fay", "gus", "hal", "ivy", "jon", "kit", "lou", "max", "ned"]
    if kind == "forget":
        return [{"question": f"who is {names[i % 14]}?", "answer": f"a{i}"} for i in range(n)]
    if kind == "retain":
        return [{"question": f"where is {names[i % 14]}?", "answer": f"b{i}"} for i in range(n)]
    return [{"text": f"{i} plus {i + 1} is {2 * i + 1}"} for i in range(n)]


def setup(config, seed=0):
    from unlearn_fast.train import tokenize_records

    tok = CharTokenizer()
    model = tiny_llama(seed=seed, layers=2, hidden=32, vocab=tok.vocab_size)
    data = {k: tokenize_records(records(k), tok, max_length=config.max_length) for k in ("forget", "retain", "env")}
    return model, tok, data


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def equal_length_examples(seed, n, length=12, prompt=3, vocab=97):
    """Examples of one length (per-process batch means then average to the global mean exactly)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels, "index": i})
    return out
