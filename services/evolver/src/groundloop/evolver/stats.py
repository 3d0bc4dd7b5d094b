"""Small-sample statistics for the final re-evaluation, without scipy.

The evolver reports each re-evaluated idea as mean ± 95 % confidence interval (Student t) and
a two-sided Welch t-test p-value against the baseline runs. Student's t distribution is
computed from the regularized incomplete beta function (continued fraction, modified Lentz),
which is accurate to ~1e-12 for the degrees of freedom met here (1 … 10^6, fractional too,
since Welch's df is fractional).

    F(t; ν) = 1 − ½·I_x(ν/2, ½) for t ≥ 0, with x = ν / (ν + t²)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-15
_TINY = 1e-300


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values: need at least one score")
    return math.fsum(values) / len(values)


def sample_variance(values: Sequence[float]) -> float:
    """Unbiased (n − 1) variance; needs two values."""
    if len(values) < 2:
        raise ValueError(f"sample variance needs at least 2 values, got {len(values)}")
    m = mean(values)
    return math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (Numerical Recipes `betacf`, modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            return h
    raise ArithmeticError(
        f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})"
    )


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete beta needs a, b > 0 (got a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete beta needs 0 <= x <= 1 (got {x})")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 − I_{1−x}(b,a) otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * t_two_sided_p(t, df)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p (bisection on the CDF; monotone, so always converges)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, high * 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a two-sided Student-t confidence interval. One value has no spread to
    measure: its interval is the point itself (callers report n so readers can tell)."""
    m = mean(values)
    n = len(values)
    if n < 2:
        return Interval(m, m, m, n)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * math.sqrt(sample_variance(values) / n)
    return Interval(m, m - half, m + half, n)


@dataclass(frozen=True)
class WelchResult:
    t: float
    df: float
    p_value: float


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Two-sided Welch's t-test of mean(a) = mean(b) (unequal variances, Welch–Satterthwaite df).

    Runs that are exactly reproducible have zero variance on both sides: then the means
    either agree (p = 1) or differ with no noise at all (p = 0)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs >= 2 values per group, got {len(a)} and {len(b)}")
    va, vb = sample_variance(a) / len(a), sample_variance(b) / len(b)
    diff = mean(a) - mean(b)
    if va + vb == 0.0:
        return WelchResult(
            0.0 if diff == 0 else math.copysign(math.inf, diff), math.inf, 1.0 if diff == 0 else 0.0
        )
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (
        (va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0)
    )
    return WelchResult(t, df, t_two_sided_p(t, df))
