"""Stop unlearning at a matched forget level (SPEC §2: methods are compared at the same forget level).

Methods forget at different speeds: after a fixed number of steps one method
sits at forget accuracy 0.08 and another at 0.22, and their relearning
figures then compare two different starting points. ``ForgetLevelStop`` is
checked after each optimizer step and says stop once the model's mean
answer probability (or exact-match accuracy) on a probe of forget questions
is at or below a common target, so every method is attacked from the same
forget level; the step it stopped at is recorded.

A check is a forward pass over the whole probe, which on the small default
model costs more than a training step. ``adaptive=True`` checks fewer steps
far from the target: after two checks it skips ahead by half the steps the
recent rate of decrease predicts are left (at most ``max_skip``), so the
checks thin out where the target is out of reach and become every-step
checks close to it. The stop is still the first *checked* step at or below
the target; a trajectory that drops faster than the recent rate can overshoot
by at most one skip.
"""
from __future__ import annotations

from .metrics import answer_accuracy

METRICS = ("prob", "acc")


class ForgetLevelStop:
    """``stop(model, step) -> bool``: True once ``metric`` on ``probe`` is <= ``target`` (checked every
    ``every`` steps; the model is put back in the training mode it was in)."""

    def __init__(self, probe, target: float, *, metric: str = "prob", every: int = 1, pad_token_id: int = 0,
                 adaptive: bool = False, max_skip: int = 10, near: float = 0.03):
        if not probe:
            raise ValueError("probe must hold at least one encoded forget question")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target <= 1.0:
            raise ValueError(f"target must be a number in [0, 1], got {target!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.probe, self.target, self.metric, self.every = list(probe), float(target), metric, every
        if isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < every:
            raise ValueError(f"max_skip must be an int >= every ({every}), got {max_skip!r}")
        self.pad_token_id, self.adaptive, self.max_skip, self.near = pad_token_id, bool(adaptive), max_skip, near
        self._next = every  # adaptive: the next step to check
        self.history: list[tuple[int, float]] = []  # (step, metric) at each check
        self.stopped_at: int | None = None

    def __call__(self, model, step: int) -> bool:
        """``step``: the number of optimizer steps taken so far (1 after the first)."""
        if self.stopped_at is not None:
            return True
        if (step < self._next) if self.adaptive else (step % self.every):
            return False
        value = answer_accuracy(model, self.probe, pad_token_id=self.pad_token_id)[self.metric]
        self.history.append((step, value))
        if value <= self.target:
            self.stopped_at = step
            return True
        self._next = step + self._skip()
        return False

    def _skip(self) -> int:
        """Steps to the next adaptive check: half the steps the average rate since the first check predicts
        are left; every ``every`` steps within ``near`` of the target."""
        (s0, v0), (s1, v1) = self.history[0], self.history[-1]
        if len(self.history) < 2 or v1 - self.target <= self.near:
            return self.every
        rate = (v0 - v1) / (s1 - s0)
        if rate <= 0:  # not decreasing: no prediction, keep the base interval
            return self.every
        return int(min(self.max_skip, max(self.every, 0.5 * (v1 - self.target) / rate)))
