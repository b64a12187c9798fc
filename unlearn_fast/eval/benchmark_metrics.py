"""The benchmarks' metrics as the benchmarks define them, on per-example numbers (no model in here).

Sources: TOFU (Maini et al. 2024, github.com/locuslab/tofu), MUSE (Shi et al. 2024,
github.com/swj0419/muse_bench) and their common re-implementation open-unlearning
(github.com/locuslab/open-unlearning, ``src/evals/metrics/``), whose names and conventions
are used: an answer's probability is exp(−avg_loss), avg_loss the mean token NLL of the
answer given the question; ROUGE is the ``rouge_score`` package's ROUGE-L.
"""
from __future__ import annotations

import math
import re

import numpy as np

from .metrics import lcs_length

EPS = 1e-10  # open-unlearning's guard in every ratio


# ---------------------------------------------------------------- TOFU
def truth_ratios(correct_avg_loss, wrong_avg_losses) -> np.ndarray:
    """Per-question truth ratio R = P(wrong) / P(correct) (TOFU; open-unlearning ``truth_ratio``).

    P(correct) = exp(−avg_loss of the paraphrased answer) (for real-authors / world-facts,
    of the answer); P(wrong) = exp(−mean over the K perturbed answers of their avg_loss), i.e.
    the geometric mean of the perturbed answers' length-normalised probabilities.
    R = P(wrong) / (P(correct) + 1e-10). ``wrong_avg_losses``: one list of K losses per question.
    """
    correct = np.asarray(correct_avg_loss, dtype=np.float64)
    if correct.ndim != 1 or len(wrong_avg_losses) != correct.shape[0]:
        raise ValueError(f"correct_avg_loss must be 1-D with one entry per question of wrong_avg_losses "
                         f"({len(wrong_avg_losses)}), got shape {correct.shape}")
    wrong = np.array([np.mean(np.asarray(w, dtype=np.float64)) for w in wrong_avg_losses])
    return np.exp(-wrong) / (np.exp(-correct) + EPS)


def truth_ratio_closer_to_1(ratios) -> float:
    """Forget truth ratio (open-unlearning aggregator ``closer_to_1_better``): mean of min(R, 1/R).

    1 when the true and the false answers are equally likely (nothing to tell them apart).
    """
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.minimum(r, 1 / (r + EPS))))


def truth_ratio_true_better(ratios) -> float:
    """Retain / real-authors / world-facts truth ratio (aggregator ``true_better``): mean of max(0, 1 − R)."""
    r = np.asarray(ratios, dtype=np.float64)
    return float(np.mean(np.maximum(0.0, 1 - r)))


def probability(avg_losses) -> float:
    """``*_Q_A_Prob``: mean over questions of exp(−avg_loss) of the answer."""
    return float(np.mean(np.exp(-np.asarray(avg_losses, dtype=np.float64))))


def probability_with_options(correct_avg_loss, wrong_avg_losses) -> float:
    """``*_Q_A_Prob_normalised`` (open-unlearning ``probability_w_options``): mean of P_c / (P_c + Σ_k P_k + 1e-10).

    P = exp(−avg_loss) of the answer (c) and of each perturbed answer (k).
    """
    pc = np.exp(-np.asarray(correct_avg_loss, dtype=np.float64))
    pw = np.array([np.sum(np.exp(-np.asarray(w, dtype=np.float64))) for w in wrong_avg_losses])
    return float(np.mean(pc / (pc + pw + EPS)))


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative values, 0 if any is 0 (``scipy.stats.hmean``)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or np.any(v < 0) or np.any(np.isnan(v)):
        raise ValueError(f"harmonic_mean needs a non-empty list of non-negative numbers, got {v.tolist()}")
    if np.any(v == 0):
        return 0.0
    return float(v.size / np.sum(1 / v))


MODEL_UTILITY_PARTS = ("retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio",
                       "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                       "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")


def model_utility(metrics: dict) -> float:
    """TOFU model utility: harmonic mean of the nine retain / real-authors (ra) / world-facts (wf)
    probability, ROUGE-L recall and truth-ratio (``true_better``) figures (open-unlearning
    ``model_utility``, handler ``hm_aggregate``). Parts missing from ``metrics`` (a data set
    without ra/wf) are left out of the mean."""
    present = [metrics[k] for k in MODEL_UTILITY_PARTS if metrics.get(k) is not None]
    if not present:
        raise ValueError(f"model_utility needs at least one of {MODEL_UTILITY_PARTS}")
    return harmonic_mean(present)


# ---------------------------------------------------------------- the two-sample KS test (forget quality)
def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D = sup_x |F_a(x) − F_b(x)| (ties handled as in scipy)."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_statistic needs two non-empty samples")
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / a.size
    fb = np.searchsorted(b, grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


def ks_exact_pvalue(d: float, m: int, n: int) -> float:
    """P(D ≥ d) for two samples of sizes m, n from one continuous distribution, exactly.

    Under the null every interleaving of the two sorted samples is equally likely: a lattice
    path from (0, 0) to (m, n), D the largest |i/m − j/n| on it. With g = gcd(m, n) and
    h = round(d·mn/g) (d on the lattice of attainable values, as scipy does), the path
    reaches D ≥ d iff it touches a point with |i·n − j·m| ≥ h·g. The probability of reaching
    each point without touching one before is propagated one anti-diagonal at a time (a step
    to i+1 from (i, j) has probability (m−i)/(m+n−i−j)); the mass that touches is summed, so
    tiny p-values keep their relative precision. O(m·n) time, O(min(m, n)) memory.
    """
    g = math.gcd(m, n)
    lcm = m // g * n
    h = round(d * lcm)
    if h <= 0:
        return 1.0
    bound = h * g
    reach = np.array([1.0])  # probability of (i, s − i) for i = lo..hi on anti-diagonal s
    lo, outside = 0, 0.0
    for s in range(m + n + 1):
        i = np.arange(lo, lo + reach.size)
        j = s - i
        hit = np.abs(i * n - j * m) >= bound
        outside += float(reach[hit].sum())
        reach = np.where(hit, 0.0, reach)
        if s == m + n:
            break
        left = m + n - s
        right_step = reach * (m - i) / left  # to (i+1, j)
        up_step = reach * (n - j) / left  # to (i, j+1)
        new_lo, new_hi = max(0, s + 1 - n), min(m, s + 1)
        nxt = np.zeros(new_hi - new_lo + 1)
        # (i, j) -> (i, j+1) keeps i; (i, j) -> (i+1, j) moves to i+1
        keep = (i >= new_lo) & (i <= new_hi)
        np.add.at(nxt, i[keep] - new_lo, up_step[keep])
        move = (i + 1 >= new_lo) & (i + 1 <= new_hi)
        np.add.at(nxt, i[move] + 1 - new_lo, right_step[move])
        reach, lo = nxt, new_lo
    return float(min(1.0, max(0.0, outside)))


def ks_2samp_pvalue(a, b) -> float:
    """Two-sided two-sample KS p-value, exact (= ``scipy.stats.ks_2samp(a, b, method="exact")``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return ks_exact_pvalue(ks_statistic(a, b), a.size, b.size)


def forget_quality(model_truth_ratios, retain_model_truth_ratios) -> float:
    """TOFU forget quality: the KS-test p-value between the per-question forget truth ratios of the
    unlearned model and of the model trained on the retain set only (open-unlearning ``ks_test``).
    High (→ 1) when the two distributions cannot be told apart."""
    return ks_2samp_pvalue(model_truth_ratios, retain_model_truth_ratios)


# ---------------------------------------------------------------- ROUGE-L (rouge_score's tokenisation)
def rouge_tokens(text: str, *, stemmer: bool = False) -> list[str]:
    """``rouge_score``'s default tokenisation: lower case, runs of [a-z0-9] as tokens; with ``stemmer``,
    the Porter stem of tokens longer than 3 characters (needs the rouge_score package)."""
    if stemmer:
        try:
            from rouge_score.tokenizers import DefaultTokenizer
        except ImportError as exc:
            raise ImportError("ROUGE with the Porter stemmer needs the rouge_score package") from exc
        return DefaultTokenizer(use_stemmer=True).tokenize(text)
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if t]


def rouge_l(prediction: str, target: str, *, stemmer: bool = False) -> dict:
    """ROUGE-L of ``prediction`` against ``target``: {"precision", "recall", "f1"} from the LCS of their tokens.

    recall = LCS / |target|, precision = LCS / |prediction|, f1 their harmonic mean (0 if either is
    empty). TOFU reports the recall (``*_Q_A_ROUGE``, rougeL_recall), MUSE the F1 (rougeL_f1).
    """
    if not isinstance(prediction, str) or not isinstance(target, str):
        raise TypeError(f"rouge_l compares strings, got {type(prediction).__name__} and {type(target).__name__}")
    pred, ref = rouge_tokens(prediction, stemmer=stemmer), rouge_tokens(target, stemmer=stemmer)
    if not pred or not ref:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    lcs = lcs_length(pred, ref)
    precision, recall = lcs / len(pred), lcs / len(ref)
    f1 = 0.0 if lcs == 0 else 2 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1}


# ---------------------------------------------------------------- MUSE PrivLeak
def privleak(auc: float, retrained_auc: float | None = None) -> float:
    """MUSE PrivLeak in percent: (AUC′ − AUC′_retrain) / AUC′_retrain · 100 with AUC′ = 1 − AUC.

    AUC is a membership-inference AUC on forget vs holdout in open-unlearning's convention
    (1 when forget data is much more likely than holdout, ``mia.mia_auc``); MUSE's paper counts
    the other way round, hence AUC′ = 1 − AUC (open-unlearning ``privleak``). Without a
    retrained model the reference is 0.5 (open-unlearning's ``ref_value``). 0 is ideal; strongly
    negative means the forget set is still recognisable (under-unlearning).
    """
    ref = 0.5 if retrained_auc is None else float(retrained_auc)
    score, ref = 1 - float(auc), 1 - ref
    return (score - ref) / (ref + EPS) * 100
