"""Per-token quality metrics of a candidate against a reference, in float64 numpy.

Per scored token: KL(p_ref || p_q) = sum_v p_ref (log p_ref - log p_q), whether both models put
the same token on top, the probability each gives the correct next token, and their NLLs. With a
top-K reference (saved to keep files small), the K kept tokens are exact and the rest of the
vocabulary is lumped into one tail bucket on each side, which can only lower the KLD.
"""

from __future__ import annotations

import math

import numpy as np

PERCENTILES = {"median": 50, "p90": 90, "p95": 95, "p99": 99, "p999": 99.9}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_per_token(ref_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_q) per row of full-vocabulary log-probs, unclamped."""
    return (np.exp(ref_lp) * (ref_lp - q_lp)).sum(axis=-1)


def token_metrics(ref_lp: np.ndarray, q_lp: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Full distributions: ref_lp, q_lp [n, V] log-probs (float64); targets [n] token ids."""
    kld = kl_per_token(ref_lp, q_lp)
    rows = np.arange(len(targets))
    return {
        "kld": np.maximum(kld, 0.0),
        "same_top": ref_lp.argmax(-1) == q_lp.argmax(-1),
        "nll_ref": -ref_lp[rows, targets],
        "nll_q": -q_lp[rows, targets],
    }


def token_metrics_topk(top_ids: np.ndarray, top_lp: np.ndarray, target_lp_ref: np.ndarray, q_lp: np.ndarray,
                       targets: np.ndarray) -> dict[str, np.ndarray]:
    """Top-K reference: top_ids/top_lp [n, K] sorted by probability, target_lp_ref [n]; q_lp [n, V]."""
    p_top = np.exp(top_lp)
    q_top_lp = np.take_along_axis(q_lp, top_ids, axis=-1)
    kld = (p_top * (top_lp - q_top_lp)).sum(-1)
    p_tail = np.clip(1.0 - p_top.sum(-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_top_lp).sum(-1), 1e-300, 1.0)
    tail = np.where(p_tail > 0, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)), 0.0)
    rows = np.arange(len(targets))
    return {
        "kld": np.maximum(kld + tail, 0.0),
        "same_top": top_ids[:, 0] == q_lp.argmax(-1),
        "nll_ref": -np.asarray(target_lp_ref, dtype=np.float64),
        "nll_q": -q_lp[rows, targets],
    }


def summarize(per_token: dict[str, np.ndarray]) -> dict:
    """The report: KLD distribution, same-top rate, delta-p of the correct token, perplexities."""
    kld = per_token["kld"]
    n = len(kld)
    if n == 0:
        raise ValueError("no scored tokens")
    dp = np.exp(-per_token["nll_q"]) - np.exp(-per_token["nll_ref"])
    ppl_q = math.exp(per_token["nll_q"].mean())
    ppl_ref = math.exp(per_token["nll_ref"].mean())
    stats = {"mean": float(kld.mean()), "stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0}
    stats.update({k: float(np.percentile(kld, q)) for k, q in PERCENTILES.items()})
    stats["max"] = float(kld.max())
    return {
        "kld": stats,
        "same_top": float(per_token["same_top"].mean()),
        "delta_p": {"mean": float(dp.mean()), "rms": float(np.sqrt((dp**2).mean()))},
        "ppl": {"model": ppl_q, "reference": ppl_ref, "ratio": ppl_q / ppl_ref},
        "tokens": n,
    }


def concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def percent_interval(score: dict) -> str:
    """A score {"mean", "low", "high"} (fractions) as "mean (low-high)" in %."""
    return f"{100 * score['mean']:.1f} ({100 * score['low']:.1f}-{100 * score['high']:.1f})"


def percent_difference(d: dict) -> str:
    """A paired difference {"diff", "low", "high"} (fractions) as "diff (low to high)" in %."""
    return f"{100 * d['diff']:.1f} ({100 * d['low']:.1f} to {100 * d['high']:.1f})"
