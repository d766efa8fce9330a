"""Statistics over seeds, with scipy: intervals, Welch's t-test, effect size, power, and
Holm's correction for several comparisons.

Pure functions of lists of floats (no JAX), so the report computes them from a run's files.
Accuracies are fractions here; the report prints them in percentage points.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80


def describe(values: Sequence[float], confidence: float = CONFIDENCE,
             bounds: tuple[float, float] | None = None) -> dict:
    """The values, their mean, sample standard deviation (n - 1) and the t-interval of
    the mean (None where fewer than two values give no spread).

    `bounds`: the range the values can take (an accuracy: (0, 1)). The t-interval assumes
    an unbounded normal mean, so with few values and a wide spread it can run past a bound
    (2 seeds: 12.7 sd either side); it is then clipped to the bound, which the true mean
    cannot pass either, and `clipped` says so."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    out = {"n": n, "values": x.tolist(), "mean": float(x.mean()) if n else None,
           "sd": None, "ci_low": None, "ci_high": None, "confidence": confidence}
    if n >= 2:
        sd = float(x.std(ddof=1))
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
        low, high = out["mean"] - half, out["mean"] + half
        if bounds is not None:
            clipped = clip_interval(low, high, bounds)
            if clipped != (low, high):
                out["clipped"] = True
            low, high = clipped
        out.update(sd=sd, ci_low=low, ci_high=high)
    return out


def clip_interval(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    """An interval cut to `bounds` (a quantity that cannot leave them)."""
    return max(low, bounds[0]), min(high, bounds[1])


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
          bounds: tuple[float, float] | None = None) -> dict | None:
    """mean(b) - mean(a) with Welch's t-test (unequal variances), its interval and Cohen's
    d on the average variance, sqrt((sd_a^2 + sd_b^2) / 2). None with fewer than two
    values on a side. A zero spread on both sides gives no test (p is NaN).

    `bounds`: the range of the values (as in describe); the difference's interval is then
    clipped to the range a difference can take, (low - high, high - low), which changes
    neither the test nor on which side of zero the interval lies."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        # Equal values on each side: the variances computed around a rounded mean are
        # ~1e-34, not 0, and would give p ~1e-29; there is no spread to test against.
        return {"test": "Welch's two-sample t-test (two-sided)",
                "difference": float(b[0] - a[0]), "ci_low": math.nan, "ci_high": math.nan,
                "confidence": confidence, "t": math.nan, "df": math.nan, "p_value": math.nan,
                "cohens_d": None}
    with warnings.catch_warnings():
        # scipy warns of precision loss when the seeds' values (nearly) coincide, as on a
        # small test set; the result is still exact enough, or NaN for no spread at all.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(b, a, equal_var=False)
        ci = result.confidence_interval(confidence)
    spread = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    difference = float(b.mean() - a.mean())
    low, high = float(ci.low), float(ci.high)
    clipped = {}
    if bounds is not None:
        width = bounds[1] - bounds[0]
        if (cut := clip_interval(low, high, (-width, width))) != (low, high):
            (low, high), clipped = cut, {"clipped": True}
    return {
        "test": "Welch's two-sample t-test (two-sided)",
        "difference": difference,
        "ci_low": low, "ci_high": high, "confidence": confidence, **clipped,
        "t": float(result.statistic), "df": float(result.df), "p_value": float(result.pvalue),
        "cohens_d": difference / spread if spread > 0 else None,
    }


def binomial_se(accuracy: float, n: int) -> float:
    """Standard error of one accuracy measured on n independent examples."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def t_test_power(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided two-sample t-test with n per group and a common sd, from the
    noncentral t distribution."""
    df = 2 * n - 2
    ncp = difference / (sd * math.sqrt(2 / n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp))


def min_detectable_difference(sd: float, n: int, alpha: float = ALPHA,
                              power: float = POWER) -> float | None:
    """The smallest true difference that n seeds per group detect with `power` at level
    `alpha`, given the spread sd (None without a spread)."""
    if n < 2 or not sd > 0:
        return None
    # Bracket from above, starting near the normal approximation (the noncentral t's tail
    # is unstable far beyond it).
    high = 3 * sd * math.sqrt(2 / n)
    while t_test_power(high, sd, n, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda d: t_test_power(d, sd, n, alpha) - power, 0.0, high,
                                 xtol=1e-12 * sd))


def seeds_needed(difference: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                 most: int = 100_000) -> int | None:
    """The fewest seeds per group that detect `difference` with `power` (None without a
    spread or beyond `most`)."""
    if not sd > 0 or not difference > 0:
        return None
    n = 2
    while t_test_power(difference, sd, n, alpha) < power:
        n += 1
        if n > most:
            return None
    return n


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (family-wise error rate), in their given
    order: the i-th smallest p becomes max over j <= i of min(1, (m - j + 1) * p_(j)), so
    an adjusted p below alpha rejects exactly where Holm's procedure at level alpha does."""
    p = [float(v) for v in p_values]
    if any(not 0 <= v <= 1 for v in p):  # NaN included
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
