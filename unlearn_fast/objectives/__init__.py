"""Objectives (layer 4 of DESIGN.md): the maths of one unlearning step, above ops/ and optim/.

``UnlearnConfig`` (config) says what to compute; losses (GA, GradDiff, NPO, SimNPO, ILU's IRM readings),
regularizers (GP, RS, CR, parameter IRM; SAM/GP/CR/FD-HVP maths come from ``optim.sam``), rmu and
reference_nll are the terms; ``unlearning_gradients`` (step) composes them into ``.grad`` for one step.
Nothing here steps an optimizer or knows the training loop.
"""
from .config import UnlearnConfig
from .reference_nll import reference_nll
from .step import unlearning_gradients

__all__ = ["UnlearnConfig", "reference_nll", "unlearning_gradients"]
