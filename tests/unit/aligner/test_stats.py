"""The experiment report's statistics against values worked out by hand, and against scipy
where it is installed (it is not a dependency of aligner)."""

from __future__ import annotations

import math
import random

import pytest

from aligner import stats


def test_a_mean_and_its_t_interval_by_hand():
    # mean 2.5, s^2 = 5/3, se = sqrt(5/12); t(0.975, 3) = 3.182446305284263
    got = stats.mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 12)
    assert got["n"] == 4 and got["mean"] == 2.5
    assert got["ci95"] == pytest.approx([2.5 - half, 2.5 + half], abs=1e-9)
    assert stats.mean_interval([7.0]) == {"n": 1, "mean": 7.0, "ci95": None}
    assert stats.mean_interval([3.0, 3.0, 3.0])["ci95"] == [3.0, 3.0]


def test_wilson_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half z·sqrt(0.016 + z²/400) / (1 + z²/10)
    z2 = stats.Z95**2
    centre, half = (0.8 + z2 / 20) / (1 + z2 / 10), stats.Z95 * math.sqrt(0.016 + z2 / 400) / (1 + z2 / 10)
    assert stats.wilson_interval(8, 10) == pytest.approx([centre - half, centre + half])
    low, high = stats.wilson_interval(0, 5)
    assert low == 0.0 and 0.4 < high < 0.44  # 0.4345: never a zero-width interval at 0
    assert stats.wilson_interval(5, 5)[1] == 1.0


@pytest.mark.parametrize("values, q, expected", [
    ([5.0], 0.5, 5.0), ([5.0], 0.95, 5.0),
    ([1.0, 3.0], 0.5, 2.0), ([1.0, 3.0], 0.95, 2.9),
    ([1.0, 2.0, 3.0, 4.0, 10.0], 0.5, 3.0), ([1.0, 2.0, 3.0, 4.0, 10.0], 0.95, 8.8),
])
def test_quantiles_interpolate_like_numpy(values, q, expected):
    assert stats.quantile(values, q) == pytest.approx(expected)


def test_the_quantile_interval_uses_binomial_order_statistics():
    # n = 10, median, B ~ Binomial(10, 1/2): P(B <= 1) = 11/1024 < 0.025 <= P(B <= 2) = 56/1024,
    # so l = 2; P(B <= 7) = 968/1024 < 0.975 <= P(B <= 8) = 1013/1024, so u = 9: [X(2), X(9)],
    # covering with P(2 <= B <= 8) = 1002/1024.
    values = [float(v) for v in range(1, 11)]
    assert stats.quantile_interval(values, 0.5) == [2.0, 9.0]
    # Too few values to bound the 95th percentile from above.
    assert stats.quantile_interval(values, 0.95) == [8.0, None]
    assert stats.quantile_interval([1.0], 0.5) == [None, None]


def test_the_quantile_interval_covers_at_least_95_percent():
    rng = random.Random(0)
    for q in (0.5, 0.95):
        hits = 0
        truth = -math.log(1 - q)  # Exponential(1)
        for _ in range(400):
            sample = sorted(rng.expovariate(1.0) for _ in range(80))
            low, high = stats.quantile_interval(sample, q)
            hits += (low is None or low <= truth) and (high is None or truth <= high)
        assert hits / 400 >= 0.92  # nominal >= 0.95; 400 draws leave ~1.1% of noise


def test_welch_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0, 7.0]
    va, vb = (5 / 3) / 4, 2.5 / 5  # variances of the means
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 4)
    got = stats.welch(a, b)
    assert got["difference"] == 2.5
    assert got["df"] == pytest.approx(df)
    half = stats.t_quantile(0.975, df) * math.sqrt(va + vb)
    assert got["ci95"] == pytest.approx([2.5 - half, 2.5 + half])
    assert got["p_value"] == pytest.approx(stats.t_two_sided_p(2.5 / math.sqrt(va + vb), df))
    assert stats.welch([1.0], [2.0, 3.0]) == {"difference": 1.5, "ci95": None, "p_value": None, "df": None}
    assert stats.welch([], [1.0])["difference"] is None
    assert stats.welch([1.0, 1.0], [2.0, 2.0])["p_value"] is None  # no spread: no test


def test_the_exact_binomial_test_by_hand():
    # 8 of 10 under 1/2: P(B <= 2) + P(B >= 8) = 2 * (1 + 10 + 45) / 1024
    assert stats.binomial_test(8, 10) == pytest.approx(112 / 1024)
    assert stats.binomial_test(0, 3) == pytest.approx(2 / 8)
    assert stats.binomial_test(0, 0) is None


@pytest.mark.parametrize("df", [1, 2, 3.5, 7, 30, 1000])
def test_student_t_against_known_values(df):
    known = {1: 12.706204736174698, 2: 4.302652729749464, 7: 2.3646242515927844, 30: 2.0422724563012373,
             1000: 1.9623390808264078}
    if df in known:
        assert stats.t_quantile(0.975, df) == pytest.approx(known[df], rel=1e-9)
    for t in (0.1, 1.0, 2.5, 4.0):  # beyond, 1 - p/2 rounds to 1 in floats
        assert stats.t_quantile(1 - stats.t_two_sided_p(t, df) / 2, df) == pytest.approx(t, rel=1e-7)


def test_against_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(1)
    for n_a, n_b in ((3, 4), (12, 40), (200, 150)):
        a = [rng.gauss(0, 1) for _ in range(n_a)]
        b = [rng.gauss(0.3, 2) ** 2 for _ in range(n_b)]
        ours = stats.welch(a, b)
        theirs = scipy_stats.ttest_ind(b, a, equal_var=False)
        assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-8)
        ci = theirs.confidence_interval(0.95)
        assert ours["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-8)
        m = stats.mean_interval(b)
        low, high = scipy_stats.t.interval(0.95, n_b - 1, loc=m["mean"], scale=scipy_stats.sem(b))
        assert m["ci95"] == pytest.approx([low, high], rel=1e-9)
    for k, n in ((3, 17), (40, 60), (0, 9)):
        assert stats.binomial_test(k, n) == pytest.approx(scipy_stats.binomtest(k, n).pvalue, rel=1e-9)
        low, high = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert stats.wilson_interval(k, n) == pytest.approx([low, high], abs=1e-12)
    for n, q in ((10, 0.5), (57, 0.95), (1000, 0.5)):
        low, high = stats.quantile_interval(list(range(1, n + 1)), q)
        l_expected = int(scipy_stats.binom.ppf(0.025, n, q))
        u_expected = int(scipy_stats.binom.ppf(0.975, n, q)) + 1
        assert low == (l_expected if l_expected >= 1 else None)
        assert high == (u_expected if u_expected <= n else None)


def test_chi_square_against_scipy_where_installed():
    scipy_stats = pytest.importorskip("scipy.stats")
    for x, df in ((0.5, 1), (3.0, 2), (10.0, 3), (50.0, 4), (0.01, 5), (200.0, 3), (7.0, 7), (120.0, 99)):
        assert stats.chi_square_sf(x, df) == pytest.approx(scipy_stats.chi2.sf(x, df), rel=1e-9, abs=1e-300)
    observed, shares = [100, 200, 300], [0.2, 0.3, 0.5]
    theirs = scipy_stats.chisquare(observed, [600 * s for s in shares])
    ours = stats.chi_square_test(observed, shares)
    assert (ours["chi2"], ours["df"]) == (pytest.approx(theirs.statistic), 2)
    assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert stats.chi_square_test([0, 0], [0.5, 0.5]) is None and stats.chi_square_test([5], [1.0]) is None


def test_moments_kept_as_values_come_and_go_match_a_recount():
    """A report kept up to date adds values and takes replaced ones back (Welford's update):
    after thousands of both, its mean, interval and Welch test match the values recounted."""
    rng = random.Random(5)
    kept, values = stats.Moments(), []
    for _ in range(5000):
        if values and rng.random() < 0.3:
            gone = values.pop(rng.randrange(len(values)))
            kept.remove(gone)
        else:
            x = rng.gauss(120.0, 30.0)
            values.append(x)
            kept.add(x)
    assert kept.n == len(values)
    assert stats.mean_interval(kept)["mean"] == pytest.approx(stats.mean_interval(values)["mean"], rel=1e-12)
    assert stats.mean_interval(kept)["ci95"] == pytest.approx(stats.mean_interval(values)["ci95"], rel=1e-9)
    other = [rng.gauss(125.0, 10.0) for _ in range(300)]
    by_moments, by_values = stats.welch(stats.Moments.of(other), kept), stats.welch(other, values)
    for field in ("difference", "ci95", "p_value", "df"):
        assert by_moments[field] == pytest.approx(by_values[field], rel=1e-8)
    for x in list(values):  # all taken back: an empty sample, not a negative variance
        kept.remove(x)
    assert (kept.n, kept.m2) == (0, 0.0) and stats.mean_interval(kept)["mean"] is None


@pytest.mark.parametrize("n", [1, 2, 7, 40, 333, 1000, 4099])
@pytest.mark.parametrize("q", [0.05, 0.5, 0.95])
def test_the_binomial_quantile_by_bisection_equals_the_summed_pmf(n, q):
    """The quantile interval's binomial quantile, found by bisection on the CDF (O(log n)),
    against the smallest k whose summed probabilities reach the level."""
    for level in (0.025, 0.975):
        total, expected = 0.0, n
        for k in range(n + 1):
            total += math.comb(n, k) * q**k * (1 - q) ** (n - k) if n < 1000 else math.exp(
                math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(q)
                + (n - k) * math.log1p(-q))
            if total >= level * (1 - 1e-12):
                expected = k
                break
        assert stats._binomial_ppf(level, n, q) == expected
