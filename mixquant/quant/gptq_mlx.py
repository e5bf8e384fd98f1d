"""GPTQ in MLX, on the default device, for a stack of matrices at once (an MoE's experts, or one
plain linear as a stack of one): the algorithm of mixquant.quant.gptq (its NumPy float64 form is the
reference the tests compare against), in float32.

Per matrix, the Hessian's preparation (mixquant.quant.gptq.prepare: dead inputs, damping, act-order,
the upper Cholesky factor of its inverse) is n x n work done in NumPy float64, shared with the
reference. The columns are then rounded in blocks of BLOCK with lazy updates, every matrix of the
stack in the same step: column c of each matrix's own act-order.
A group's scale and bias are fitted when the first of its columns comes up in a matrix's order, from
the group as compensation has left it by then; the matrices whose groups start at the same column
are fitted together (mixquant.quant.fit with one importance row per matrix)."""

from __future__ import annotations

import numpy as np

from mixquant.quant.gptq import BLOCK, DAMP, pack_codes, prepare


def gptq_stack(w, hessians: np.ndarray, bits: int, group_size: int, dtype, act_order: bool = True,
               damp: float = DAMP, fit: bool = True, columns: str | None = None):
    """w [E, rows, n] (any array), hessians [E, n, n]: (packed codes [E, rows, n*bits/32] uint32, scales
    and biases [E, rows, n/group_size] as float32 values of `dtype`, dequantized weights [E, rows, n]
    float32), NumPy arrays, as mixquant.quant.gptq.gptq gives them for each matrix.

    `columns`: where the column steps inside a block run, "mlx" or "numpy" (default: NumPy on the CPU
    device, where MLX's cost per small operation outweighs the work of one column, MLX elsewhere).
    The blocks' lazy updates are MLX matmuls either way."""
    import mlx.core as mx

    if columns is None:
        columns = "numpy" if mx.default_device() == mx.cpu else "mlx"
    step = {"numpy": _NumpyColumns, "mlx": _MlxColumns}[columns]
    w = np.array(w, dtype=np.float32)
    stack, rows, n = w.shape
    groups = n // group_size
    prepared = [prepare(h, damp, act_order) for h in hessians]
    dead = np.stack([p[0] for p in prepared])
    perm = np.stack([p[1] for p in prepared])
    hinv_np = np.stack([p[2] for p in prepared]).astype(np.float32)
    hinv = mx.array(hinv_np)
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
        block = step(W[:, :, b0:b1], hinv_np[:, b0:b1, b0:b1], maxq)
        W_np = None  # the stack as the earlier blocks left it, in NumPy, for the groups that reach past this block
        gather = col_group[:, b0:b1]  # [E, B]
        for i in range(b1 - b0):
            c = b0 + i
            if c in events:
                if W_np is None and any(member_pos[e, g].max() >= b1 for e, g in events[c]):
                    W_np = np.array(W)
                _fit_groups(events[c], W_np, block, hinv_np, member_pos, diag, b0, b1, bits, group_size, dtype, fit,
                            scales, biases)
            if i == 0:
                block.pairs(np.take_along_axis(scales, gather[:, None, :], axis=2),
                            np.take_along_axis(biases, gather[:, None, :], axis=2))
            elif c in events:  # only the matrices whose groups were just fitted
                due = np.unique([e for e, _ in events[c]])
                block.pairs(np.take_along_axis(scales[due], gather[due][:, None, :], axis=2),
                            np.take_along_axis(biases[due], gather[due][:, None, :], axis=2), due)
            block.step(i)
        W = mx.concatenate([W[:, :, :b0], block.current(), W[:, :, b1:] - block.errors() @ hinv[:, b0:b1, b1:]],
                           axis=2)
        q, d = block.results()
        codes.append(q)
        deqs.append(d)
        mx.eval(W)
    order = np.argsort(perm, axis=1)
    q = np.take_along_axis(np.concatenate(codes, axis=2).astype(np.int64), order[:, None, :], axis=2)
    d = np.take_along_axis(np.concatenate(deqs, axis=2), order[:, None, :], axis=2)
    packed = np.stack([pack_codes(q[e], bits) for e in range(stack)])
    return packed, scales, biases, d.astype(np.float32)


class _NumpyColumns:
    """One block's column steps in NumPy float32, every matrix of the stack at once, the block held
    transposed ([E, B, rows]) so that a column and the columns after it are contiguous."""

    def __init__(self, wb, hb: np.ndarray, maxq: int):
        self.wt = np.ascontiguousarray(np.swapaxes(np.array(wb), 1, 2))  # [E, B, rows]
        self.hb, self.maxq = hb, maxq
        self.err = np.zeros_like(self.wt)
        self.codes = np.zeros_like(self.wt)
        self.done = 0

    def pairs(self, s, b, matrices=None):  # [E, rows, B] each (or of `matrices` only)
        if matrices is None:
            self.s = np.ascontiguousarray(np.swapaxes(s, 1, 2))
            self.b = np.ascontiguousarray(np.swapaxes(b, 1, 2))
        else:
            self.s[matrices] = np.swapaxes(s, 1, 2)
            self.b[matrices] = np.swapaxes(b, 1, 2)

    def values(self, e: int, cols: np.ndarray) -> np.ndarray:
        """Matrix e's block columns `cols` as compensated so far [rows, len(cols)]."""
        return self.wt[e, cols].T

    def errors_of(self, e: int) -> np.ndarray | None:
        """Matrix e's scaled errors of the block's columns done so far [rows, done]."""
        return self.err[e, :self.done].T if self.done else None

    def step(self, i: int):
        s, bias, x = self.s[:, i], self.b[:, i], self.wt[:, i]
        q = np.clip(np.round((x - bias) / np.where(s == 0, 1.0, s)), 0, self.maxq)
        deq = s * q + bias
        err = (x - deq) / self.hb[:, i, i][:, None]
        self.wt[:, i + 1:] -= self.hb[:, i, i + 1:, None] * err[:, None, :]
        self.wt[:, i] = deq
        self.err[:, i] = err
        self.codes[:, i] = q
        self.done = i + 1

    def current(self):
        import mlx.core as mx

        return mx.array(np.swapaxes(self.wt, 1, 2))

    def errors(self):
        import mlx.core as mx

        return mx.array(np.swapaxes(self.err[:, :self.done], 1, 2)) if self.done else None

    def results(self):
        return np.swapaxes(self.codes, 1, 2), np.swapaxes(self.wt, 1, 2)


class _MlxColumns:
    """One block's column steps as MLX operations on the default device."""

    def __init__(self, wb, hb: np.ndarray, maxq: int):
        import mlx.core as mx

        self.wb, self.hb, self.maxq = wb, mx.array(hb), maxq
        self.errs, self.codes = [], []

    def pairs(self, s, b, matrices=None):
        import mlx.core as mx

        if matrices is None:
            self.s, self.b = mx.array(s), mx.array(b)
        else:
            self.s[mx.array(matrices)] = mx.array(s)
            self.b[mx.array(matrices)] = mx.array(b)

    @property
    def done(self) -> int:
        return len(self.errs)

    def values(self, e: int, cols: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        return np.array(self.wb[e][:, mx.array(cols)])

    def errors_of(self, e: int) -> np.ndarray | None:
        import mlx.core as mx

        return np.array(mx.stack([err[e] for err in self.errs], axis=1)) if self.errs else None

    def step(self, i: int):
        import mlx.core as mx

        s, bias, x = self.s[:, :, i], self.b[:, :, i], self.wb[:, :, i]
        q = mx.clip(mx.round((x - bias) / mx.where(s == 0, 1.0, s)), 0, self.maxq)
        deq = s * q + bias
        err = (x - deq) / self.hb[:, i, i][:, None]
        self.wb = mx.concatenate([self.wb[:, :, :i], deq[:, :, None],
                                  self.wb[:, :, i + 1:] - err[:, :, None] * self.hb[:, None, i, i + 1:]], axis=2)
        self.errs.append(err)
        self.codes.append(q)

    def current(self):
        return self.wb

    def errors(self):
        import mlx.core as mx

        return mx.stack(self.errs, axis=2) if self.errs else None

    def results(self):
        import mlx.core as mx

        return np.array(mx.stack(self.codes, axis=2)), np.array(self.wb)


def _fit_groups(due, W, block, hinv, member_pos, diag, b0, b1, bits, group_size, dtype, fit, scales, biases):
    """Fit the (matrix, group) pairs `due` at the current column (the block's `done`): each group's
    columns as compensated so far (those in the block from `block`, later ones from `W` [E, rows, n],
    NumPy, less the block's pending updates through `hinv` [E, n, n]), all the pairs' rows in one
    call."""
    import mlx.core as mx

    from mixquant.quant.fit import quantize

    i = block.done
    rows = scales.shape[1]
    current, importance = [], []
    for e, g in due:
        members = member_pos[e, g]  # the positions, in the order, of the group's columns
        inside = members < b1
        values = np.empty((rows, group_size), np.float32)
        if inside.any():
            values[:, inside] = block.values(e, members[inside] - b0)
        if not inside.all():
            later = members[~inside]
            values[:, ~inside] = W[e][:, later]
            err = block.errors_of(e)
            if err is not None:
                values[:, ~inside] -= err @ hinv[e, b0: b0 + i][:, later]
        current.append(values)
        if fit:
            importance.append(np.broadcast_to(diag[e, g * group_size: (g + 1) * group_size], (rows, group_size)))
    imp = np.concatenate(importance, axis=0) if fit else None
    _, s, b = quantize(np.concatenate(current, axis=0), bits, group_size, dtype, imp)
    s = np.array(s.astype(mx.float32))[:, 0]
    b = np.array(b.astype(mx.float32))[:, 0]
    for k, (e, g) in enumerate(due):
        scales[e, :, g] = s[k * rows: (k + 1) * rows]
        biases[e, :, g] = b[k * rows: (k + 1) * rows]
