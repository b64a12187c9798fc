"""Statistics over seeds (SPEC §2): a mean with its 95% Student-t interval, and paired differences.

Every figure of a multi-seed run is a mean over seeds with a t interval; a
method is compared with its base by the per-seed paired difference (the same
seed means the same corpus split, taught model and attack randomness, so the
pairing removes most of the between-seed variance), with its t interval, a
paired t-test p-value and an exact sign-flip permutation p-value (which needs
no normality and is the honest one for n = 5).

No scipy at run time: the t distribution is computed here from the regularised
incomplete beta function (continued fraction, Lentz's method); the tests check
it against scipy.

Edge cases (no NaN, ever):
- n = 0: mean None, interval None, p None.
- n = 1: the mean is the value; the interval and p-values are None (undefined
  with one seed).
- zero spread (every value, or every paired difference, equal): the interval
  is [mean, mean]; the t-test p is 1.0 when the difference is 0 and 0.0
  otherwise (the t statistic is infinite); the permutation p stays finite
  (1.0, or 2 / 2^n for a constant non-zero difference).
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import asdict, dataclass

__all__ = ["Summary", "Paired", "t_cdf", "t_quantile", "summarize", "paired_difference", "sign_flip_p"]


# ---------------------------------------------------------------- the t distribution
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on t_cdf to 1e-12: plenty for an interval)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------- summaries
@dataclass
class Summary:
    """Mean over seeds with its two-sided t interval; ``per_seed`` keeps the values (None where missing)."""
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    per_seed: list
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Paired:
    """a − b over the seeds both have: mean difference, its t interval, paired t-test and sign-flip p-values."""
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p: float | None
    p_permutation: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def _numbers(name: str, values) -> list:
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}[{i}] must be a number or None, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] is not finite ({v!r}); a run with a non-finite metric has failed")
        out.append(float(v))
    return out


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    # values that are all equal can leave a rounding-level sd: call it zero
    if sd <= 1e-12 * max(1.0, max(abs(x) for x in xs)):
        sd = 0.0
    return mean, sd


def _interval(xs: list[float], level: float) -> tuple[float | None, float | None, float | None, float]:
    """(mean, low, high, sd) of the t interval; low/high None when n < 2."""
    if not xs:
        return None, None, None, 0.0
    mean, sd = _mean_sd(xs)
    if len(xs) < 2:
        return mean, None, None, sd
    half = t_quantile(0.5 + level / 2.0, len(xs) - 1) * sd / math.sqrt(len(xs))
    return mean, mean - half, mean + half, sd


def summarize(values, *, level: float = 0.95) -> Summary:
    """Mean and ``level`` t interval of per-seed values (None entries are skipped, and kept in per_seed)."""
    _check_level(level)
    per_seed = _numbers("values", values)
    xs = [v for v in per_seed if v is not None]
    mean, low, high, _ = _interval(xs, level)
    return Summary(mean, low, high, per_seed, len(xs))


def sign_flip_p(diffs, *, exact_up_to: int = 16, samples: int = 20000, seed: int = 0) -> float | None:
    """Two-sided sign-flip permutation p-value of the mean of paired differences being 0.

    Under the null each difference is as likely negative as positive; p is the fraction of the 2^n sign
    assignments whose |sum| is at least the observed one (the observed counts, so p >= 2 / 2^n). Exact for
    n <= ``exact_up_to``, else a seeded Monte Carlo estimate (counting the observed assignment).
    """
    d = [v for v in _numbers("diffs", diffs) if v is not None]
    if not d:
        return None
    observed = abs(math.fsum(d))
    tol = 1e-12 * max(1.0, math.fsum(abs(v) for v in d))
    if len(d) <= exact_up_to:
        hits = sum(abs(math.fsum(s * v for s, v in zip(signs, d))) >= observed - tol
                   for signs in itertools.product((1.0, -1.0), repeat=len(d)))
        return hits / 2 ** len(d)
    rng = random.Random(seed)
    hits = 1 + sum(abs(math.fsum(v if rng.random() < 0.5 else -v for v in d)) >= observed - tol
                   for _ in range(samples))
    return hits / (samples + 1)


def paired_difference(a, b, *, level: float = 0.95) -> Paired:
    """Per-seed ``a[i] − b[i]`` (seeds where either is None are dropped): mean, t interval, paired t-test p
    (two-sided), sign-flip permutation p."""
    _check_level(level)
    a, b = _numbers("a", a), _numbers("b", b)
    if len(a) != len(b):
        raise ValueError(f"a and b must have one value per seed each, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    mean, low, high, sd = _interval(d, level)
    if len(d) < 2:
        return Paired(mean, low, high, None, None, len(d))
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(len(d)))
        p = min(1.0, 2.0 * t_cdf(-abs(t), len(d) - 1))
    return Paired(mean, low, high, p, sign_flip_p(d), len(d))
