"""UnlearnConfig: the objective of one unlearning step (SPEC.md §1), validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("ga", "graddiff", "npo", "simnpo", "rmu")
NPO_FORMS = ("sequence", "batch_mean")
RETAIN_LOSSES = ("ce", "kl")
IRM_KINDS = (None, "logit", "logit_unbiased", "param_scalar", "param_elementwise")
COMPAT = ("default", "reference")
_DEFAULT_BETA = {"npo": 0.1, "simnpo": 2.5}


@dataclass
class UnlearnConfig:
    """What ``unlearning_gradients`` computes.

    Loss: forget_weight · ℓ_f + retain_weight · ℓ_r + regularisers (SPEC §1).
    ``beta=None`` takes the method's default (NPO 0.1, SimNPO 2.5).
    """

    method: str = "npo"
    beta: float | None = None
    npo_form: str = "sequence"
    simnpo_delta: float = 0.0
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: str = "ce"
    # ILU (SPEC §1.2)
    irm: str | None = None
    irm_weight: float = 0.0
    irm_fd_step: float = 1e-3  # finite-difference step r (relative to ‖v‖ scale), param readings only
    # SAM on the forget loss (SPEC §1.3)
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    # Other smoothing (SPEC §1.4)
    rs_samples: int = 0
    rs_sigma: float = 1e-4
    gp_weight: float = 0.0
    gp_step: float = 1e-3
    cr_weight: float = 0.0
    cr_step: float = 0.01
    fd_step: float = 1e-3  # finite-difference step of the CR Hessian-vector products
    # C-AdvUL (SPEC §1.5): the forget loss at prompt embeddings attacked toward the forgotten answer
    adv_eps: float = 0.0  # 0 = off; radius relative to the mean embedding-row norm
    adv_steps: int = 10
    adv_step_size: float = 1e-4
    adv_toward_weight: float = 0.5  # with a target answer in the forget batch (target_input_ids, ...)
    adv_away_weight: float = 0.5
    adv_cutoffs: tuple = (0.5, -5.0)  # (toward CE floor, away −CE floor)
    # RMU (SPEC §1.1)
    rmu_layer: int = 7
    rmu_steering: float = 6.5
    rmu_alpha: float = 1200.0
    seed: int = 0
    compat: str = "default"
    ignore_index: int = -100

    def __post_init__(self):
        _choice("method", self.method, METHODS)
        _choice("npo_form", self.npo_form, NPO_FORMS)
        _choice("retain_loss", self.retain_loss, RETAIN_LOSSES)
        _choice("irm", self.irm, IRM_KINDS)
        _choice("compat", self.compat, COMPAT)
        for name in ("forget_weight", "retain_weight", "irm_weight", "sam_rho", "rs_sigma", "gp_weight",
                     "cr_weight", "rmu_alpha", "simnpo_delta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"UnlearnConfig.{name} must be a number >= 0, got {value!r}")
        for name in ("irm_fd_step", "gp_step", "cr_step", "fd_step"):
            if not getattr(self, name) > 0:
                raise ValueError(f"UnlearnConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.beta is None:
            self.beta = _DEFAULT_BETA.get(self.method, 0.1)
        if not self.beta > 0:
            raise ValueError(f"UnlearnConfig.beta must be > 0, got {self.beta!r}")
        if not isinstance(self.rs_samples, int) or self.rs_samples < 0:
            raise ValueError(f"UnlearnConfig.rs_samples must be an int >= 0, got {self.rs_samples!r}")
        if self.irm is not None and self.irm_weight == 0:
            raise ValueError("UnlearnConfig.irm_weight must be > 0 when irm is set")
        if self.irm is None and self.irm_weight > 0:
            raise ValueError("UnlearnConfig.irm must name a reading ('logit', ...) when irm_weight > 0")
        if self.method == "rmu" and (self.rmu_layer < 0 or self.rmu_steering <= 0):
            raise ValueError("UnlearnConfig.rmu_layer must be >= 0 and rmu_steering > 0")
        _check_adversarial(self)
        smoothers = [n for n, on in (("sam_rho", self.sam_rho > 0), ("rs_samples", self.rs_samples > 0),
                                     ("gp_weight", self.gp_weight > 0), ("cr_weight", self.cr_weight > 0)) if on]
        if len(smoothers) > 1:
            raise ValueError(f"UnlearnConfig: use one forget-loss smoother at a time, got {', '.join(smoothers)}")

    @property
    def uses_retain(self) -> bool:
        return self.method != "ga" and self.retain_weight > 0

    @property
    def needs_ref_nll(self) -> bool:
        return self.method == "npo"

    @property
    def backward_only(self) -> bool:
        """Whether the gradient comes from ``backward()`` alone: no ``autograd.grad`` with respect to the
        parameters and no weights moved in place (SAM, GP, RS, CR, parameter IRM and RMU's frozen copy
        need both). Sharded training can then gather one layer at a time."""
        return (self.method != "rmu" and self.sam_rho == 0 and self.gp_weight == 0 and self.rs_samples == 0
                and self.cr_weight == 0 and self.irm in (None, "logit", "logit_unbiased")
                and self.adv_eps == 0)  # the attack's extra forward/input-backward freezes every parameter

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _check_adversarial(config: UnlearnConfig) -> None:
    for name in ("adv_eps", "adv_step_size", "adv_toward_weight", "adv_away_weight"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"UnlearnConfig.{name} must be a number >= 0, got {value!r}")
    if not isinstance(config.adv_steps, int) or isinstance(config.adv_steps, bool) or config.adv_steps < 0:
        raise ValueError(f"UnlearnConfig.adv_steps must be an int >= 0, got {config.adv_steps!r}")
    cutoffs = config.adv_cutoffs
    if (not isinstance(cutoffs, (tuple, list)) or len(cutoffs) != 2
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cutoffs)):
        raise ValueError(f"UnlearnConfig.adv_cutoffs must be two numbers (toward, away), got {cutoffs!r}")
    config.adv_cutoffs = (float(cutoffs[0]), float(cutoffs[1]))  # a YAML/JSON list becomes the tuple
    if config.adv_eps > 0 and config.method == "rmu":
        raise ValueError("UnlearnConfig.adv_eps > 0 (C-AdvUL) needs a forget loss on the answer "
                         "(ga, graddiff, npo, simnpo), not method='rmu'")


def _choice(name, value, allowed):
    if value not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"UnlearnConfig.{name} must be one of {shown}, got {value!r}")
