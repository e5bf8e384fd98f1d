"""Affine group quantization in MLX's format (codes, scale, bias per group of `group_size` inputs),
plain or importance-weighted.

Plain is `mx.quantize`: each group's range is its min..max. Weighted is the AWQ paper's clipping
step done with MLX's affine format: for each group, try shrinking the range around its centre by
the ratios in CLIP_RATIOS, refit scale and bias by weighted least squares on the codes that range
gives, and keep the candidate with the least sum over inputs j of importance_j * error_j^2, the
expected squared output error under the calibration activations (importance = mean x_j^2). The
codes are MLX's own, so the result loads anywhere MLX quantized weights load.
"""

from __future__ import annotations

import numpy as np

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize(w: np.ndarray, bits: int, group_size: int, dtype, importance: np.ndarray | None = None):
    """(packed codes, scales, biases) as MLX arrays, scales and biases in `dtype`; `importance` per
    input column [n], or per row and column [rows, n]."""
    import mlx.core as mx

    x = mx.array(np.ascontiguousarray(w, dtype=np.float32)).astype(dtype)
    if importance is None:
        return mx.quantize(x, group_size=group_size, bits=bits)
    return _quantize_weighted(w.astype(np.float64), bits, group_size, dtype, importance)


def fake_quantize(w: np.ndarray, bits: int, group_size: int, dtype, importance: np.ndarray | None = None):
    """w after a quantize/dequantize round trip, float32."""
    import mlx.core as mx

    q, s, b = quantize(w, bits, group_size, dtype, importance)
    return np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits).astype(mx.float32))


def _round_to(a: np.ndarray, dtype) -> np.ndarray:
    import mlx.core as mx

    return np.array(mx.array(a.astype(np.float32)).astype(dtype).astype(mx.float32)).astype(np.float64)


def _quantize_weighted(w: np.ndarray, bits: int, group_size: int, dtype, importance: np.ndarray):
    import mlx.core as mx

    rows, n = w.shape
    groups = n // group_size
    wg = w.reshape(rows, groups, group_size)
    imp = np.broadcast_to(np.maximum(importance.astype(np.float64), 0).reshape(-1, groups, group_size), wg.shape)
    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    ones = mx.ones((rows, groups), dtype=mx.float32)
    best = None
    for ratio in CLIP_RATIOS:
        clipped = np.clip(wg, centre - ratio * half, centre + ratio * half).reshape(rows, n)
        q, s, b = mx.quantize(mx.array(clipped.astype(np.float32)).astype(dtype), group_size=group_size, bits=bits)
        codes = np.array(mx.dequantize(q, ones, mx.zeros_like(ones), group_size=group_size, bits=bits))
        codes = codes.reshape(wg.shape).astype(np.float64)
        scale, bias = _weighted_fit(wg, codes, imp, np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32)))
        scale, bias = _round_to(scale, dtype), _round_to(bias, dtype)
        err = (imp * np.square(wg - scale[..., None] * codes - bias[..., None])).sum(-1)
        packed = np.array(q).reshape(rows, groups, -1)
        if best is None:
            best = [err, packed, scale, bias]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better[..., None], packed, best[1])
        best[2] = np.where(better, scale, best[2])
        best[3] = np.where(better, bias, best[3])
    _, packed, scale, bias = best
    return (mx.array(packed.reshape(rows, -1)), mx.array(scale.astype(np.float32)).astype(dtype),
            mx.array(bias.astype(np.float32)).astype(dtype))


def _weighted_fit(w, codes, imp, scale0, bias0):
    """Per group, the (scale, bias) minimising sum imp * (w - scale * code - bias)^2; where the codes
    are all equal (or every weight is zero) the fit is degenerate and mx.quantize's pair is kept."""
    sw, sc, scc = imp.sum(-1), (imp * codes).sum(-1), (imp * codes * codes).sum(-1)
    sy, scy = (imp * w).sum(-1), (imp * codes * w).sum(-1)
    det = sw * scc - sc * sc
    ok = (det > 1e-9 * np.maximum(sw * scc, 1e-300)) & (sw > 0)
    safe_det, safe_sw = np.where(ok, det, 1.0), np.where(ok, sw, 1.0)
    scale = np.where(ok, (sw * scy - sc * sy) / safe_det, scale0)
    bias = np.where(ok, (sy - scale * sc) / safe_sw, bias0)
    return scale, bias
