"""Importance-weighted affine quantization (the AWQ clipping fit) in MLX's format."""

import mlx.core as mx
import numpy as np
import pytest

from mixquant.quant.fit import fake_quantize, quantize


def _weighted_group_errors(w, wq, importance, group_size):
    err = importance[None, :] * np.square(w - wq)
    return err.reshape(w.shape[0], -1, group_size).sum(-1)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_never_worse_than_min_max_on_the_weighted_error(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(4, size=(48, 256)).astype(np.float32)
    importance = rng.gamma(0.5, size=256) + 1e-3
    plain = fake_quantize(w, bits, 64, mx.float32)
    weighted = fake_quantize(w, bits, 64, mx.float32, importance)
    e_plain = _weighted_group_errors(w, plain, importance, 64)
    e_weighted = _weighted_group_errors(w, weighted, importance, 64)
    assert np.all(e_weighted <= e_plain * (1 + 1e-5) + 1e-12)
    assert e_weighted.sum() < 0.97 * e_plain.sum()


def _reference_group(w, importance, bits, dtype):
    """One group, the slow way: every clip ratio, a scalar weighted least-squares fit of scale and
    bias to mx.quantize's codes, both rounded to `dtype`; the candidate with the least weighted error."""
    from mixquant.quant.fit import CLIP_RATIOS

    lo, hi = w.min(), w.max()
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    best = None
    for ratio in CLIP_RATIOS:
        clipped = np.clip(w, centre - ratio * half, centre + ratio * half)
        q, s, b = mx.quantize(mx.array(clipped[None].astype(np.float32)).astype(dtype), group_size=len(w), bits=bits)
        ones = mx.ones((1, 1))
        codes = np.array(mx.dequantize(q, ones, mx.zeros((1, 1)), group_size=len(w), bits=bits))[0].astype(np.float64)
        sw, sc, scc = importance.sum(), (importance * codes).sum(), (importance * codes**2).sum()
        sy, scy = (importance * w).sum(), (importance * codes * w).sum()
        scale = (sw * scy - sc * sy) / (sw * scc - sc * sc)
        bias = (sy - scale * sc) / sw
        scale, bias = (float(mx.array(np.float32(v)).astype(dtype).astype(mx.float32)) for v in (scale, bias))
        deq = scale * codes + bias
        err = float((importance * (w - deq) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, deq)
    return best[1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weighted_fit_equals_a_group_by_group_reference(bits):
    rng = np.random.default_rng(10 + bits)
    w = rng.standard_t(3, size=(3, 128)).astype(np.float32).astype(np.float64)
    importance = rng.gamma(0.7, size=128) + 1e-2
    q, s, b = quantize(w.astype(np.float32), bits, 64, mx.bfloat16, importance)
    assert (q.shape, q.dtype, s.dtype) == ((3, 128 * bits // 32), mx.uint32, mx.bfloat16)
    s32, b32 = s.astype(mx.float32), b.astype(mx.float32)  # dequantized in bf16 the values would be rounded again
    got = np.array(mx.dequantize(q, s32, b32, group_size=64, bits=bits)).astype(np.float64)
    for r in range(3):
        for g in range(2):
            cols = slice(64 * g, 64 * (g + 1))
            want = _reference_group(w[r, cols], importance[cols], bits, mx.bfloat16)
            np.testing.assert_allclose(got[r, cols], want, rtol=1e-5, atol=1e-6)


def test_an_important_channel_is_kept_almost_exactly():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 64)).astype(np.float32)
    importance = np.full(64, 1e-6)
    importance[5] = 1.0
    weighted = fake_quantize(w, 2, 64, mx.float32, importance)
    plain = fake_quantize(w, 2, 64, mx.float32)
    assert np.abs(weighted[:, 5] - w[:, 5]).max() < 0.05 * np.abs(plain[:, 5] - w[:, 5]).max()


def test_constant_and_zero_groups_stay_finite():
    w = np.zeros((2, 128), np.float32)
    w[1, :64] = 0.75
    out = fake_quantize(w, 4, 64, mx.float32, np.ones(128))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, w, atol=1e-6)
