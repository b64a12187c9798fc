"""Stop unlearning at a matched forget level (SPEC §2: methods are compared at the same forget level).

Methods forget at different speeds: after a fixed number of steps one method
sits at forget accuracy 0.08 and another at 0.22, and their relearning
figures then compare two different starting points. ``ForgetLevelStop`` is
checked after each optimizer step and says stop once the model's mean
answer probability (or exact-match accuracy) on a probe of forget questions
is at or below a common target, so every method is attacked from the same
forget level; the step it stopped at is recorded.
"""
from __future__ import annotations

from .metrics import answer_accuracy

METRICS = ("prob", "acc")


class ForgetLevelStop:
    """``stop(model, step) -> bool``: True once ``metric`` on ``probe`` is <= ``target`` (checked every
    ``every`` steps; the model is put back in the training mode it was in)."""

    def __init__(self, probe, target: float, *, metric: str = "prob", every: int = 1, pad_token_id: int = 0):
        if not probe:
            raise ValueError("probe must hold at least one encoded forget question")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target <= 1.0:
            raise ValueError(f"target must be a number in [0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.probe, self.target, self.metric, self.every = list(probe), float(target), metric, every
        self.pad_token_id = pad_token_id
        self.history: list[tuple[int, float]] = []  # (step, metric) at each check
        self.stopped_at: int | None = None

    def __call__(self, model, step: int) -> bool:
        """``step``: the number of optimizer steps taken so far (1 after the first)."""
        if self.stopped_at is not None:
            return True
        if step % self.every:
            return False
        value = answer_accuracy(model, self.probe, pad_token_id=self.pad_token_id)[self.metric]
        self.history.append((step, value))
        if value <= self.target:
            self.stopped_at = step
            return True
        return False
