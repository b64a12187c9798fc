"""The one parser of method strings: ``BASE[+sam][+ilu][+adv]`` with BASE one of ga, graddiff, npo, simnpo, rmu
(``_`` separates too: ``npo_sam_ilu`` as bench/e2e.py spells its variants). Used by the recipes and bench/.

``+adv`` is C-AdvUL (SPEC §1.5): the forget loss taken at embedding-space-attacked prompts."""
from __future__ import annotations

from typing import NamedTuple

BASES = ("ga", "graddiff", "npo", "simnpo", "rmu")
EXTRAS = ("sam", "ilu", "adv")


class Method(NamedTuple):
    base: str
    sam: bool
    ilu: bool
    adv: bool = False

    @property
    def name(self) -> str:
        return "+".join([self.base] + [e for e in EXTRAS if getattr(self, e)])


def parse_method(text: str) -> Method:
    """'npo+sam+adv' (or 'npo_sam_adv') -> Method('npo', sam=True, ilu=False, adv=True); ValueError naming
    what is allowed."""
    if not isinstance(text, str):
        raise TypeError(f"method must be a string such as 'npo+sam+ilu', got {type(text).__name__}")
    parts = text.strip().replace("_", "+").split("+")
    base, extras = parts[0], parts[1:]
    if base not in BASES or any(e not in EXTRAS for e in extras) or len(set(extras)) != len(extras) \
            or (base == "rmu" and ("sam" in extras or "adv" in extras)):
        raise ValueError(f"unknown method {text!r}: expected BASE[+sam][+ilu][+adv] with BASE one of "
                         f"{', '.join(BASES)} (rmu takes +ilu only: its loss is on activations, not on an answer)")
    return Method(base, "sam" in extras, "ilu" in extras, "adv" in extras)


def objective_settings(method: Method, *, sam_rho: float, irm_weight: float, adv_eps: float = 0.05,
                       adv_steps: int = 10, adv_step_size: float = 1e-4) -> dict:
    """The UnlearnConfig keys the +sam / +ilu / +adv parts switch on (the base's own settings are the caller's).

    The adv defaults are the public C-AdvUL code's (10 signed steps of 1e-4, ε = 0.05 × mean embedding norm)."""
    settings = {"method": method.base}
    if method.sam:
        settings["sam_rho"] = sam_rho
    if method.ilu:
        settings.update(irm="logit", irm_weight=irm_weight)
    if method.adv:
        settings.update(adv_eps=adv_eps, adv_steps=adv_steps, adv_step_size=adv_step_size)
    return settings
