"""Intervals, McNemar's exact test and the paired bootstrap of mixquant.tasks.stats."""

import math

import numpy as np
import pytest

from mixquant.tasks import stats


def test_mcnemar_is_the_exact_binomial_on_discordant_pairs():
    a = [1] * 10 + [0] * 5
    b = [0] * 10 + [0] * 5
    assert stats.mcnemar_p(a, b) == pytest.approx(2 / 2**10)
    # 7 discordant one way, 2 the other: 2 * P(X <= 2), X ~ Bin(9, 1/2)
    a = [1] * 7 + [0] * 2 + [1] * 4
    b = [0] * 7 + [1] * 2 + [1] * 4
    assert stats.mcnemar_p(a, b) == pytest.approx(2 * sum(math.comb(9, i) for i in range(3)) / 2**9)
    assert stats.mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0


def test_interval_brackets_the_mean_and_narrows_with_items():
    rng = np.random.default_rng(0)
    small = stats.interval(rng.integers(0, 2, 20))
    large = stats.interval(rng.integers(0, 2, 2000))
    for s in (small, large):
        assert s["low"] <= s["mean"] <= s["high"]
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 4
    assert stats.interval([1, 1, 1]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    assert stats.interval([])["n"] == 0


def test_paired_difference_cancels_shared_items_and_picks_its_test():
    same = stats.paired([1, 0, 1, 1], [1, 0, 1, 1])
    assert same["diff"] == 0 and same["p"] == 1.0 and same["test"] == "mcnemar"
    graded = stats.paired([1.0, 0.5, 0.5, 1.0], [1.0, 0.5, 0.5, 1.0])
    assert graded["test"] == "bootstrap" and graded["p"] == 1.0
    better = stats.paired([1.0] * 30 + [0.5] * 10, [0.0] * 30 + [0.5] * 10)
    assert better["diff"] == pytest.approx(0.75) and better["p"] < 0.001 and better["low"] > 0.5
    noise = stats.paired([1, 0] * 20, [0, 1] * 20)
    assert noise["diff"] == 0 and noise["p"] == 1.0 and noise["low"] < 0 < noise["high"]
    with pytest.raises(ValueError, match="same items"):
        stats.paired([1, 0], [1])


def test_the_same_scores_give_the_same_report():
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    assert stats.paired(a, b) == stats.paired(a, b)
