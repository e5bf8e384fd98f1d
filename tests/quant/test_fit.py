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


def test_output_is_mlx_format():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    q, s, b = quantize(w, 3, 64, mx.bfloat16, np.ones(128))
    ref_q, ref_s, ref_b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=3)
    assert (q.shape, q.dtype, s.shape, s.dtype, b.shape) == (ref_q.shape, ref_q.dtype, ref_s.shape, ref_s.dtype,
                                                             ref_b.shape)
    deq = np.array(mx.dequantize(q, s, b, group_size=64, bits=3).astype(mx.float32))
    assert np.abs(deq - w).max() < 1.0


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
