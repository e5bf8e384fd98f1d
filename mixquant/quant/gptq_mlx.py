"""GPTQ in MLX, on the default device, for a stack of matrices at once (an MoE's experts, or one
plain linear as a stack of one): the algorithm of mixquant.quant.gptq (its NumPy float64 form is the
reference the tests compare against), in float32.

Per matrix, the Hessian's preparation (mixquant.quant.gptq.prepare: dead inputs, damping, act-order,
the upper Cholesky factor of its inverse) is n x n work done in NumPy float64, shared with the reference. The columns are then rounded in blocks of BLOCK with
lazy updates, every matrix of the stack in the same step: column c of each matrix's own act-order.
A group's scale and bias are fitted when the first of its columns comes up in a matrix's order, from
the group as compensation has left it by then; the matrices whose groups start at the same column
are fitted together (mixquant.quant.fit with one importance row per matrix)."""

from __future__ import annotations

import numpy as np

from mixquant.quant.gptq import BLOCK, DAMP, pack_codes, prepare


def gptq_stack(w, hessians: np.ndarray, bits: int, group_size: int, dtype, act_order: bool = True,
               damp: float = DAMP, fit: bool = True):
    """w [E, rows, n] (any array), hessians [E, n, n]: (packed codes [E, rows, n*bits/32] uint32, scales
    and biases [E, rows, n/group_size] as float32 values of `dtype`, dequantized weights [E, rows, n]
    float32), NumPy arrays, as mixquant.quant.gptq.gptq gives them for each matrix."""
    import mlx.core as mx

    w = np.array(w, dtype=np.float32)
    stack, rows, n = w.shape
    groups = n // group_size
    prepared = [prepare(h, damp, act_order) for h in hessians]
    dead = np.stack([p[0] for p in prepared])
    perm = np.stack([p[1] for p in prepared])
    hinv = mx.array(np.stack([p[2] for p in prepared]).astype(np.float32))
    diag = np.stack([p[3] for p in prepared])
    w = np.where(dead[:, None, :], 0.0, w).astype(np.float32)
    position = np.argsort(perm, axis=1)  # where each original column sits in its matrix's order
    member_pos = position.reshape(stack, groups, group_size)  # [E, G, group_size]
    starts = member_pos.min(axis=2)  # the column at which each group's pair is fitted
    events: dict[int, list[tuple[int, int]]] = {}
    for e in range(stack):
        for g in range(groups):
            events.setdefault(int(starts[e, g]), []).append((e, g))
    col_group = perm // group_size  # [E, n]: the group of each column of the order
    maxq = 2**bits - 1
    W = mx.array(np.take_along_axis(w, perm[:, None, :], axis=2))  # in each matrix's order
    scales = np.zeros((stack, rows, groups), np.float32)
    biases = np.zeros((stack, rows, groups), np.float32)
    codes, deqs = [], []
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        wb = W[:, :, b0:b1]
        hb = hinv[:, b0:b1, b0:b1]
        errs = []
        s_cols = b_cols = None
        for i in range(b1 - b0):
            c = b0 + i
            if c in events or s_cols is None:
                if c in events:
                    _fit_groups(events[c], W, wb, errs, hinv, member_pos, diag, b0, b1, bits, group_size, dtype, fit,
                                scales, biases)
                gather = col_group[:, b0:b1]  # [E, B]
                s_cols = mx.array(np.take_along_axis(scales, gather[:, None, :], axis=2))
                b_cols = mx.array(np.take_along_axis(biases, gather[:, None, :], axis=2))
            s, bias = s_cols[:, :, i], b_cols[:, :, i]
            x = wb[:, :, i]
            q = mx.clip(mx.round((x - bias) / mx.where(s == 0, 1.0, s)), 0, maxq)
            deq = s * q + bias
            err = (x - deq) / hb[:, i, i][:, None]
            wb = mx.concatenate([wb[:, :, :i], deq[:, :, None], wb[:, :, i + 1:] - err[:, :, None] * hb[:, None, i, i + 1:]],
                                axis=2)
            errs.append(err)
            codes.append(q)
            deqs.append(deq)
        err_block = mx.stack(errs, axis=2)
        W = mx.concatenate([W[:, :, :b0], wb, W[:, :, b1:] - err_block @ hinv[:, b0:b1, b1:]], axis=2)
        mx.eval(W, codes[b0:b1], deqs[b0:b1])
    order = np.argsort(perm, axis=1)
    q = np.take_along_axis(np.array(mx.stack(codes, axis=2)).astype(np.int64), order[:, None, :], axis=2)
    d = np.take_along_axis(np.array(mx.stack(deqs, axis=2)), order[:, None, :], axis=2)
    packed = np.stack([pack_codes(q[e], bits) for e in range(stack)])
    return packed, scales, biases, d.astype(np.float32)


def _fit_groups(due, W, wb, errs, hinv, member_pos, diag, b0, b1, bits, group_size, dtype, fit, scales, biases):
    """Fit the (matrix, group) pairs `due` at the current column (i = len(errs) into the block): each
    group's columns as compensated so far (those in the block from `wb`, later ones from `W` less the
    block's pending updates), all the pairs' rows in one call."""
    import mlx.core as mx

    from mixquant.quant.fit import quantize

    i = len(errs)
    err = mx.stack(errs, axis=2) if errs else None
    current, importance = [], []
    for e, g in due:
        members = member_pos[e, g]  # the positions, in the order, of the group's columns
        inside = members < b1
        idx_in, idx_later = np.nonzero(inside)[0], np.nonzero(~inside)[0]
        parts = {}
        if len(idx_in):
            parts.update(zip(idx_in.tolist(), mx.split(wb[e][:, mx.array(members[idx_in] - b0)], len(idx_in), axis=1)))
        if len(idx_later):
            later = W[e][:, mx.array(members[idx_later])]
            if err is not None:
                later = later - err[e] @ hinv[e][b0: b0 + i][:, mx.array(members[idx_later])]
            parts.update(zip(idx_later.tolist(), mx.split(later, len(idx_later), axis=1)))
        current.append(mx.concatenate([parts[j] for j in range(group_size)], axis=1))
        if fit:
            importance.append(np.broadcast_to(diag[e, g * group_size: (g + 1) * group_size], (wb.shape[1], group_size)))
    block = np.concatenate([np.array(c) for c in current], axis=0)
    imp = np.concatenate(importance, axis=0) if fit else None
    _, s, b = quantize(block, bits, group_size, dtype, imp)
    s = np.array(s.astype(mx.float32))[:, 0]
    b = np.array(b.astype(mx.float32))[:, 0]
    rows = wb.shape[1]
    for k, (e, g) in enumerate(due):
        scales[e, :, g] = s[k * rows: (k + 1) * rows]
        biases[e, :, g] = b[k * rows: (k + 1) * rows]

