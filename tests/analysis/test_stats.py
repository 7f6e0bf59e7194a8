"""Bootstrap intervals and paired tests on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.stats import bootstrap_interval, mcnemar_exact, paired_test


def test_mcnemar_matches_the_hand_computed_binomial_tail() -> None:
    # 10 prompts only A got right, 2 only B: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(6, 6) == 1.0  # capped: the two tails overlap in the middle
    assert mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_exact(-1, 3)


def test_bootstrap_interval_covers_the_known_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 500, 5000):
        values = rng.normal(loc=3.0, scale=2.0, size=n)
        interval = bootstrap_interval(values)
        assert interval.n == n and interval.mean == pytest.approx(values.mean())
        assert interval.low < 3.0 < interval.high
        # The width of a 95% interval of a mean is about 2 * 1.96 * sd / sqrt(n).
        assert interval.high - interval.low == pytest.approx(2 * 1.96 * 2.0 / math.sqrt(n), rel=0.2)
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_interval_is_repeatable_and_skips_nan() -> None:
    values = [1.0, 0.0, 1.0, math.nan, 1.0]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values).n == 4 and bootstrap_interval(values).mean == 0.75
    empty = bootstrap_interval([math.nan])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_paired_exact_match_uses_mcnemar() -> None:
    # 300 prompts: both right on 200, both wrong on 68, only A on 24, only B on 8.
    a = np.array([1] * 200 + [0] * 68 + [1] * 24 + [0] * 8, dtype=float)
    b = np.array([1] * 200 + [0] * 68 + [0] * 24 + [1] * 8, dtype=float)
    test = paired_test(a, b, binary=True)
    assert test.test == "mcnemar" and test.n == 300
    assert test.delta == pytest.approx(16 / 300)
    assert test.p_value == pytest.approx(mcnemar_exact(24, 8)) and test.p_value < 0.01
    assert test.verdict == "better" and test.low < 16 / 300 < test.high and test.low > 0
    reverse = paired_test(b, a, binary=True)
    assert reverse.verdict == "worse" and reverse.p_value == test.p_value


def test_a_small_difference_is_a_tie() -> None:
    a = np.array([1] * 10 + [0] * 10, dtype=float)
    b = np.array([1] * 9 + [0] * 11, dtype=float)
    test = paired_test(a, b, binary=True)
    assert test.verdict == "tie" and test.p_value == 1.0


def test_paired_bootstrap_separates_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(20, 80, size=200)
    shifted = base + 3.0 + rng.normal(0, 5, size=200)
    better = paired_test(shifted, base, binary=False)
    assert better.test == "paired_bootstrap" and better.verdict == "better" and better.p_value < 0.01
    assert better.low < 3.0 < better.high
    same = paired_test(base + rng.normal(0, 5, size=200), base, binary=False)
    assert same.verdict == "tie" and same.p_value > 0.05


def test_paired_test_refuses_mismatched_or_non_binary_scores() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0, 0.0], [1.0], binary=True)
    with pytest.raises(ValueError, match="0 and 1"):
        paired_test([0.5, 1.0], [1.0, 0.0], binary=True)
