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


CHUNK = 1 << 18  # weights per candidate set evaluated at once (small enough that the float64 temporaries stay in cache)


def _quantize_weighted(w: np.ndarray, bits: int, group_size: int, dtype, importance: np.ndarray):
    import mlx.core as mx

    rows, n = w.shape
    imp = np.broadcast_to(np.maximum(importance.astype(np.float64), 0).reshape(-1, n), (rows, n))
    step = max(1, CHUNK // (n * len(CLIP_RATIOS)))
    parts = [_weighted_rows(w[r:r + step], imp[r:r + step], bits, group_size, dtype) for r in range(0, rows, step)]
    packed, scale, bias = (np.concatenate(x) for x in zip(*parts))
    return (mx.array(packed), mx.array(scale.astype(np.float32)).astype(dtype),
            mx.array(bias.astype(np.float32)).astype(dtype))


def _weighted_rows(w: np.ndarray, importance: np.ndarray, bits: int, group_size: int, dtype):
    """(packed codes, scales, biases) NumPy of rows w [rows, n]: every clip ratio's candidate from one
    mx.quantize call, the least weighted error's kept (the first ratio of those that tie)."""
    import mlx.core as mx

    rows, n = w.shape
    groups, k = n // group_size, len(CLIP_RATIOS)
    wg = w.reshape(rows, groups, group_size)
    imp = importance.reshape(rows, groups, group_size)
    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    ratio = np.asarray(CLIP_RATIOS).reshape(-1, 1, 1, 1)
    clipped = np.clip(wg[None], centre - ratio * half, centre + ratio * half).reshape(k * rows, n)
    q, s, b = mx.quantize(mx.array(clipped.astype(np.float32)).astype(dtype), group_size=group_size, bits=bits)
    ones = mx.ones((k * rows, groups), dtype=mx.float32)
    codes = mx.dequantize(q, ones, mx.zeros_like(ones), group_size=group_size, bits=bits)
    codes = np.array(codes).reshape(k, rows, groups, group_size).astype(np.float64)
    s0 = np.array(s.astype(mx.float32)).reshape(k, rows, groups)
    b0 = np.array(b.astype(mx.float32)).reshape(k, rows, groups)
    scale, bias = _weighted_fit(wg[None], codes, imp[None], s0, b0)
    scale, bias = _round_to(scale, dtype), _round_to(bias, dtype)
    err = (imp[None] * np.square(wg[None] - scale[..., None] * codes - bias[..., None])).sum(-1)
    pick = np.argmin(err, axis=0)[None]  # [1, rows, groups]
    packed = np.array(q).reshape(k, rows, groups, -1)
    return (np.take_along_axis(packed, pick[..., None], axis=0)[0].reshape(rows, -1),
            np.take_along_axis(scale, pick, axis=0)[0], np.take_along_axis(bias, pick, axis=0)[0])


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
