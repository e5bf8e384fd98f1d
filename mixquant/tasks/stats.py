"""Whether a task score, and a difference between two models' scores on the same items, is real.

Scores are per item, in [0, 1] (a 2/1/0 scenario score is divided by 2). A score's 95% interval is
the percentile interval of a bootstrap over items; the paired difference resamples the same items
for both models, so that what both get right or wrong cancels. Its two-sided p-value is McNemar's
exact test when every score is 0 or 1, and otherwise the paired bootstrap's (the share of
resampled mean differences, recentred on zero, at least as far from it as the one observed). Pure NumPy, seeded: the same scores give
the same report.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


def _resampled_means(scores: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scores), size=(RESAMPLES, len(scores)))
    return scores[picks].mean(axis=1)


def interval(scores, seed: int = 0) -> dict:
    """{"mean", "low", "high", "n"}: the mean score and its 95% bootstrap interval."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    means = _resampled_means(s, seed)
    tail = (1 - LEVEL) / 2 * 100
    return {"mean": float(s.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "n": int(s.size)}


def mcnemar_p(a, b) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: a binomial test on the discordant pairs."""
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(candidate, reference, seed: int = 0) -> dict:
    """{"diff", "low", "high", "p", "test", "n"}: candidate minus reference on the same items, its
    95% paired bootstrap interval and p-value."""
    c, r = np.asarray(candidate, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"paired scores need the same items: {c.shape} against {r.shape}")
    if c.size == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan"),
                "test": "none", "n": 0}
    d = c - r
    means = _resampled_means(d, seed)
    tail = (1 - LEVEL) / 2 * 100
    binary = bool(np.all(np.isin(c, (0.0, 1.0))) and np.all(np.isin(r, (0.0, 1.0))))
    if binary:
        p, test = mcnemar_p(c, r), "mcnemar"
    elif not d.any():
        p, test = 1.0, "bootstrap"
    else:
        # the bootstrap distribution recentred on zero: how often a no-difference world looks this far off
        centred = means - d.mean()
        p, test = float(min(1.0, np.mean(np.abs(centred) >= abs(d.mean())))), "bootstrap"
    return {"diff": float(d.mean()), "low": float(np.percentile(means, tail)),
            "high": float(np.percentile(means, 100 - tail)), "p": float(p), "test": test, "n": int(d.size)}
