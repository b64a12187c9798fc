"""The benchmarks' metric definitions on hand-made cases, and against scipy / sklearn / rouge_score as oracles."""
import math

import numpy as np
import pytest

from unlearn_fast.eval import benchmark_metrics as bm
from unlearn_fast.eval.mia import mia_auc


# ---------------------------------------------------------------- KS test / forget quality
def test_ks_pvalue_is_one_for_identical_samples():
    a = [0.3, 1.2, 0.7, 2.0, 0.1]
    assert bm.ks_statistic(a, a) == 0
    assert bm.ks_2samp_pvalue(a, a) == 1.0
    assert bm.forget_quality(a, list(a)) == 1.0


def test_ks_pvalue_hand_made():
    # fully separated samples of 2 and 2: D = 1, reached by 2 of the C(4, 2) = 6 interleavings (aabb, bbaa)
    assert bm.ks_statistic([1, 2], [3, 4]) == 1.0
    assert bm.ks_2samp_pvalue([1, 2], [3, 4]) == pytest.approx(1 / 3, rel=1e-12)
    # 3 vs 3 separated: 2 / C(6, 3) = 1/10
    assert bm.ks_2samp_pvalue([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1, rel=1e-12)
    # interleaved a b a b: D = 1/2, and every one of the 6 paths reaches |i/2 − j/2| ≥ 1/2
    assert bm.ks_2samp_pvalue([1, 3], [2, 4]) == pytest.approx(1.0)


@pytest.mark.parametrize("m,n,shift,ties", [(5, 5, 0.0, False), (7, 11, 0.5, False), (40, 40, 1.0, False),
                                             (30, 45, 0.3, True), (100, 60, 2.0, False), (3, 200, 0.0, True),
                                             (400, 400, 0.8, False)])
def test_ks_pvalue_matches_scipy_exact(m, n, shift, ties):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(m * 1000 + n)
    a, b = rng.normal(size=m), rng.normal(shift, size=n)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    ref = stats.ks_2samp(a, b, method="exact")
    assert bm.ks_statistic(a, b) == pytest.approx(ref.statistic, abs=1e-15)
    assert bm.ks_2samp_pvalue(a, b) == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)


# ---------------------------------------------------------------- membership-inference AUC
def test_auc_identical_and_separated_score_sets():
    s = [0.1, 0.5, 0.9, 0.3]
    assert mia_auc(s, s) == 0.5
    assert mia_auc([0.1, 0.2, 0.3], [0.7, 0.8]) == 1.0  # holdout scores higher: forget data recognised
    assert mia_auc([0.7, 0.8], [0.1, 0.2, 0.3]) == 0.0
    assert mia_auc([1.0, 2.0], [1.5, 1.0]) == pytest.approx((1 + 0.5 + 0 + 0) / 4)  # one tie counts 1/2


def test_auc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    f, h = np.round(rng.normal(size=37), 1), np.round(rng.normal(0.4, size=23), 1)
    ref = metrics.roc_auc_score([0] * f.size + [1] * h.size, np.concatenate([f, h]))
    assert mia_auc(f, h) == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------- ROUGE-L
def test_rouge_l_known_strings():
    r = bm.rouge_l("The cat sat on the mat.", "the cat is on the mat")
    # tokens: 6 and 6, LCS "the cat on the mat" = 5
    assert r["precision"] == pytest.approx(5 / 6) and r["recall"] == pytest.approx(5 / 6)
    assert r["f1"] == pytest.approx(5 / 6)
    r = bm.rouge_l("born in Dunmere", "Dunmere")
    assert r == pytest.approx({"precision": 1 / 3, "recall": 1.0, "f1": 0.5})
    assert bm.rouge_l("", "x") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert bm.rouge_l("a b", "c d")["f1"] == 0.0
    with pytest.raises(TypeError):
        bm.rouge_l(["a"], "a")


@pytest.mark.parametrize("stemmer", [False, True])
def test_rouge_l_matches_rouge_score(stemmer):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)
    pairs = [("The author was born in Paris, France.", "She was born in Paris"),
             ("running runners ran quickly", "the runner runs quick"),
             ("Velor Ashkin plays the violin", "violin"),
             ("12 apples and 3 pears!", "3 pears and 12 apples"),
             ("nothing in common", "entirely different words")]
    for pred, target in pairs:
        ref = scorer.score(target, pred)["rougeL"]
        ours = bm.rouge_l(pred, target, stemmer=stemmer)
        assert ours["precision"] == pytest.approx(ref.precision)
        assert ours["recall"] == pytest.approx(ref.recall)
        assert ours["f1"] == pytest.approx(ref.fmeasure)


# ---------------------------------------------------------------- TOFU aggregates
def test_truth_ratio_and_aggregators_hand_made():
    # P(paraphrase) = 0.5; perturbed answers 0.25 and 0.125: P(wrong) = geometric mean = sqrt(1/32)
    correct = [-math.log(0.5), -math.log(0.2)]
    wrong = [[-math.log(0.25), -math.log(0.125)], [-math.log(0.4)]]
    r = bm.truth_ratios(correct, wrong)
    assert r == pytest.approx([math.sqrt(1 / 32) / 0.5, 0.4 / 0.2], rel=1e-8)
    assert bm.truth_ratio_closer_to_1(r) == pytest.approx((r[0] + 1 / r[1]) / 2, rel=1e-8)
    assert bm.truth_ratio_true_better(r) == pytest.approx((1 - r[0] + 0) / 2, rel=1e-8)
    assert bm.probability(correct) == pytest.approx(0.35)
    # normalised: 0.5 / (0.5 + 0.25 + 0.125), 0.2 / (0.2 + 0.4)
    assert bm.probability_with_options(correct, wrong) == pytest.approx((0.5 / 0.875 + 0.2 / 0.6) / 2)
    with pytest.raises(ValueError, match="one entry per question"):
        bm.truth_ratios(correct, wrong[:1])


def test_harmonic_mean_and_model_utility():
    assert bm.harmonic_mean([1, 2, 4]) == pytest.approx(3 / (1 + 0.5 + 0.25))
    assert bm.harmonic_mean([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError):
        bm.harmonic_mean([1, -1])
    parts = dict(zip(bm.MODEL_UTILITY_PARTS, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))
    assert bm.model_utility({**parts, "forget_Q_A_Prob": 0.0}) == pytest.approx(9 / sum(1 / v for v in parts.values()))
    stats = pytest.importorskip("scipy.stats")
    assert bm.model_utility(parts) == pytest.approx(stats.hmean(list(parts.values())))


def test_privleak_convention():
    # an unlearned model whose forget set looks like holdout (AUC 0.5) against a retrained one at 0.5: no leak
    assert bm.privleak(0.5) == pytest.approx(0.0)
    # forget data fully recognised (AUC 1): AUC' = 0, −100 % as in MUSE's tables for the target model
    assert bm.privleak(1.0, 0.5) == pytest.approx(-100.0)
    assert bm.privleak(0.3, 0.6) == pytest.approx((0.7 - 0.4) / 0.4 * 100)
