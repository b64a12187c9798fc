"""The one parser of method strings: ``BASE[+sam][+ilu]`` with BASE one of ga, graddiff, npo, simnpo, rmu
(``_`` separates too: ``npo_sam_ilu`` as bench/e2e.py spells its variants). Used by the recipes and bench/."""
from __future__ import annotations

from typing import NamedTuple

BASES = ("ga", "graddiff", "npo", "simnpo", "rmu")
EXTRAS = ("sam", "ilu")


class Method(NamedTuple):
    base: str
    sam: bool
    ilu: bool

    @property
    def name(self) -> str:
        return "+".join([self.base] + [e for e, on in (("sam", self.sam), ("ilu", self.ilu)) if on])


def parse_method(text: str) -> Method:
    """'npo+sam+ilu' (or 'npo_sam_ilu') -> Method('npo', sam=True, ilu=True); ValueError naming what is allowed."""
    if not isinstance(text, str):
        raise TypeError(f"method must be a string such as 'npo+sam+ilu', got {type(text).__name__}")
    parts = text.strip().replace("_", "+").split("+")
    base, extras = parts[0], parts[1:]
    if base not in BASES or any(e not in EXTRAS for e in extras) or len(set(extras)) != len(extras) \
            or (base == "rmu" and "sam" in extras):
        raise ValueError(f"unknown method {text!r}: expected BASE[+sam][+ilu] with BASE one of {', '.join(BASES)} "
                         "(rmu takes +ilu only)")
    return Method(base, "sam" in extras, "ilu" in extras)


def objective_settings(method: Method, *, sam_rho: float, irm_weight: float) -> dict:
    """The UnlearnConfig keys the +sam / +ilu parts switch on (the base's own settings are the caller's)."""
    settings = {"method": method.base}
    if method.sam:
        settings["sam_rho"] = sam_rho
    if method.ilu:
        settings.update(irm="logit", irm_weight=irm_weight)
    return settings
