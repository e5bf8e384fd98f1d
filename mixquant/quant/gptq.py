"""GPTQ in MLX's affine format: each column's rounding error is compensated on the columns not yet
rounded, through the calibration Hessian H = E[x x^T] of the layer's input.

Columns are taken in order of decreasing H diagonal (act-order) and in blocks with lazy updates, as
in the paper. MLX stores a scale and a bias per group of `group_size` consecutive input columns;
a group's pair is chosen when the first of its columns comes up in the (permuted) order, from all
its columns as the compensation has left them by then, and is kept for its later columns: the
clipping fit of mixquant.quant.fit weighted by the Hessian's diagonal (or, with fit=False,
mx.quantize's own min..max). The codes are packed in MLX's layout (a little-endian bit stream per
row), so `mlx_lm.load` reads the result unchanged.
"""

from __future__ import annotations

import numpy as np

DAMP = 0.01  # of the mean Hessian diagonal, added to the diagonal
BLOCK = 128


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing of integer codes [rows, n] (values < 2**bits): uint32 [rows, n * bits / 32]."""
    rows, n = codes.shape
    bitplanes = (codes.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    packed = np.packbits(bitplanes.astype(np.uint8).reshape(rows, n * bits), axis=1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4").reshape(rows, n * bits // 32)


def _group_params(w: np.ndarray, bits: int, dtype, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The scale and bias for one group's columns w [rows, group_size], as float32 values of `dtype`:
    MLX's own (min..max), or with `importance` (the Hessian's diagonal on these columns) the
    clipping fit of mixquant.quant.fit."""
    import mlx.core as mx

    from mixquant.quant.fit import quantize

    _, s, b = quantize(np.ascontiguousarray(w, dtype=np.float32), bits, w.shape[1], dtype, importance)
    return np.array(s.astype(mx.float32))[:, 0], np.array(b.astype(mx.float32))[:, 0]


def prepare(hessian: np.ndarray, damp: float = DAMP, act_order: bool = True):
    """(dead inputs, act-order permutation, upper Cholesky factor of H^-1 in that order, the damped
    H's diagonal in the inputs' order) of one matrix's Hessian [n, n]."""
    h = np.array(hessian, dtype=np.float64)
    n = h.shape[0]
    dead = np.diag(h) <= 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    h[np.diag_indices(n)] += damp * float(np.mean(np.diag(h)))
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(n)
    return dead, perm, np.linalg.cholesky(np.linalg.inv(h[np.ix_(perm, perm)])).T, np.diag(h).copy()


def gptq(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int, dtype, act_order: bool = True,
         damp: float = DAMP, fit: bool = True):
    """(packed codes, scales, biases) in MLX's format (scales and biases as float32 values of `dtype`),
    and the dequantized weights [out, in] float32."""
    w = np.array(w, dtype=np.float64)
    rows, n = w.shape
    dead, perm, hinv, diag = prepare(hessian, damp, act_order)
    w[:, dead] = 0.0
    w = w[:, perm]
    maxq = 2**bits - 1
    groups = n // group_size
    scales, biases = np.zeros((rows, groups)), np.zeros((rows, groups))
    have = np.zeros(groups, bool)
    codes = np.zeros((rows, n), np.int64)
    position = np.empty(n, np.int64)
    position[perm] = np.arange(n)  # where each original column sits in the permuted order
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        wb, err = w[:, b0:b1].copy(), np.zeros((rows, b1 - b0))
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            g = perm[b0 + i] // group_size
            if not have[g]:  # first column of its group: the pair from the group as compensated so far
                members = position[g * group_size : (g + 1) * group_size]
                later = members >= b1
                current = np.empty((rows, group_size))
                current[:, ~later] = wb[:, members[~later] - b0]
                current[:, later] = w[:, members[later]] - err[:, :i] @ hinv[b0 : b0 + i][:, members[later]]
                importance = diag[perm[members]] if fit else None
                scales[:, g], biases[:, g] = _group_params(current, bits, dtype, importance)
                have[g] = True
            s, bias = scales[:, g], biases[:, g]
            q = np.clip(np.round((wb[:, i] - bias) / np.where(s == 0, 1.0, s)), 0, maxq)
            codes[:, b0 + i] = q
            deq = s * q + bias
            e = (wb[:, i] - deq) / hb[i, i]
            wb[:, i:] -= np.outer(e, hb[i, i:])
            err[:, i] = e
            w[:, b0 + i] = deq
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    inverse = np.argsort(perm)
    return (pack_codes(codes[:, inverse], bits), scales.astype(np.float32), biases.astype(np.float32),
            w[:, inverse].astype(np.float32))
