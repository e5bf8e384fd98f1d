"""Running an mlx-lm model from any decoder layer on, over fixed calibration windows.

Measuring what a change to layer L does to the output needs only layers L and after: the hidden
state entering layer L is the same as before the change. The runner keeps, per window, the hidden
states entering each layer (as the unchanged model computes them) and runs the model's own forward
with the layers before L short-circuited: they return the kept state instead of computing. The
model's code does everything else (embedding, masks, caches, head), so nothing of any model family
is re-implemented here. It also records a layer's output, which is how sequential methods (GPTQ)
move the kept states forward after changing a layer.
"""

from __future__ import annotations

import numpy as np


class Stop(Exception):
    """Raised by the layer after the last one a partial run needs (or by a hook inside a layer run
    by run_to, once it has what it needs)."""


def _layer_class():
    from mixquant.wrap import Wrapper

    class Layer(Wrapper):
        """A decoder layer that can be skipped (returns a kept state), stopped at, or recorded."""

        def __init__(self, inner):
            super().__init__(inner)
            self._mode = "run"  # run | skip | replay | stop | capture
            self._replay = None
            self._record = None

        def __call__(self, x, *args, **kwargs):
            mode = self._mode
            if mode == "capture":
                self._record = (x, args, kwargs)
                raise Stop
            if mode == "skip":
                return x
            if mode == "replay":
                return self._replay
            if mode == "stop":
                raise Stop
            out = self.inner(x, *args, **kwargs)
            if self._record is not None:
                self._record.append(out)
            return out

    return Layer


BATCH = 4  # windows run together: float32 GEMMs on more rows run faster per row on CPU


class LayerRunner:
    """`model` (an mlx-lm model, float) with its decoder layers wrapped; `windows` [n, ctx] tokens,
    run in batches of up to `batch` windows (the unit everything below is indexed by), or in the
    given `batches` (lists of window indices)."""

    def __init__(self, model, windows: np.ndarray, batch: int = BATCH, batches: list | None = None):
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        self.model = model
        windows = np.asarray(windows, dtype=np.int32)
        if batches is None:
            batches = [range(i, min(i + batch, len(windows))) for i in range(0, len(windows), batch)]
        self.windows = [windows[b.start : b.stop] if isinstance(b, range) else windows[list(b)] for b in batches]
        layers = list(model.layers)
        paths = {id(m): p for p, m in model.named_modules()}
        wrapper = _layer_class()
        self.layers = [wrapper(layer) for layer in layers]
        model.update_modules(tree_unflatten([(paths[id(layer)], w) for layer, w in zip(layers, self.layers)]))
        self.inputs: list[list | None] = [None] * (len(layers) + 1)  # [layer][batch]: state entering it
        self.inputs[0] = [None] * len(self.windows)  # layer 0 needs no kept state
        self._mx = mx

    def unwrap(self) -> None:
        """Put the model's own layers back."""
        from mlx.utils import tree_unflatten

        paths = {id(m): p for p, m in self.model.named_modules()}
        self.model.update_modules(tree_unflatten([(paths[id(w)], w.inner) for w in self.layers]))

    @property
    def n_batches(self) -> int:
        return len(self.windows)

    def _set(self, start: int, stop: int | None, window: int) -> None:
        for i, layer in enumerate(self.layers):
            layer._record = None
            if i < start - 1:
                layer._mode = "skip"
            elif i == start - 1:
                layer._mode, layer._replay = "replay", self.inputs[start][window]
            elif stop is not None and i >= stop:
                layer._mode = "stop" if i == stop else "run"
            else:
                layer._mode = "run"

    def logits(self, start: int = 0, window: int | None = None):
        """Logits [b, ctx, V] (float32 mx arrays) of each batch (or one), computed from layer `start` on."""
        mx = self._mx
        picks = range(len(self.windows)) if window is None else [window]
        out = []
        for w in picks:
            self._set(start, None, w)
            out.append(self.model(mx.array(self.windows[w])).astype(mx.float32))
        self._set(0, None, 0)
        return out

    def advance(self, layer: int) -> None:
        """Keep the states entering layer + 1, computed from the kept states entering `layer` with the
        layer as it is now (changed or not)."""
        mx = self._mx
        if self.inputs[layer] is None:
            self.advance(layer - 1)
        kept = []
        for w in range(len(self.windows)):
            self._set(layer, layer + 1 if layer + 1 < len(self.layers) else None, w)
            self.layers[layer]._record = record = []
            try:
                self.model(mx.array(self.windows[w]))
            except Stop:
                pass
            mx.eval(record[0])
            kept.append(record[0])
        self._set(0, None, 0)
        self.inputs[layer + 1] = kept

    def keep_all(self) -> None:
        """Keep the states entering every layer, in one pass per window."""
        mx = self._mx
        kept = [[] for _ in self.layers]
        for w in range(len(self.windows)):
            self._set(0, None, w)
            for i, layer in enumerate(self.layers):
                layer._record = kept[i]
            self.model(mx.array(self.windows[w]))
            mx.eval([k[-1] for k in kept])
        self._set(0, None, 0)
        for i in range(len(self.layers)):
            self.inputs[i + 1] = kept[i]

    def call_of(self, layer: int, window: int):
        """(x, args, kwargs): what the model passes decoder layer `layer` on batch `window` (its kept
        input state and the model's masks), so that a caller can run the layer alone."""
        mx = self._mx
        if self.inputs[layer] is None:
            self.advance(layer - 1)
        self._set(layer, layer, window)
        self.layers[layer]._mode = "capture"
        try:
            self.model(mx.array(self.windows[window]))
        except Stop:
            pass
        captured, self.layers[layer]._record = self.layers[layer]._record, None
        self._set(0, None, 0)
        return captured

    def run_to(self, layer: int, window: int) -> None:
        """Run layer `layer` alone on batch `window` (from its kept input) and stop: hooks inside it see
        its inputs."""
        mx = self._mx
        if self.inputs[layer] is None:
            self.advance(layer - 1)
        self._set(layer, layer + 1 if layer + 1 < len(self.layers) else None, window)
        try:
            out = self.model(mx.array(self.windows[window]))
            mx.eval(out)
        except Stop:
            pass
        self._set(0, None, 0)
