"""WA (SPEC §1.4): a uniform running mean of the weights every k steps from a start step."""
from __future__ import annotations

import torch
from torch import nn


class WeightAverager:
    """Uniform running mean (fp32) of the trainable weights, updated every ``every`` steps from ``start``.

    ``update(step)`` after each optimizer step; ``copy_to(model)`` writes the average
    into the weights (the average is the final model).
    """

    def __init__(self, model: nn.Module, *, start: int = 100, every: int = 5):
        if start < 0 or every < 1:
            raise ValueError(f"WeightAverager needs start >= 0 and every >= 1, got start={start}, every={every}")
        self.start, self.every = start, every
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.average: dict[str, torch.Tensor] = {}
        self.count = 0

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.every == 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        if not self.due(step):
            return False
        params = dict(model.named_parameters())
        self.count += 1
        for name in self.names:
            value = params[name].detach().float()
            if name not in self.average:
                self.average[name] = value.clone()
            else:
                self.average[name].add_(value - self.average[name], alpha=1.0 / self.count)
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        if not self.count:
            raise RuntimeError("WeightAverager has no average yet (no update at a due step)")
        params = dict(model.named_parameters())
        for name, avg in self.average.items():
            params[name].copy_(avg.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"start": self.start, "every": self.every, "count": self.count, "average": self.average}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.every, self.count = state["start"], state["every"], state["count"]
        self.average = {k: v.clone() for k, v in state["average"].items()}
