"""Data for the trainer: records → tokenized examples → deterministic, resumable batch streams.

Records are dicts with ``text``, or ``question`` and ``answer`` (keys configurable).
A QA record is tokenized as prompt + answer with the prompt masked (-100) in
``labels``; a text record is learned whole. Sources:
  path/to/file.jsonl      JSON lines
  hf:NAME[:SPLIT]         a Hugging Face ``datasets`` dataset (local cache; needs ``datasets``)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .collate import collate


def read_records(source: str) -> list[dict]:
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as exc:
            raise ImportError("hf: data sources need the 'datasets' package (pip install datasets)") from exc
        name, _, split = source[3:].partition(":")
        return [dict(r) for r in datasets.load_dataset(name, split=split or "train")]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} not found")
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{source}:{lineno}: not valid JSON ({exc.msg})") from None
    return records


def tokenize_records(records, tokenizer, *, max_length: int, text_key="text", question_key="question",
                     answer_key="answer") -> list[dict]:
    """Examples with 1-D ``input_ids`` and ``labels`` (prompt tokens -100), truncated to ``max_length``."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    examples = []
    for i, rec in enumerate(records):
        if question_key in rec and answer_key in rec:
            prompt = bos + tokenizer.encode(str(rec[question_key]), add_special_tokens=False)
            answer = tokenizer.encode(" " + str(rec[answer_key]).strip(), add_special_tokens=False) + eos
            ids, labels = prompt + answer, [-100] * len(prompt) + answer
        elif text_key in rec:
            ids = bos + tokenizer.encode(str(rec[text_key]), add_special_tokens=False) + eos
            labels = list(ids)
        else:
            raise ValueError(f"record {i} has neither {text_key!r} nor {question_key!r}/{answer_key!r}: {rec!r}")
        ids, labels = ids[:max_length], labels[:max_length]
        examples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "index": i})
    return examples


class BatchStream:
    """Endless batches over examples, reshuffled each epoch from (seed, epoch); resumable from its state.

    With ``world`` processes every process draws the same global batch of
    batch_size × world examples and keeps its own slice, so a multi-process run
    sees the batches of a one-process run with the global batch size.
    """

    def __init__(self, examples: list[dict], batch_size: int, seed: int, pad_token_id: int = 0,
                 rank: int = 0, world: int = 1):
        if not examples:
            raise ValueError("a data stream needs at least one example")
        self.examples, self.batch_size, self.seed, self.pad = examples, batch_size * world, seed, pad_token_id
        self.rank, self.local = rank, batch_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_indices(self) -> list[int]:
        """The positions in ``examples`` of the next global batch (advances the stream)."""
        picked = []
        while len(picked) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self._order[self.position])
            self.position += 1
        return picked

    def next_examples(self) -> list[dict]:
        return [self.examples[i] for i in self.next_indices()]

    def next_batch(self, device=None, extra: dict | None = None) -> dict:
        indices = self.next_indices()[self.rank * self.local:(self.rank + 1) * self.local]
        batch = collate([self.examples[i] for i in indices], self.pad, device)
        for key, values in (extra or {}).items():  # per-example values (e.g. ref_nll), by position in examples
            batch[key] = torch.stack([values[i] for i in indices]).to(device)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


class MixedStream:
    """Batches that take a fixed number of examples from each of several sources (each its own
    ``BatchStream``), e.g. teaching: 48 facts + 8 sentences + 12 task records per batch."""

    def __init__(self, parts, seed: int, pad_token_id: int = 0):
        self.streams = [BatchStream(examples, count, seed + i, pad_token_id) for i, (examples, count) in enumerate(parts)]
        self.pad = pad_token_id
        self.examples = [ex for s in self.streams for ex in s.examples]

    def next_batch(self, device=None, extra: dict | None = None) -> dict:
        if extra:
            raise ValueError("MixedStream: per-example extras (ref_nll) need a single BatchStream")
        return collate([ex for s in self.streams for ex in s.next_examples()], self.pad, device)

    def state_dict(self) -> dict:
        return {"parts": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        for s, part in zip(self.streams, state["parts"]):
            s.load_state_dict(part)
