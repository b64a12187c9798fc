"""The package's tokenizers, built in code (no downloads): ``WordTokenizer`` and ``CharTokenizer``.

WordTokenizer: a word-level tokenizer built from a list of texts.

Tokens are words, numbers and punctuation marks (whitespace separates, and
is dropped). Ids 0-3 are <pad>, <bos>, <eos>, <unk>; the vocabulary is the
sorted set of the texts' tokens, so the same texts give the same ids. It has
the few methods of a Hugging Face tokenizer that the trainer's data code
uses (``encode``, ``decode``, the special ids, ``save_pretrained``).
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path

FILE_NAME = "unlearn_fast_tokenizer.json"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_TOKEN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")  # digits one by one: numbers compose from 10 tokens


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text)


class WordTokenizer:
    pad_token_id, bos_token_id, eos_token_id, unk_token_id = 0, 1, 2, 3
    pad_token, bos_token, eos_token, unk_token = SPECIALS

    def __init__(self, vocab: list[str]):
        if vocab[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"vocab must start with the special tokens {SPECIALS}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        self.vocab = list(vocab)
        self.ids = {tok: i for i, tok in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts) -> "WordTokenizer":
        words = sorted({w for text in texts for w in split_words(text)})
        return cls(SPECIALS + words)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.ids.get(w, self.unk_token_id) for w in self.split(text)]
        return [self.bos_token_id] + ids + [self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        words = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i < len(SPECIALS):
                continue
            words.append(self.vocab[i] if 0 <= i < len(self.vocab) else SPECIALS[3])
        return self.join(words)

    def split(self, text: str) -> list[str]:
        return split_words(text)

    def join(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save_pretrained(self, directory) -> None:
        self._write(directory, FILE_NAME, {"vocab": self.vocab})

    @staticmethod
    def _write(directory, name: str, content: dict) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content))

    @classmethod
    def from_pretrained(cls, directory) -> "WordTokenizer":
        path = Path(directory) / FILE_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {FILE_NAME} in {directory}")
        return cls(json.loads(path.read_text())["vocab"])


class CharTokenizer(WordTokenizer):
    """A deterministic character-level tokenizer: the same specials (ids 0-3), then one id per printable
    ASCII character; texts are split into characters and decoded without separators."""

    chars = string.ascii_letters + string.digits + string.punctuation + " "

    def __init__(self):
        super().__init__(SPECIALS + list(self.chars))

    def split(self, text: str) -> list[str]:
        return list(text)

    def join(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def save_pretrained(self, directory) -> None:
        self._write(directory, "char_tokenizer.json", {"kind": "unlearn_fast.CharTokenizer", "chars": self.chars})
