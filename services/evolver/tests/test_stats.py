"""The evolver's statistics (no scipy) against closed forms, tables and hand computations."""

from __future__ import annotations

import math

import pytest

from groundloop.evolver.stats import (
    mean,
    mean_ci,
    regularized_incomplete_beta,
    sample_variance,
    t_cdf,
    t_quantile,
    t_two_sided_p,
    welch_t_test,
)


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062047), (2, 4.3026527), (5, 2.5705818), (10, 2.2281389), (30, 2.0422725)],
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-7)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-7)


def test_t_quantile_tends_to_the_normal() -> None:
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.5, 3) == 0.0


@pytest.mark.parametrize("t", [-30.0, -3.0, -0.7, 0.0, 0.4, 1.0, 2.5, 9.0, 250.0])
def test_t_cdf_closed_forms(t: float) -> None:
    # df = 1 is the Cauchy distribution; df = 2 and df = 4 have elementary CDFs.
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    x = t * t / (4 + t * t)
    f4 = 0.5 + 0.5 * math.copysign(math.sqrt(x), t) * (1 + (1 - x) / 2)
    assert t_cdf(t, 4) == pytest.approx(f4, abs=1e-12)


@pytest.mark.parametrize("df", [0.7, 3.3, 5.882352941176471, 17.0])
def test_t_cdf_matches_numerical_integration_of_the_density(df: float) -> None:
    """Fractional df (Welch's) checked against Simpson integration of the t density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    upper, steps = 1.7, 20_000
    h = upper / steps
    area = density(0) + density(upper)
    area += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    assert t_cdf(upper, df) == pytest.approx(0.5 + area * h / 3, abs=1e-10)


def test_incomplete_beta_edges_and_symmetry() -> None:
    assert regularized_incomplete_beta(2.0, 3.0, 0.0) == 0.0
    assert regularized_incomplete_beta(2.0, 3.0, 1.0) == 1.0
    # I_x(1, 1) = x; I_x(a, b) = 1 − I_{1−x}(b, a); I_x(2, 1) = x².
    assert regularized_incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3, abs=1e-14)
    assert regularized_incomplete_beta(2.0, 1.0, 0.6) == pytest.approx(0.36, abs=1e-14)
    a, b, x = 2.5, 0.5, 0.8
    assert regularized_incomplete_beta(a, b, x) == pytest.approx(
        1 - regularized_incomplete_beta(b, a, 1 - x), abs=1e-13
    )
    with pytest.raises(ValueError, match="0 <= x <= 1"):
        regularized_incomplete_beta(1.0, 1.0, 1.5)


def test_mean_ci_by_hand() -> None:
    # [1, 2, 3]: mean 2, s = 1, half width = t_{0.975,2} / sqrt(3) = 4.3026527 / 1.7320508.
    interval = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729749 / math.sqrt(3)
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.low == pytest.approx(2 - half, abs=1e-9)
    assert interval.high == pytest.approx(2 + half, abs=1e-9)
    single = mean_ci([4.5])
    assert (single.low, single.mean, single.high, single.n) == (4.5, 4.5, 4.5, 1)


def test_welch_two_sided_p_by_hand() -> None:
    """a = [1, 3], b = [4, 6]: means 2 and 5, variances 2 and 2, so se² = 1 + 1, t = −3/√2,
    Welch df = 2² / (1²/1 + 1²/1) = 2, and with df = 2 the two-sided p = 1 − |t|/√(2 + t²)
    = 1 − 2.1213/2.5495 = 0.16795."""
    result = welch_t_test([1.0, 3.0], [4.0, 6.0])
    assert result.t == pytest.approx(-3 / math.sqrt(2), abs=1e-12)
    assert result.df == pytest.approx(2.0, abs=1e-12)
    assert result.p_value == pytest.approx(1 - (3 / math.sqrt(2)) / math.sqrt(6.5), abs=1e-12)
    assert result.p_value == pytest.approx(0.167950, abs=1e-6)


def test_welch_unequal_variances() -> None:
    """[1..5] vs [2,4,..,10]: t = −3/√2.5, df = 2.5² / (0.5²/4 + 2²/4) = 100/17; p then is
    the df-100/17 two-sided tail, checked against the independent integral above."""
    result = welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert result.t == pytest.approx(-3 / math.sqrt(2.5), abs=1e-12)
    assert result.df == pytest.approx(100 / 17, abs=1e-12)
    assert result.p_value == pytest.approx(2 * (1 - t_cdf(3 / math.sqrt(2.5), 100 / 17)), abs=1e-13)
    assert 0.10 < result.p_value < 0.11


def test_welch_degenerate_and_invalid_inputs() -> None:
    assert welch_t_test([2.0, 2.0], [2.0, 2.0]).p_value == 1.0
    assert welch_t_test([2.0, 2.0], [3.0, 3.0]).p_value == 0.0
    identical_groups = welch_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert identical_groups.t == 0.0 and identical_groups.p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match=">= 2 values"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        sample_variance([1.0])
    with pytest.raises(ValueError, match="no values"):
        mean([])
    assert t_two_sided_p(math.inf, 3) == 0.0
