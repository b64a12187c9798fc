"""Forget/retain answer accuracy, answer-token probability, held-out perplexity, and MUSE-style scores.

Answer accuracy is greedy exact match: the answer counts as known when greedy
decoding after the question produces exactly its tokens. It is computed with
one teacher-forced forward pass: greedy decoding reproduces the answer if and
only if, at every answer position, the arg-max of the next-token logits given
the true prefix is the true token (by induction over the positions). Ties in
the arg-max are broken as ``torch.argmax`` does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..data.collate import collate


def encode_qa(records, tokenizer, *, eos: bool = True, max_length: int = 256) -> list[dict]:
    """QA records -> examples: ``input_ids`` = [bos] question answer [eos], ``labels`` -100 except on the answer.

    With ``eos=False`` (the metrics) the answer's tokens alone are scored.
    """
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    end = [tokenizer.eos_token_id] if eos and getattr(tokenizer, "eos_token_id", None) is not None else []
    out = []
    for i, rec in enumerate(records):
        prompt = bos + tokenizer.encode(str(rec["question"]), add_special_tokens=False)
        answer = tokenizer.encode(" " + str(rec["answer"]).strip(), add_special_tokens=False) + end
        if not answer:
            raise ValueError(f"record {i} has an empty answer: {rec!r}")
        ids = (prompt + answer)[-max_length:]
        labels = ([-100] * len(prompt) + answer)[-max_length:]
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
    return out


def encode_text(records, tokenizer, *, max_length: int = 256) -> list[dict]:
    """Text records -> examples learned whole (every token after the first is a label)."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    eos = [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []
    out = []
    for rec in records:
        ids = (bos + tokenizer.encode(str(rec["text"]), add_special_tokens=False) + eos)[:max_length]
        out.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)})
    return out


def _device(model: nn.Module):
    return next(model.parameters()).device


def _logits(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def answer_scores(model: nn.Module, examples, *, batch_size: int = 32, pad_token_id: int = 0) -> dict:
    """Per-example greedy exact match and mean answer-token probability.

    Returns {"correct": [bool], "prob": [float]} in the order of ``examples``.
    """
    was_training = model.training
    model.eval()
    correct, prob = [], []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id, _device(model))
            logits = _logits(model, batch)[:, :-1].float()
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            safe = labels.clamp(min=0)
            hit = (logits.argmax(-1) == safe) | ~scored
            p = torch.softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * scored
            correct += hit.all(dim=1).tolist()
            prob += (p.sum(1) / scored.sum(1).clamp(min=1)).tolist()
    finally:
        model.train(was_training)
    return {"correct": correct, "prob": prob}


def answer_accuracy(model: nn.Module, examples, **kw) -> dict:
    """{"acc": fraction answered exactly, "prob": mean over examples of the mean answer-token probability}."""
    if not examples:
        raise ValueError("answer_accuracy needs at least one example")
    s = answer_scores(model, examples, **kw)
    return {"acc": sum(s["correct"]) / len(s["correct"]), "prob": sum(s["prob"]) / len(s["prob"])}


@torch.no_grad()
def perplexity(model: nn.Module, examples, *, batch_size: int = 32, pad_token_id: int = 0) -> float:
    """exp(total NLL / total label tokens) over ``examples`` (next-token prediction of every label)."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_token_id, _device(model))
            logits = _logits(model, batch)[:, :-1].float()
            labels = batch["labels"][:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity needs at least one label token")
    return math.exp(nll / count)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """Greedy continuation of one prompt (no cache: the prompts here are short)."""
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    try:
        for _ in range(max_new_tokens):
            x = torch.tensor([ids], device=_device(model))
            nxt = int(_logits(model, {"input_ids": x, "attention_mask": torch.ones_like(x)})[0, -1].argmax())
            ids.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
    finally:
        model.train(was_training)
    return ids[len(prompt_ids):]


def lcs_length(a, b) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a)·len(b)) dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate, reference) -> float:
    """ROUGE-L F1 between two token sequences (or strings, split on whitespace)."""
    if isinstance(candidate, str):
        candidate = candidate.split()
    if isinstance(reference, str):
        reference = reference.split()
    if not candidate or not reference:
        return 0.0
    lcs = lcs_length(candidate, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def knowmem(model, tokenizer, records, **kw) -> float:
    """MUSE KnowMem in QA form: greedy exact-match accuracy on {"question", "answer"} records."""
    return answer_accuracy(model, encode_qa(records, tokenizer, eos=False), **kw)["acc"]


def verbmem(model, tokenizer, records, *, max_new_tokens: int = 64) -> float:
    """MUSE VerbMem: mean ROUGE-L F1 of the greedy continuation of ``prompt`` against ``continuation``."""
    scores = []
    for i, rec in enumerate(records):
        if "prompt" not in rec or "continuation" not in rec:
            raise ValueError(f"verbmem record {i} needs 'prompt' and 'continuation', got keys {sorted(rec)}")
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        prompt = bos + tokenizer.encode(str(rec["prompt"]), add_special_tokens=False)
        reference = tokenizer.encode(" " + str(rec["continuation"]), add_special_tokens=False)
        generated = greedy_generate(model, prompt, min(max_new_tokens, max(1, len(reference))))
        scores.append(rouge_l(generated, reference))
    if not scores:
        raise ValueError("verbmem needs at least one record")
    return sum(scores) / len(scores)
