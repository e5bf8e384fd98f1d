"""Run a model over calibration windows and record, for every linear layer, the sum of squared
inputs per input channel and the token count (per expert for MoE switch layers: only the tokens
routed to each expert), plus a small sample of input rows for the AWQ scale search.

The mlx-lm model is used as it is; its linear modules are wrapped in recorders for the run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

SAMPLE_ROWS = 512  # input rows kept per module (per expert for switch layers) for the AWQ search


@dataclass
class ModuleStats:
    sum2: np.ndarray  # [n_mat, n_in] float64
    counts: np.ndarray  # [n_mat] int64
    samples: list[np.ndarray | None] = field(default_factory=list)  # per matrix: reservoir [<=K, n_in]
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    keep_samples: bool = True

    def add(self, mat: int, rows: np.ndarray) -> None:
        """Accumulate; keep a uniform random sample of SAMPLE_ROWS rows over everything seen."""
        seen = int(self.counts[mat])
        self.sum2[mat] += (rows.astype(np.float64) ** 2).sum(0)
        self.counts[mat] += len(rows)
        if not self.keep_samples:
            return
        reservoir = self.samples[mat]
        if reservoir is None:
            reservoir = np.zeros((0, rows.shape[1]), np.float32)
        room = SAMPLE_ROWS - len(reservoir)
        if room > 0:
            reservoir = np.concatenate([reservoir, rows[:room].astype(np.float32)])
            rows, seen = rows[room:], seen + min(room, len(rows))
        if len(rows):
            slots = self.rng.integers(0, seen + 1 + np.arange(len(rows)))
            keep = slots < SAMPLE_ROWS
            reservoir[slots[keep]] = rows[keep]
        self.samples[mat] = reservoir

    def sample(self, mat: int = 0) -> np.ndarray:
        s = self.samples[mat]
        return s if s is not None else np.zeros((0, self.sum2.shape[1]), np.float32)


def _recorder_classes():
    import mlx.core as mx
    import mlx.nn as nn

    class LinearRecorder(nn.Module):
        def __init__(self, inner, stats: ModuleStats):
            super().__init__()
            self.inner = inner
            self._stats = stats

        def __call__(self, x, *args, **kwargs):
            rows = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
            self._stats.add(0, rows)
            return self.inner(x, *args, **kwargs)

    class SwitchRecorder(nn.Module):
        def __init__(self, inner, stats: ModuleStats):
            super().__init__()
            self.inner = inner
            self._stats = stats

        def __call__(self, x, indices, *args, **kwargs):
            xs = np.array(x.astype(mx.float32))
            idx = np.array(indices)
            while xs.ndim > idx.ndim + 1 and xs.shape[-2] == 1:
                xs = xs[..., 0, :]
            xs = np.broadcast_to(xs, (*idx.shape, xs.shape[-1])).reshape(-1, xs.shape[-1])
            flat = idx.reshape(-1)
            for e in np.unique(flat):
                self._stats.add(int(e), xs[flat == e])
            return self.inner(x, indices, *args, **kwargs)

    return LinearRecorder, SwitchRecorder


@contextmanager
def recording(model, samples: bool = True):
    """The model's Linear / SwitchLinear modules (embedding excluded) wrapped in recorders while the
    block runs; yields module path -> stats (input rows kept for AWQ only with `samples`)."""
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import SwitchLinear

    LinearRecorder, SwitchRecorder = _recorder_classes()
    stats: dict[str, ModuleStats] = {}
    wrapped, originals = [], []
    for path, m in model.named_modules():
        if isinstance(m, SwitchLinear):
            n_mat, n_in = m.weight.shape[0], m.weight.shape[-1]
            cls = SwitchRecorder
        elif isinstance(m, nn.Linear):
            n_mat, n_in = 1, m.weight.shape[-1]
            cls = LinearRecorder
        else:
            continue
        stats[path] = ModuleStats(np.zeros((n_mat, n_in)), np.zeros(n_mat, np.int64), [None] * n_mat,
                                  keep_samples=samples)
        wrapped.append((path, cls(m, stats[path])))
        originals.append((path, m))
    model.update_modules(tree_unflatten(wrapped))
    try:
        yield stats
    finally:
        model.update_modules(tree_unflatten(originals))


def sum_over_ranks(stats: dict[str, ModuleStats], group) -> dict[str, ModuleStats]:
    """Every rank's sums and counts added (in float64 and int64), for statistics collected over
    each rank's share of the windows; samples are not combined."""
    from mixquant.distributed import all_sum_each

    if group is None:
        return stats
    items = list(stats.values())
    sums = all_sum_each([s.sum2 for s in items], group)
    counts = all_sum_each([s.counts for s in items], group)
    for s, sum2, n in zip(items, sums, counts):
        s.sum2, s.counts = sum2, n
    return stats


def collect(model, windows: np.ndarray, progress=None) -> dict[str, ModuleStats]:
    """Module path -> stats, for every Linear / SwitchLinear of the model (embedding excluded)."""
    import mlx.core as mx

    with recording(model) as stats:
        for i, w in enumerate(windows):
            mx.eval(model(mx.array(w[None])))
            if progress:
                progress(i + 1, len(windows))
    return stats
