"""The three attacks of SPEC §2 on an unlearned model. Each works on a copy: the model passed in never changes.

Relearning and fine-tuning train through the Trainer (the package's one loop), in memory.

- relearning: fine-tune on k forget samples for a few steps, measure the forget
  accuracy on the other forget questions (knowledge that comes back without
  being shown);
- downstream fine-tuning on an unrelated task: forget accuracy at the
  first-quartile, median and final checkpoints (their mean is the robustness
  score) and the task accuracy;
- quantization: round-to-nearest, group-wise, symmetric absmax weights at 8
  and 4 bits.
"""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace
from dataclasses import dataclass

import torch
from torch import nn

from ..train.config import TrainConfig
from ..train.trainer import Trainer
from .metrics import answer_accuracy


# ---------------------------------------------------------------- quantization
def quantize_tensor(weight: torch.Tensor, bits: int, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise quantization of a 2-D weight along its last dimension.

    Each group of ``group_size`` consecutive entries of a row gets the scale
    absmax / (2^(bits−1) − 1) and its entries become scale · round(w / scale),
    so |w − q(w)| <= scale / 2. Returns (dequantized weight, scales [rows, groups]).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    w = weight.detach().float()
    pad = (-cols) % group_size
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    groups = w.reshape(rows, -1, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = torch.clamp(torch.round(groups / safe), -qmax, qmax) * scale
    return q.reshape(rows, -1)[:, :cols].to(weight.dtype), scale.squeeze(-1)


@torch.no_grad()
def quantize_model_(model: nn.Module, bits: int, group_size: int = 32) -> int:
    """Quantize every 2-D weight in place (linear layers, embeddings, head); returns how many tensors."""
    done = 0
    seen = set()
    for p in model.parameters():
        if p.dim() == 2 and p.is_floating_point() and id(p) not in seen:
            seen.add(id(p))
            p.copy_(quantize_tensor(p, bits, group_size)[0])
            done += 1
    return done


def quantized_copy(model: nn.Module, bits: int, group_size: int = 32) -> nn.Module:
    clone = copy.deepcopy(model)
    quantize_model_(clone, bits, group_size)
    return clone


# ---------------------------------------------------------------- fine-tuning
def finetune(model: nn.Module, examples, *, steps: int, lr: float, batch_size: int, seed: int = 0,
             pad_token_id: int = 0, callback=None, callback_steps=()) -> nn.Module:
    """Fine-tune ``model`` in place on ``examples`` (label tokens) with the Trainer (task "finetune",
    in memory: constant lr, no warm-up, clip 1); ``callback(step)`` at the given steps (model in eval mode)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not examples:
        raise ValueError("fine-tuning needs at least one example")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    if 0 in callback_steps and callback:
        callback(0)
    if steps == 0:
        return model
    config = TrainConfig(task="finetune", lr=lr, max_steps=steps, batch_size=min(batch_size, len(examples)),
                         warmup_ratio=0.0, schedule="constant", weight_decay=0.0, clip=1.0, seed=seed,
                         save_every=steps)

    def on_step(step, _metrics):
        if callback and step in callback_steps:
            callback(step)

    padding = SimpleNamespace(pad_token_id=pad_token_id)  # all the Trainer reads of a tokenizer here
    Trainer(model, padding, config, data=list(examples), output_dir=None, progress=False, on_step=on_step).train()
    return model


@dataclass
class RelearnSpec:
    """SPEC §2 protocol (20–60 samples, batch 4, ~15 steps); the learning rate is scaled to the model."""
    samples: int = 20
    steps: int = 15
    lr: float = 1e-3
    batch_size: int = 4
    eval_every: int = 3
    draws: int = 1  # attacker draws averaged by ``relearn_over_draws`` (split and attack seeds seed + 1000·d)


def relearn_split(n: int, samples: int, seed: int) -> tuple[list[int], list[int]]:
    """(indices shown to the attacker, indices it is scored on): disjoint, seeded."""
    if not 0 < samples < n:
        raise ValueError(f"relearning samples must be in [1, {n - 1}] for {n} forget examples, got {samples}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return sorted(idx[:samples]), sorted(idx[samples:])


def relearn_attack(model: nn.Module, forget_train, forget_probe, spec: RelearnSpec, *, seed: int = 0,
                   pad_token_id: int = 0) -> dict:
    """Fine-tune a copy on k forget samples; forget accuracy on the other forget questions along the way.

    ``forget_train`` / ``forget_probe``: the same forget records, encoded for training (with eos) and for
    scoring. Returns {"forget_acc": after the attack, "curve": [[step, acc], ...], "forget_prob": the mean
    answer probability after it, "prob_curve": [[step, prob], ...]} (the probability moves where exact match
    sits at 0 or 1).
    """
    shown, scored = relearn_split(len(forget_train), spec.samples, seed)
    probe = [forget_probe[i] for i in scored]
    curve, prob_curve = [], []
    clone = copy.deepcopy(model)
    marks = sorted(set(range(0, spec.steps + 1, max(1, spec.eval_every))) | {spec.steps})

    def score(step):
        result = answer_accuracy(clone, probe, pad_token_id=pad_token_id)
        curve.append([step, result["acc"]])
        prob_curve.append([step, result["prob"]])

    finetune(clone, [forget_train[i] for i in shown], steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
             seed=seed, pad_token_id=pad_token_id, callback_steps=marks, callback=score)
    return {"forget_acc": curve[-1][1], "curve": curve, "forget_prob": prob_curve[-1][1], "prob_curve": prob_curve,
            "samples": spec.samples, "scored": len(probe)}


def relearn_over_draws(model: nn.Module, forget_train, forget_probe, spec: RelearnSpec, *, seed: int = 0,
                       pad_token_id: int = 0) -> dict:
    """``relearn_attack`` averaged over ``spec.draws`` attacker draws (draw d: which samples are shown and the
    attack's batches seeded by ``seed + 1000·d``): one draw's figure rests on a few dozen answers, so which
    samples the attacker happens to see moves it more than the unlearning method does.

    Returns {"forget_acc", "gain" (after − before, on the same scored questions), "forget_prob", "prob_gain"
    (the same for the mean answer probability), "curve" (the mean over draws at each evaluated step), "draws":
    [each draw's relearn_attack result]}.
    """
    if not isinstance(spec.draws, int) or spec.draws < 1:
        raise ValueError(f"relearn draws must be a positive int, got {spec.draws!r}")
    draws = [relearn_attack(model, forget_train, forget_probe, spec, seed=seed + 1000 * d, pad_token_id=pad_token_id)
             for d in range(spec.draws)]
    k = len(draws)
    curve = [[step, sum(d["curve"][i][1] for d in draws) / k] for i, (step, _) in enumerate(draws[0]["curve"])]
    return {"forget_acc": sum(d["forget_acc"] for d in draws) / k,
            "gain": sum(d["forget_acc"] - d["curve"][0][1] for d in draws) / k,
            "forget_prob": sum(d["forget_prob"] for d in draws) / k,
            "prob_gain": sum(d["forget_prob"] - d["prob_curve"][0][1] for d in draws) / k,
            "curve": curve, "draws": draws, "samples": spec.samples, "scored": draws[0]["scored"]}


@dataclass
class FinetuneSpec:
    steps: int = 24
    lr: float = 1e-3
    batch_size: int = 16
    eval_every: int = 6
    # comma-separated names of the unrelated tasks fine-tuned on, one attack each ("": every task of the
    # corpus); fewer tasks for a model where one attack costs minutes (SmolLM2 on 2 CPU cores)
    tasks: str = ""

    def task_names(self, available) -> list[str]:
        """The tasks of ``available`` (names, in order) this spec fine-tunes on; ValueError for an unknown one."""
        available = list(available)
        chosen = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in chosen if t not in available]
        if unknown:
            raise ValueError(f"finetune tasks: unknown task(s) {unknown}; choose from {', '.join(available)}")
        return chosen or available


def finetune_attack(model: nn.Module, env_train, env_test, forget_probe, spec: FinetuneSpec, *, seed: int = 0,
                    pad_token_id: int = 0) -> dict:
    """Fine-tune a copy on one unrelated task; forget accuracy at Q1, median, end and the task accuracy.

    Returns {"checkpoints": {step: acc}, "robustness": mean forget acc over the three checkpoints
    (the forget accuracy the attack leaves, high = knowledge came back), "task_acc_before", "task_acc",
    "curve"}.
    """
    quartiles = sorted({max(1, round(spec.steps / 4)), max(1, round(spec.steps / 2)), spec.steps})
    marks = sorted(set(range(0, spec.steps + 1, max(1, spec.eval_every))) | set(quartiles) | {0})
    curve, probs = {}, {}
    clone = copy.deepcopy(model)
    task_before = answer_accuracy(clone, env_test, pad_token_id=pad_token_id)["acc"]

    def score(step):
        result = answer_accuracy(clone, forget_probe, pad_token_id=pad_token_id)
        curve[step], probs[step] = result["acc"], result["prob"]

    finetune(clone, env_train, steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, seed=seed,
             pad_token_id=pad_token_id, callback_steps=marks, callback=score)
    checkpoints = {s: curve[s] for s in quartiles}
    return {"checkpoints": checkpoints, "forget_acc": sum(checkpoints.values()) / len(checkpoints),
            "forget_prob": sum(probs[s] for s in quartiles) / len(quartiles),
            "task_acc_before": task_before,
            "task_acc": answer_accuracy(clone, env_test, pad_token_id=pad_token_id)["acc"],
            "curve": sorted([s, a] for s, a in curve.items())}
