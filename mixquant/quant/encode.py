"""A block of float32 rows turned into what the output file holds: the float dtype's raw words, or
MLX affine codes with their scales and biases."""

from __future__ import annotations

import numpy as np

from mixquant.quant import fit

DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def mx_dtype(tag: str):
    import mlx.core as mx

    return getattr(mx, DTYPE_NAMES[tag])


def _raw_view(tag: str):
    # MLX has no numpy bfloat16: such arrays leave MLX viewed as their raw 16-bit words.
    import mlx.core as mx

    return {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32}[tag]


def encode(block: np.ndarray, entry, fit_importance: np.ndarray | None = None) -> list[np.ndarray]:
    """The arrays of `entry.out_specs()` for this block of rows."""
    import mlx.core as mx

    if not entry.quantized:
        x = mx.array(np.ascontiguousarray(block, dtype=np.float32)).astype(mx_dtype(entry.dtype))
        out = [x.view(_raw_view(entry.dtype))]
    else:
        w, scales, biases = fit.quantize(block, entry.bits, entry.group_size, mx_dtype(entry.dtype), fit_importance)
        view = _raw_view(entry.dtype)
        out = [w, scales.view(view), biases.view(view)]
    mx.eval(out)
    return [np.array(a, copy=False) for a in out]


def encode_floats(arrays: list[np.ndarray], tag: str) -> list[np.ndarray]:
    """float32 arrays as the raw words of the float dtype `tag` (scales and biases computed elsewhere)."""
    import mlx.core as mx

    out = [mx.array(np.ascontiguousarray(a, dtype=np.float32)).astype(mx_dtype(tag)).view(_raw_view(tag))
           for a in arrays]
    mx.eval(out)
    return [np.array(a, copy=False) for a in out]
