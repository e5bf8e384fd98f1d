"""Acceptance: the metrics agree with an independent float64 computation to 1e-6."""

import math

import numpy as np
import pytest

from mixquant.eval import metrics


def independent(ref_logits, q_logits, targets):
    """Straightforward float64 loops, written apart from mixquant.eval.metrics."""
    kld, same, nll_r, nll_q, dp = [], [], [], [], []
    for r, q, t in zip(ref_logits.astype(np.float64), q_logits.astype(np.float64), targets):
        pr = np.exp(r - r.max()); pr /= pr.sum()
        pq = np.exp(q - q.max()); pq /= pq.sum()
        kld.append(float(np.sum(pr * (np.log(pr) - np.log(pq)))))
        same.append(int(np.argmax(pr) == np.argmax(pq)))
        nll_r.append(-math.log(pr[t])); nll_q.append(-math.log(pq[t]))
        dp.append(pq[t] - pr[t])
    kld = np.array(kld)
    return {
        "mean": kld.mean(), "stderr": kld.std(ddof=1) / math.sqrt(len(kld)), "median": np.median(kld),
        "p99": np.percentile(kld, 99), "max": kld.max(), "same_top": np.mean(same),
        "ppl_ref": math.exp(np.mean(nll_r)), "ppl_q": math.exp(np.mean(nll_q)),
        "dp_mean": np.mean(dp), "dp_rms": math.sqrt(np.mean(np.square(dp))),
    }


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((300, 1000)).astype(np.float32) * 3
    q = ref + rng.standard_normal(ref.shape).astype(np.float32) * 0.3
    targets = rng.integers(0, 1000, 300)
    return ref, q, targets


def test_full_distribution_metrics_match_float64(logits):
    ref, q, targets = logits
    per_token = metrics.token_metrics(metrics.log_softmax(ref), metrics.log_softmax(q), targets)
    got = metrics.summarize(per_token)
    want = independent(ref, q, targets)
    for key, value in [("mean", got["kld"]["mean"]), ("stderr", got["kld"]["stderr"]),
                       ("median", got["kld"]["median"]), ("p99", got["kld"]["p99"]), ("max", got["kld"]["max"]),
                       ("same_top", got["same_top"]), ("dp_mean", got["delta_p"]["mean"]),
                       ("dp_rms", got["delta_p"]["rms"])]:
        assert abs(value - want[key]) <= 1e-6, key
    assert abs(got["ppl"]["reference"] - want["ppl_ref"]) <= 1e-6 * want["ppl_ref"]
    assert abs(got["ppl"]["model"] - want["ppl_q"]) <= 1e-6 * want["ppl_q"]
    assert got["tokens"] == 300


def test_topk_with_all_tokens_is_exact(logits):
    ref, q, targets = logits
    ref_lp, q_lp = metrics.log_softmax(ref), metrics.log_softmax(q)
    order = np.argsort(-ref_lp, axis=-1)
    topk = metrics.token_metrics_topk(order, np.take_along_axis(ref_lp, order, -1),
                                      ref_lp[np.arange(300), targets], q_lp, targets)
    full = metrics.token_metrics(ref_lp, q_lp, targets)
    np.testing.assert_allclose(topk["kld"], full["kld"], atol=1e-9)
    np.testing.assert_array_equal(topk["same_top"], full["same_top"])


def test_topk_tail_lumping_is_a_lower_bound_and_close(logits):
    ref, q, targets = logits
    ref_lp, q_lp = metrics.log_softmax(ref), metrics.log_softmax(q)
    order = np.argsort(-ref_lp, axis=-1)[:, :64]
    topk = metrics.token_metrics_topk(order, np.take_along_axis(ref_lp, order, -1),
                                      ref_lp[np.arange(300), targets], q_lp, targets)
    full = metrics.token_metrics(ref_lp, q_lp, targets)
    assert np.all(topk["kld"] <= full["kld"] + 1e-12)
    assert topk["kld"].mean() > 0.5 * full["kld"].mean()
