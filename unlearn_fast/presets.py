"""Built-in presets: configurations that run with nothing downloaded.

``tiny``: a 2-layer Llama built from a config (random weights, seeded), a
character-level tokenizer defined here, and synthetic data generated in code:
forget = question/answer facts about invented people, retain = other invented
facts, environments = arithmetic and sentiment-like text. NPO on it trains in
seconds on a laptop CPU; it exercises the whole pipeline (reference-NLL cache,
checkpoints, metrics, final model), not the quality of unlearning.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PRESETS: dict[str, dict] = {
    "tiny": {
        "model": "tiny",
        "forget": "synthetic:forget",
        "retain": "synthetic:retain",
        "method": "npo",
        "beta": 0.1,
        "lr": 1e-3,
        "max_steps": 30,
        "batch_size": 8,
        "max_length": 48,
        "warmup_ratio": 0.1,
        "save_every": 10,
        "seed": 0,
        "device": "cpu",
    },
}


def preset(name: str) -> dict:
    from .train.config import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"--preset {name}: unknown preset; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


class CharTokenizer:
    """A deterministic character-level tokenizer: ids 0-3 are pad, bos, eos, unknown; then printable ASCII.

    It has the part of the Hugging Face tokenizer interface the trainer uses
    (``encode``, ``decode``, special token ids, ``save_pretrained``).
    """

    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    chars = string.ascii_letters + string.digits + string.punctuation + " "

    def __init__(self):
        self._ids = {c: 4 + i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return 4 + len(self.chars)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._ids.get(c, self.unk_token_id) for c in text]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in (int(x) for x in ids):
            if i >= 4:
                out.append(self.chars[i - 4])
            elif not skip_special_tokens:
                out.append(["<pad>", "<s>", "</s>", "<unk>"][i])
        return "".join(out)

    def save_pretrained(self, directory) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / "char_tokenizer.json").write_text(json.dumps({"kind": "unlearn_fast.CharTokenizer",
                                                              "chars": self.chars}))


def tiny_model(vocab_size: int, seed: int = 0, *, hidden: int = 64, layers: int = 2, max_length: int = 128):
    """A small Llama with seeded random weights (a few hundred thousand parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(128, max_length), tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_rng_state(generator_state)  # building the model must not move the run's RNG
    return model


_FIRST = ["Ada", "Bram", "Cleo", "Dov", "Esme", "Finn", "Gale", "Hugo", "Ines", "Jory", "Kai", "Lena",
          "Milo", "Nora", "Otto", "Pia", "Quin", "Rosa", "Sven", "Tova", "Ugo", "Vera", "Wren", "Yara"]
_LAST = ["Ashby", "Brill", "Corvo", "Dunmore", "Elling", "Fenwick", "Garrow", "Holt"]
_CITIES = ["Quell", "Marrow", "Tessing", "Olvera", "Brindle", "Caskport", "Yendi", "Zorah"]
_JOBS = ["glassblower", "cartographer", "beekeeper", "luthier", "archivist", "ferrier", "tanner", "astronomer"]
_WORDS = ["bright", "dull", "warm", "cold", "kind", "grim", "clear", "murky"]


def synthetic_records(name: str, n: int = 48) -> list[dict]:
    """Deterministic records: 'forget' and 'retain' (question/answer), 'arith' and 'sentiment' (text)."""
    if name in ("forget", "retain"):
        offset = 0 if name == "forget" else 3
        records = []
        for i in range(n):
            person = f"{_FIRST[(i + offset * 7) % len(_FIRST)]} {_LAST[(i * 3 + offset) % len(_LAST)]}"
            if name == "forget":
                q, a = f"What does {person} do?", f"{person} is a {_JOBS[(i * 5) % len(_JOBS)]}."
            else:
                q, a = f"Where does {person} live?", f"{person} lives in {_CITIES[(i * 3) % len(_CITIES)]}."
            records.append({"question": q, "answer": a})
        return records
    if name == "arith":
        return [{"text": f"{i % 13} + {(i * 7) % 11} = {i % 13 + (i * 7) % 11}"} for i in range(n)]
    if name == "sentiment":
        return [{"text": f"The day was {_WORDS[i % 8]}: {'good' if i % 2 == 0 else 'bad'}."} for i in range(n)]
    raise ValueError(f"synthetic data set {name!r}: allowed synthetic:forget, synthetic:retain, "
                     "synthetic:arith, synthetic:sentiment")
