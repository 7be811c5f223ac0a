"""Small, exact statistics for experiment reports: means and proportions with 95% intervals,
quantiles with distribution-free intervals, and tests of a difference between two arms.

Pure Python (no scipy): the server must not grow a dependency for a report, and every number
here is deterministic (no resampling), so a report can be recounted exactly.

- a mean: Student's t interval, `mean ± t(0.975, n-1) · s / √n` (`mean_interval`);
- a proportion: Wilson's score interval (`wilson_interval`), sound at 0 and 1 and for small n;
- a quantile: the sample quantile (linear interpolation, numpy's default) with the
  order-statistic interval that covers the true quantile with at least 95% for any continuous
  distribution (`quantile_interval`); null where the sample is too small to bound it;
- two means: Welch's t test and interval for `mean(b) - mean(a)` (`welch`), unequal variances;
- a proportion against 1/2: the exact two-sided binomial test (`binomial_test`);
- counts against expected shares: Pearson's chi-square test (`chi_square_test`), the
  experiments' sample-ratio-mismatch check.

A mean and Welch's test take the values, or their `Moments` kept as values come and go (an
experiment report kept up to date: O(1) per report however many values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LEVEL = 0.95
Z95 = 1.959963984540054  # the standard normal's 0.975 quantile


@dataclass
class Moments:
    """A sample's size, mean and sum of squared deviations from the mean (`m2`), kept as values
    are added and removed (Welford's update) or computed from the values in two exact passes.

    >>> kept = Moments()
    >>> for x in (1.0, 2.0, 9.0, 3.0, 4.0): kept.add(x)
    >>> kept.remove(9.0)
    >>> (kept.n, kept.mean, round(kept.variance, 12)) == (4, 2.5, round(Moments.of([1.0, 2.0, 3.0, 4.0]).variance, 12))
    True
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        if not values:
            return cls()
        mean = math.fsum(values) / len(values)
        return cls(len(values), mean, math.fsum((v - mean) ** 2 for v in values))

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def remove(self, x: float) -> None:
        if self.n <= 1:
            self.n, self.mean, self.m2 = 0, 0.0, 0.0
            return
        delta = x - self.mean
        self.n -= 1
        self.mean -= delta / self.n
        self.m2 = max(0.0, self.m2 - delta * (x - self.mean))

    @property
    def variance(self) -> float:
        """The sample variance (n - 1 in the denominator)."""
        return self.m2 / (self.n - 1)


class ValueCounts:
    """A sample of few distinct values (ratings: thumbs 0 or 1, stars 1 to 5) as a count per
    value, so values come and go exactly: its `moments()` are the two-pass ones, with no
    rounding left behind by removals (a sample of equal values has exactly no spread).

    >>> ratings = ValueCounts()
    >>> for x in (1.0, 0.0, 1.0, 0.75): ratings.add(x)
    >>> ratings.remove(0.0); ratings.remove(0.75)
    >>> ratings.moments()
    Moments(n=2, mean=1.0, m2=0.0)
    """

    def __init__(self) -> None:
        self.counts: dict[float, int] = {}

    def add(self, x: float) -> None:
        self.counts[x] = self.counts.get(x, 0) + 1

    def remove(self, x: float) -> None:
        if (left := self.counts[x] - 1) > 0:
            self.counts[x] = left
        else:
            del self.counts[x]

    def moments(self) -> Moments:
        n = sum(self.counts.values())
        if n == 0:
            return Moments()
        mean = math.fsum(x * c for x, c in self.counts.items()) / n
        return Moments(n, mean, math.fsum(c * (x - mean) ** 2 for x, c in self.counts.items()))


def moments(values: Sequence[float] | Moments) -> Moments:
    return values if isinstance(values, Moments) else Moments.of(values)


def mean_interval(values: Sequence[float] | Moments) -> dict[str, Any]:
    """{"n", "mean", "ci95"}: the mean with its t interval; `mean` is None without values,
    `ci95` None with fewer than two.

    >>> mean_interval([1.0, 2.0, 3.0, 4.0])
    {'n': 4, 'mean': 2.5, 'ci95': [0.4457..., 4.5542...]}
    >>> mean_interval([])
    {'n': 0, 'mean': None, 'ci95': None}
    """
    sample = moments(values)
    n, mean = sample.n, sample.mean
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    if n < 2:
        return {"n": n, "mean": mean, "ci95": None}
    half = t_quantile(0.5 + LEVEL / 2, n - 1) * math.sqrt(sample.variance / n)
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """Wilson's 95% score interval for a proportion; None when n is 0.

    >>> [round(x, 4) for x in wilson_interval(7, 10)]
    [0.3968, 0.8922]
    >>> wilson_interval(0, 0) is None
    True
    """
    if n == 0:
        return None
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted values, by linear interpolation between order statistics
    (numpy's default, "type 7"); None without values.

    >>> quantile([1.0, 2.0, 3.0, 4.0], 0.5)
    2.5
    >>> round(quantile([1.0, 2.0, 3.0, 4.0], 0.95), 12)
    3.85
    """
    n = len(sorted_values)
    if n == 0:
        return None
    h = (n - 1) * q
    low = math.floor(h)
    high = min(low + 1, n - 1)
    return sorted_values[low] + (h - low) * (sorted_values[high] - sorted_values[low])


def quantile_interval(sorted_values: Sequence[float], q: float) -> list[float | None] | None:
    """A distribution-free 95% interval for the q-quantile: order statistics X(l) and X(u)
    with P(X(l) <= ξq <= X(u)) >= 0.95, each side missing at most 2.5% (B ~ Binomial(n, q)
    counts the values below ξq: l is the smallest k with P(B <= k) >= 0.025, u the smallest
    with P(B <= u - 1) >= 0.975). A bound the sample cannot give (l = 0, or u > n) is None.

    >>> quantile_interval(list(range(1, 101)), 0.5)
    [40, 61]
    >>> quantile_interval([1.0, 2.0, 3.0], 0.95)
    [2.0, None]
    >>> quantile_interval([], 0.5) is None
    True
    """
    n = len(sorted_values)
    if n == 0:
        return None
    tail = (1 - LEVEL) / 2
    low = _binomial_ppf(tail, n, q)
    high = _binomial_ppf(1 - tail, n, q) + 1
    return [sorted_values[low - 1] if low >= 1 else None, sorted_values[high - 1] if high <= n else None]


def welch(a: Sequence[float] | Moments, b: Sequence[float] | Moments) -> dict[str, Any]:
    """Welch's test of `mean(b) - mean(a)`: {"difference", "ci95", "p_value", "df"}. The
    interval and p-value are None when either side has fewer than two values or both have no
    spread (then nothing can be said about the noise).

    >>> r = welch([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0, 7.0])
    >>> round(r["difference"], 4), [round(x, 4) for x in r["ci95"]], round(r["p_value"], 4), round(r["df"], 3)
    (2.5, [0.2348, 4.7652], 0.0349, 6.981)
    """
    a, b = moments(a), moments(b)
    if not a.n or not b.n:
        return {"difference": None, "ci95": None, "p_value": None, "df": None}
    difference = b.mean - a.mean
    if a.n < 2 or b.n < 2:
        return {"difference": difference, "ci95": None, "p_value": None, "df": None}
    va, vb = a.variance / a.n, b.variance / b.n
    se2 = va + vb
    if se2 == 0:
        return {"difference": difference, "ci95": None, "p_value": None, "df": None}
    df = se2 * se2 / (va * va / (a.n - 1) + vb * vb / (b.n - 1))
    se = math.sqrt(se2)
    half = t_quantile(0.5 + LEVEL / 2, df) * se
    return {"difference": difference, "ci95": [difference - half, difference + half],
            "p_value": t_two_sided_p(difference / se, df), "df": df}


def binomial_test(successes: int, n: int, p: float = 0.5) -> float | None:
    """The exact two-sided binomial test's p-value: the probability, under Binomial(n, p), of
    an outcome no more likely than the one seen. None when n is 0.

    >>> round(binomial_test(9, 10), 6)
    0.021484
    >>> round(binomial_test(5, 10), 12)
    1.0
    """
    if n == 0:
        return None
    pmf = [math.exp(_log_binomial_pmf(k, n, p)) for k in range(n + 1)]
    seen = pmf[successes] * (1 + 1e-7)  # ties in likelihood count as extreme (float noise aside)
    return min(1.0, math.fsum(x for x in pmf if x <= seen))


def chi_square_test(observed: Sequence[int], shares: Sequence[float]) -> dict[str, Any] | None:
    """Pearson's goodness-of-fit test of counts against expected shares (summing to 1):
    {"chi2", "df", "p_value"}; None without counts or with fewer than two cells.

    >>> r = chi_square_test([480, 520], [0.5, 0.5]); round(r["chi2"], 6), r["df"], round(r["p_value"], 4)
    (1.6, 1, 0.2059)
    >>> round(chi_square_test([100, 200, 300], [0.2, 0.3, 0.5])["p_value"], 6)
    0.062177
    """
    total = sum(observed)
    cells = [(o, s) for o, s in zip(observed, shares, strict=True) if s > 0]
    if total == 0 or len(cells) < 2:
        return None
    chi2 = math.fsum((o - total * s) ** 2 / (total * s) for o, s in cells)
    df = len(cells) - 1
    return {"chi2": chi2, "df": df, "p_value": chi_square_sf(chi2, df)}


def chi_square_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square with `df` degrees of freedom: Q(df/2, x/2), the regularised
    upper incomplete gamma function (series below a + 1, continued fraction above).

    >>> round(chi_square_sf(3.841458821, 1), 6), round(chi_square_sf(5.991464547, 2), 6)
    (0.05, 0.05)
    """
    if x <= 0:
        return 1.0
    a, z = df / 2, x / 2
    log_front = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = z + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)


# -- Student's t ------------------------------------------------------------------------------

def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom (df may be fractional).

    >>> round(t_two_sided_p(2.228138852, 10), 6)
    0.05
    """
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2, 0.5, df / (df + t * t))


def t_quantile(prob: float, df: float) -> float:
    """The `prob` quantile of Student's t (0 < prob < 1), by bisection on the CDF.

    >>> round(t_quantile(0.975, 1), 6), round(t_quantile(0.975, 10), 6), round(t_quantile(0.975, 1e9), 6)
    (12.706205, 2.228139, 1.959964)
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    if prob < 0.5:
        return -t_quantile(1 - prob, df)
    target = 2 * (1 - prob)  # two-sided tail of |T| at the quantile
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_p(mid, df) > target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (continued fraction, Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h / a


# -- binomial ---------------------------------------------------------------------------------

def _log_binomial_pmf(k: int, n: int, p: float) -> float:
    if p in (0.0, 1.0):
        return 0.0 if k == (n if p == 1.0 else 0) else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(B <= k), B ~ Binomial(n, p): I_{1-p}(n - k, k + 1)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    return _betainc(n - k, k + 1, 1.0 - p)


def _binomial_ppf(prob: float, n: int, p: float) -> int:
    """The smallest k with P(B <= k) >= prob, B ~ Binomial(n, p): a bisection on the CDF, so
    O(log n) evaluations (a report's quantile intervals over 100,000 latencies stay cheap).

    >>> [_binomial_ppf(q, 100, 0.5) for q in (0.025, 0.5, 0.975)]
    [40, 50, 60]
    """
    target = prob * (1 - 1e-12)
    low, high = 0, n
    while low < high:
        middle = (low + high) // 2
        if _binomial_cdf(middle, n, p) >= target:
            high = middle
        else:
            low = middle + 1
    return low
