"""eval/stats.py against scipy (a test-only oracle) and hand-computed cases."""
import itertools
import math

import pytest

from unlearn_fast.eval.stats import paired_difference, sign_flip_p, summarize, t_cdf, t_quantile

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 30, 200])
def test_t_cdf_and_quantile_match_scipy(df):
    for t in (-12.0, -3.1, -1.0, -0.2, 0.0, 0.7, 2.0, 5.5, 40.0):
        assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-9, abs=1e-13)
    for p in (0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8, abs=1e-10)


def test_t_quantile_known_table_values():
    # textbook two-sided 95% critical values
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)


def test_summarize_matches_scipy_t_interval():
    xs = [0.42, 0.55, 0.31, 0.48, 0.60]
    s = summarize(xs)
    low, high = scipy_stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 5, scale=scipy_stats.sem(xs))
    assert s.mean == pytest.approx(sum(xs) / 5, abs=1e-15)
    assert (s.ci_low, s.ci_high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    assert s.per_seed == xs and s.n == 5
    s90 = summarize(xs, level=0.9)
    assert s.ci_low < s90.ci_low < s90.mean < s90.ci_high < s.ci_high


def test_summarize_hand_computed_n2():
    # n=2: mean 1, sd sqrt(2), half-width t_{.975,1} * sqrt(2)/sqrt(2) = 12.7062
    s = summarize([0.0, 2.0])
    assert s.mean == 1.0
    assert s.ci_low == pytest.approx(1 - 12.706205, abs=1e-5) and s.ci_high == pytest.approx(1 + 12.706205, abs=1e-5)


def test_summarize_edge_cases_never_nan():
    one = summarize([0.3])
    assert (one.mean, one.ci_low, one.ci_high, one.n) == (0.3, None, None, 1)
    flat = summarize([0.1, 0.1, 0.1])  # 0.1 is not exact in binary: the sd must still be exactly 0
    assert flat.ci_low == flat.ci_high == flat.mean == pytest.approx(0.1)
    empty = summarize([])
    assert (empty.mean, empty.ci_low, empty.n) == (None, None, 0)
    missing = summarize([None, 0.2, None, 0.4])
    assert missing.n == 2 and missing.mean == pytest.approx(0.3) and missing.per_seed == [None, 0.2, None, 0.4]


def test_paired_difference_matches_scipy_ttest_rel():
    a = [0.40, 0.35, 0.52, 0.47, 0.30]
    b = [0.48, 0.41, 0.55, 0.58, 0.33]
    r = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b)]
    ref = scipy_stats.ttest_rel(a, b)
    low, high = scipy_stats.t.interval(0.95, 4, loc=sum(d) / 5, scale=scipy_stats.sem(d))
    assert r.mean_diff == pytest.approx(sum(d) / 5, abs=1e-15)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-8)
    assert (r.ci_low, r.ci_high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    assert r.ci_high < 0 and r.n == 5
    # all five differences are negative: only the all-negative and all-positive sign patterns are as extreme
    assert r.p_permutation == pytest.approx(2 / 32)
    swapped = paired_difference(b, a)
    assert swapped.mean_diff == pytest.approx(-r.mean_diff) and swapped.p == pytest.approx(r.p)


def test_paired_difference_edge_cases():
    assert paired_difference([0.5], [0.2]).to_dict() == {"mean_diff": pytest.approx(0.3), "ci_low": None,
                                                         "ci_high": None, "p": None, "p_permutation": None, "n": 1}
    same = paired_difference([0.2, 0.3, 0.4], [0.2, 0.3, 0.4])
    assert (same.mean_diff, same.ci_low, same.ci_high, same.p, same.p_permutation) == (0.0, 0.0, 0.0, 1.0, 1.0)
    shifted = paired_difference([0.3, 0.4, 0.5], [0.2, 0.3, 0.4])  # a constant, non-zero difference
    assert shifted.ci_low == shifted.ci_high == pytest.approx(0.1)
    assert shifted.p == 0.0 and shifted.p_permutation == pytest.approx(2 / 8)
    dropped = paired_difference([0.1, None, 0.3, 0.2], [0.2, 0.5, None, 0.4])
    assert dropped.n == 2 and dropped.mean_diff == pytest.approx(-0.15)
    for r in (same, shifted, dropped):
        assert not any(isinstance(v, float) and math.isnan(v) for v in r.to_dict().values())


def test_sign_flip_p_by_enumeration_and_monte_carlo():
    d = [0.3, -0.1, 0.2, 0.25]
    observed = abs(sum(d))
    hits = sum(abs(sum(s * v for s, v in zip(signs, d))) >= observed - 1e-12
               for signs in itertools.product((1, -1), repeat=4))
    assert sign_flip_p(d) == hits / 16
    many = [0.1 + 0.01 * i for i in range(20)]  # all positive, n=20: Monte Carlo, true p = 2/2^20
    assert sign_flip_p(many) < 1e-3
    mixed = [(-1) ** i * 0.1 for i in range(20)]  # sum 0: every assignment is as extreme
    assert sign_flip_p(mixed) == 1.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="a and b"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="values\\[1\\]"):
        summarize([0.1, float("nan")])
    with pytest.raises(TypeError, match="values\\[0\\]"):
        summarize(["0.1"])
    with pytest.raises(ValueError, match="level"):
        summarize([0.1, 0.2], level=95)
    with pytest.raises(ValueError, match="df"):
        t_cdf(1.0, 0)
