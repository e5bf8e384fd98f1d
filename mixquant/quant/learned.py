"""Learned rounding, one decoder layer at a time (AutoRound's signed gradient descent).

Each weight's code is round((w - bias) / scale + v) with a trainable offset v in [-1/2, 1/2] per
weight (0 is rounding to nearest); the groups' scales and biases stay those of rounding to nearest
(training them with the offsets, by Adam, made the fixture's layers worse: a scale that moves
re-rounds its whole group at once; distillation tunes them afterwards). The layer with its linears
so rounded is trained to reproduce the unquantized layer's output: its input comes from the
quantized layers before it, its target from the unquantized ones, so it also makes up for their
error. The rounding's gradient passes straight through; v moves by the sign of its gradient with a
step that decays linearly to zero (at most 1/2 in all). The trained rounding is kept only if the
layer's mean squared error over all calibration batches beats rounding to nearest.
"""

from __future__ import annotations

import numpy as np

STEPS = 200


def learner_class():
    import mlx.core as mx

    from mixquant.quant.distill import student_classes

    Dequantized = student_classes()

    class Learner(Dequantized):
        """A quantized Linear / SwitchLinear whose codes are learned from its float weight `w` (in
        the place of Dequantized's fixed codes)."""

        def __init__(self, w, s0, b0, group_size, bits, kind, row_mul=None, col_mul=None, bias=None):
            super().__init__(w, s0, b0, group_size, kind, row_mul, col_mul, bias)
            self.v = mx.zeros(self.codes.shape)
            self._maxq = 2**bits - 1

        def codes_now(self, exact: bool = False):
            """The codes [..., out, in]: rounded, with a straight-through gradient unless `exact`."""
            s, b = self.pairs()
            s = mx.where(s == 0, 1.0, s)  # a constant group: every code rounds to 0
            *lead, width = self.codes.shape
            grouped = self.codes.reshape(*lead, width // self._group, self._group)
            z = ((grouped - b[..., None]) / s[..., None]).reshape(*lead, width) + self.v
            q = mx.clip(mx.round(z), 0, self._maxq)
            return q if exact else z + mx.stop_gradient(q - z)

        def weight_now(self):
            s, b = self.pairs()
            *lead, width = self.codes.shape
            q = self.codes_now().reshape(*lead, width // self._group, self._group)
            w = (q * s[..., None] + b[..., None]).reshape(*lead, width)
            if self.row_mul is not None:
                w = w * self.row_mul[..., None]
            if self.col_mul is not None:
                w = w * self.col_mul
            return w

    return Learner


def train_layer(layer, calls: list, targets: list, learners: list, steps: int = STEPS,
                seed: int = 0, share: list | None = None, group=None) -> tuple[float, float, bool]:
    """Train the rounding offsets of `learners` (modules inside `layer`) so that
    layer(x, *args, **kwargs) for each (x, args, kwargs) of `calls` comes close to its `targets`
    entry; one batch per step. Returns (mean squared error before, after, kept): when the trained
    offsets are no better than none, they are put back to zero.

    share (with group, mixquant.distributed): per step's batch of windows of the whole calibration
    set, (the positions in it this rank holds, a mixquant.distributed.tree_block; their indices in
    `calls`, one window each; the batch's windows). Each step's batch is drawn alike on every
    rank; each rank adds its windows' gradients in Pairwise order and the ranks' sums are added in
    that order too, so that every rank takes one process's steps."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mixquant.distributed import Pairwise, all_sum, pairwise_over_ranks

    if share is None:
        share = [(range(1), [i], range(i, i + 1)) for i in range(len(calls))]
    n_windows = max(windows.stop for _, _, windows in share)

    def loss_fn(_, i):
        x, args, kwargs = calls[i]
        return ((layer(x, *args, **kwargs) - targets[i]) ** 2).mean()

    def total() -> float:
        mine = np.zeros(n_windows)
        for block, held, windows in share:
            for p, i in zip(block, held):
                mine[windows.start + p] = float(loss_fn(layer, i))
        return float(np.mean(all_sum(mine, group)))

    before = total()
    layer.freeze()
    for m in learners:
        m.unfreeze(keys=["v"])
    step_fn = nn.value_and_grad(layer, loss_fn)
    paths = {id(m): p for p, m in layer.named_modules()}
    keys = [f"{paths[id(m)]}.v" for m in learners]  # each learner's offsets in the gradient tree
    n_params = sum(m.v.size for m in learners)
    rng = np.random.default_rng(seed)
    try:
        for step in range(steps):
            block, held, _ = share[int(rng.integers(len(share)))]
            adder = Pairwise(block.start, block.stop)
            for i in held:
                flat = dict(tree_flatten(step_fn(layer, i)[1]))
                adder.add(mx.concatenate([flat[key].reshape(-1) for key in keys]))
                mx.eval(adder.partial())
            mine = adder.total()
            grad = pairwise_over_ranks(mx.zeros((n_params,)) if mine is None else mine, group)
            at = 0
            for m in learners:
                g = grad[at : at + m.v.size].reshape(m.v.shape)
                at += m.v.size
                m.v = mx.clip(m.v - (1 - step / steps) / steps * mx.sign(g), -0.5, 0.5)
            mx.eval([m.v for m in learners])
    finally:
        layer.unfreeze()
    after = total()
    if after < before:
        return before, after, True
    for m in learners:
        m.v = mx.zeros(m.v.shape)
    return before, before, False


def encoding(learner) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(integer codes [..., out, in], scales, biases, dequantized weight) of the learner's state."""
    s, b = learner.pairs()
    q = learner.codes_now(exact=True)
    *lead, width = q.shape
    group = learner._group
    deq = (q.reshape(*lead, width // group, group) * s[..., None] + b[..., None]).reshape(*lead, width)
    return np.array(q).astype(np.int64), np.array(s), np.array(b), np.array(deq)
