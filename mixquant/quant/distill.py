"""Distillation of a quant's scales and biases (DWQ): the codes stay, every group's scale and bias
move to lower the KL divergence between the unquantized model's next-token distribution and the
quantized model's, by gradient descent on calibration windows.

The quantized model is the unquantized mlx-lm model with each quantized module replaced by one that
rebuilds its weight in float32 from the fixed codes and the trainable pair (scale = s0 * exp(a),
bias = b0 + c * |s0|, a and c starting at zero): float32 GEMMs, which on MLX's CPU backend are far
faster than its quantized kernels, and gradients reach every scale and bias. Optionally the text
model's norm multipliers, or all its unquantized float tensors (norms, short convolutions, per-head
parameters; the last two at SLOW_RATE times the rate), move with them. A quarter of the windows, at
most HELD_OUT_MAX of them, is held out and checked every EVAL_EVERY steps (or every pass over the
rest, if that is shorter): the run keeps the state with the least held-out KL, and the result is
kept only if that beats the start (once scales, biases and tuned floats are rounded to their output
dtypes). The unquantized model's log-probs (windows x tokens x vocab float32: half a GiB per
512-token window at a 248k vocabulary) are kept while they fit in TEACHER_CACHE_BYTES and recomputed
by the same forward for the other windows, so the calibration budget is not bounded by memory.
mlx-lm's fused Gated DeltaNet kernel has no vjp, so the model runs in training mode (its ops path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mixquant.arch.roles import Kind
from mixquant.arch.tensors import SCOPE_MODEL

log = logging.getLogger(__name__)

HELD_OUT = 0.25
HELD_OUT_MAX = 64  # windows: enough for the keep decision; a larger budget goes to training
EVAL_EVERY = 256
LEARNING_RATE = 3e-4
TEACHER_CACHE_BYTES = 2 << 30
FLOAT_KINDS = frozenset({Kind.NORM, Kind.CONV, Kind.PARAM})  # the unquantized tensors `floats` tunes
SLOW_KINDS = frozenset({Kind.CONV, Kind.PARAM})  # ... of which these move at SLOW_RATE times the rate
SLOW_RATE = 0.1


@dataclass
class DistillResult:
    encodings: dict  # tensor name -> per part (packed, scales, biases): scales/biases tuned (or as given)
    before: float  # held-out mean KL with the given scales and biases
    after: float  # ... with the kept ones (equal to before when nothing improved)
    steps: int
    kept: bool
    floats: dict = field(default_factory=dict)  # tensor name -> distilled unquantized tensor (float32), when kept
    checks: list = field(default_factory=list)  # (step, held-out mean KL of the state after that step)
    best_step: int = 0  # the step whose state was kept (0: the start)


def student_classes():
    import mlx.core as mx
    import mlx.nn as nn

    class Dequantized(nn.Module):
        """A quantized Linear / SwitchLinear / Embedding in float32 with trainable scales and biases.
        `post` undoes channel scales folded elsewhere (AWQ): weight = deq * row_mul[:, None] * col_mul."""

        def __init__(self, codes, s0, b0, group_size, kind, row_mul=None, col_mul=None, bias=None):
            super().__init__()
            self.codes = mx.array(codes)  # [..., out, in] float32 integers
            self.s0, self.b0 = mx.array(s0), mx.array(b0)  # [..., out, groups]
            self.a, self.c = mx.zeros(self.s0.shape), mx.zeros(self.s0.shape)
            self.row_mul = None if row_mul is None else mx.array(row_mul)
            self.col_mul = None if col_mul is None else mx.array(col_mul)
            if bias is not None:
                self.bias = bias
            self._group, self._kind = group_size, kind

        def pairs(self):
            return self.s0 * mx.exp(self.a), self.b0 + self.c * mx.abs(self.s0)

        def weight_now(self):
            s, b = self.pairs()
            *lead, width = self.codes.shape
            w = self.codes.reshape(*lead, width // self._group, self._group) * s[..., None] + b[..., None]
            w = w.reshape(*lead, width)
            if self.row_mul is not None:
                w = w * self.row_mul[..., None]
            if self.col_mul is not None:
                w = w * self.col_mul
            return w

        def __call__(self, x, *args, **kwargs):
            w = self.weight_now()
            if self._kind == "embedding":
                return w[x]
            if self._kind == "experts":
                indices = args[0]
                y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=kwargs.get(
                    "sorted_indices", args[1] if len(args) > 1 else False))
                return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y
            y = x @ w.T
            return y + self["bias"] if "bias" in self else y

        def as_linear(self, x):
            return x @ self.weight_now().T

    return Dequantized


def _codes(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Integer codes [rows, width] (float32) from MLX's packing."""
    rows = packed.shape[0]
    raw = np.ascontiguousarray(packed).view(np.uint8).reshape(rows, -1)
    bitplanes = np.unpackbits(raw, axis=1, bitorder="little")[:, : width * bits].reshape(rows, width, bits)
    return (bitplanes.astype(np.uint32) << np.arange(bits, dtype=np.uint32)).sum(-1).astype(np.float32)


def distill(model, windows: np.ndarray, plan, encodings: dict, dtype, steps: int, awq_result=None,
            lr: float = LEARNING_RATE, eval_every: int | None = None, seed: int = 0, progress=None,
            norms: bool = False, floats: bool = False, teacher_cache_bytes: int = TEACHER_CACHE_BYTES,
            anneal: bool = False, group=None) -> DistillResult:
    """Tune the scales and biases of `encodings` (tensor name -> per part (packed, scales, biases)) on
    `model`, the unquantized mlx-lm model in float32, and with `norms` the text model's norm
    multipliers, with `floats` every unquantized float tensor of the text model; returns the
    encodings to write (and those tensors, in `floats`). With `anneal` the learning rate falls toward
    zero over the second half of the steps (see `learning_rate`). group (mixquant.distributed; every
    rank with the same windows): the held-out windows are split over the ranks, each rank keeping
    and checking its own, and the per-window figures gathered; every rank takes the same training
    steps (one window a step, as alone), so every rank ends with one process's result."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    from mixquant.distributed import all_sum, owned
    from mixquant.quant.encode import mx_dtype

    Dequantized = student_classes()
    modules = dict(model.named_modules())
    entries = {e.tensor.name: e for e in plan.entries if e.tensor.name in encodings}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(windows))
    n_held = held_out_count(len(windows))
    held, train = windows[order[:n_held]], windows[order[n_held:]]
    if len(train) == 0:
        train = held

    def logprobs(m, w):
        lg = m(mx.array(w[None]))[0].astype(mx.float32)
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    mine = owned(len(held), group)
    per_window = logprobs(model, windows[0]).nbytes  # from the lazy graph's shape; nothing is computed
    cached = [*mine, *range(len(held), len(held) + len(train))][: teacher_cache_bytes // per_window]
    cache = {j: logprobs(model, held[j] if j < len(held) else train[j - len(held)]) for j in cached}
    mx.eval(list(cache.values()))

    students = {}
    for name, entry in entries.items():
        t = entry.tensor
        module = modules[t.module]
        parts = encodings[name]
        codes = np.stack([_codes(p[0], entry.bits, t.in_features) for p in parts])
        s0 = np.stack([p[1] for p in parts])
        b0 = np.stack([p[2] for p in parts])
        if not t.stacked:
            codes, s0, b0 = codes[0], s0[0], b0[0]
        row_mul, col_mul = undo_vectors(awq_result, name, t)
        kind = "embedding" if isinstance(module, nn.Embedding) else "experts" if t.stacked else "linear"
        bias = module["bias"] if "bias" in module else None
        students[t.module] = Dequantized(codes, s0, b0, entry.group_size, kind, row_mul, col_mul, bias)
    originals = [(m, modules[m]) for m in students]
    model.update_modules(tree_unflatten(list(students.items())))
    training = model.training
    model.freeze()
    for s in students.values():
        s.unfreeze(keys=["a", "c"])
    planned = {e.tensor.name: e for e in plan.entries}
    kinds = FLOAT_KINDS if floats else {Kind.NORM} if norms else set()
    now = dict(model.named_modules())  # a quantized linear's own bias lives on its student
    tuned = [n for n, e in planned.items() if e.tensor.role.kind in kinds and e.tensor.scope == SCOPE_MODEL
             and n.rsplit(".", 1)[0] in now]
    for n in tuned:
        module, leaf = n.rsplit(".", 1)
        now[module].unfreeze(keys=[leaf], recurse=False)
    float_start = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters()) if k in tuned}
    model.train()

    def teacher(index: int, tokens):
        """Log-probs of the unquantized model on window `index` of the held windows followed by the
        training ones."""
        if index in cache:
            return cache[index]
        current = [(k, v) for k, v in tree_flatten(model.trainable_parameters()) if k in float_start]
        model.update_modules(tree_unflatten(originals))
        model.update(tree_unflatten(list(float_start.items())))
        model.train(training)
        target = logprobs(model, tokens)
        mx.eval(target)
        model.update_modules(tree_unflatten(list(students.items())))
        model.update(tree_unflatten(current))
        model.train()
        return target

    def loss_fn(m, tokens, teacher):
        return (mx.exp(teacher) * (teacher - logprobs(m, tokens))).sum(-1).mean()

    def snapshot():
        return [(k, mx.array(v)) for k, v in tree_flatten(model.trainable_parameters())]

    def held_kl(rounded: bool) -> float:
        if rounded:
            saved = snapshot()
            for s in students.values():
                _round_pairs(s, dtype)
            model.update(tree_unflatten([(k, v.astype(mx_dtype(planned[k].dtype)).astype(mx.float32))
                                         for k, v in saved if k in float_start]))
        losses = np.zeros(len(held))
        for j in mine:
            losses[j] = float(loss_fn(model, held[j], teacher(j, held[j])))
        total = float(np.mean(all_sum(losses, group)))
        if rounded:
            model.update(tree_unflatten(saved))
        return total

    try:
        before = held_kl(rounded=False)
        best, best_state, best_step, checks = before, None, 0, []
        slow = {n for n in tuned if planned[n].tensor.role.kind in SLOW_KINDS}
        optimizer = Optimizer(lr, steps, anneal, slow)
        step_fn = nn.value_and_grad(model, loss_fn)
        eval_every = eval_every or max(1, min(EVAL_EVERY, len(train)))
        for step in range(steps):
            i = step % len(train)
            loss, grads = step_fn(model, train[i], teacher(len(held) + i, train[i]))
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.states())
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                current = held_kl(rounded=True)
                checks.append((step + 1, current))
                if current < best:
                    best, best_state, best_step = current, snapshot(), step + 1
            if progress:
                progress(step + 1, steps)
        kept = best_state is not None and best < before
        out = dict(encodings)
        moved = {}
        if kept:
            model.update(tree_unflatten(best_state))
            moved = {k: np.array(v) for k, v in best_state if k in float_start}
            for module_name, student in students.items():
                s, b = student.pairs()
                name = next(n for n, e in entries.items() if e.tensor.module == module_name)
                s, b = np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
                if not entries[name].tensor.stacked:
                    s, b = s[None], b[None]
                out[name] = [(p[0], _as_dtype(sp, dtype), _as_dtype(bp, dtype)) for p, sp, bp in
                             zip(encodings[name], s, b)]
        return DistillResult(out, before, best if kept else before, steps, kept, moved, checks, best_step)
    finally:
        model.update(tree_unflatten(list(float_start.items())))
        model.update_modules(tree_unflatten(originals))
        model.unfreeze()
        model.train(training)


def held_out_count(n_windows: int) -> int:
    """How many of `n_windows` calibration windows distillation holds out."""
    return max(1, min(HELD_OUT_MAX, int(round(HELD_OUT * n_windows))))


class Optimizer:
    """Adam at `lr` (see `learning_rate`) for every trainable parameter but those named in `slow`,
    and a second Adam at SLOW_RATE times that rate for them."""

    def __init__(self, lr: float, steps: int, anneal: bool, slow: set):
        import mlx.optimizers as optim

        self.slow = slow
        self.fast_adam = optim.Adam(learning_rate=learning_rate(lr, steps, anneal))
        self.slow_adam = optim.Adam(learning_rate=learning_rate(lr * SLOW_RATE, steps, anneal))

    def update(self, model, grads) -> None:
        from mlx.utils import tree_flatten, tree_unflatten

        params = dict(tree_flatten(model.trainable_parameters()))
        flat = tree_flatten(grads)
        moved = []
        for adam, is_slow in ((self.fast_adam, False), (self.slow_adam, True)):
            part = {k: g for k, g in flat if (k in self.slow) == is_slow}
            if part:
                moved += adam.apply_gradients(part, {k: params[k] for k in part}).items()
        model.update(tree_unflatten(moved))

    def states(self):
        return [self.fast_adam.state, self.slow_adam.state]


def learning_rate(lr: float, steps: int, anneal: bool):
    """Adam's learning rate: `lr` at every step, or with `anneal` a schedule of the step index that
    holds `lr` for the first half of `steps` and then falls linearly, reaching lr / (steps - half) at
    the last step."""
    import mlx.optimizers as optim

    if not anneal or steps < 2:
        return lr
    half = steps // 2
    return optim.join_schedules([lambda _: lr, optim.linear_schedule(lr, 0.0, steps - half)], [half])


def _as_dtype(a: np.ndarray, dtype) -> np.ndarray:
    import mlx.core as mx

    return np.array(mx.array(a).astype(dtype).astype(mx.float32))


def _round_pairs(student, dtype) -> None:
    """Offsets that give the scales and biases the output dtype can hold (for honest held-out checks)."""
    import mlx.core as mx

    s, b = student.pairs()
    s_r, b_r = s.astype(dtype).astype(mx.float32), b.astype(dtype).astype(mx.float32)
    safe = mx.where(student.s0 == 0, 1.0, student.s0)
    ratio = mx.where(student.s0 == 0, 1.0, s_r / safe)
    student.a = mx.log(mx.maximum(ratio, 1e-30))
    student.c = mx.where(student.s0 == 0, 0.0, (b_r - student.b0) / mx.abs(safe))


def undo_vectors(awq_result, name: str, t):
    """AWQ's ops on a tensor (per part) as the multipliers that undo them on the dequantized weight:
    (row multipliers, column multipliers), each None when AWQ left that side alone."""
    if awq_result is None:
        return None, None
    *lead, out, width = t.shape
    rows, cols = [], []
    for p in range(t.n_matrices):
        r, c = np.ones(out, np.float32), np.ones(width, np.float32)
        for op, vec in awq_result.for_part(name, p):
            if op == "cols":
                c = c / vec
            elif op == "rows":
                r = r / vec
        rows.append(r)
        cols.append(c)
    rows, cols = np.stack(rows), np.stack(cols)
    if not t.stacked:
        rows, cols = rows[0], cols[0]
    else:
        cols = cols[:, None, :]
    return (None if np.all(rows == 1) else rows), (None if np.all(cols == 1) else cols)
