"""A model calibrated one decoder layer at a time, in the memory of one layer.

The mlx-lm model is built with its parameters left unevaluated (MLX allocates nothing for them);
a layer's weights are read from the source (through the plan, as conversion reads them) just before
that layer runs over every calibration window, and put back to unevaluated placeholders after.
The hidden states between layers are kept by mixquant.calib.runner.LayerRunner, which drives the
model's own forward pass; the embedding is read only while layer 0 runs (later layers replay kept
states, so the embedding's output is not used and a placeholder stands in for it).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mixquant.arch.roles import Kind
from mixquant.arch.tensors import SCOPE_MODEL
from mixquant.blocks import read_tensor


def _embedding_stand_in():
    from mixquant.wrap import Wrapper

    class Embedding(Wrapper):
        """The model's embedding, or zeros of its output's shape while its output is not used."""

        def __init__(self, inner):
            super().__init__(inner)
            self._live = True

        def __call__(self, ids):
            import mlx.core as mx

            if self._live:
                return self.inner(ids)
            return mx.zeros((*ids.shape, self.inner.weight.shape[-1]), mx.float32)

    return Embedding


def streamable(path: Path) -> bool:
    """Whether the float model at `path` can run a layer at a time: HF folders and GGUF files can,
    MLX folders (mlx-lm loads those whole) cannot. Calibration text the model samples itself is
    sampled first, by a whole model loaded for it and let go before the layers run."""
    from mixquant.loading import MLX, source_kind

    return source_kind(Path(path)) != MLX


def float_model(path: Path, config_dir: Path | None = None):
    """(model, tokenizer, config, streamed) for the float32 model at `path`: a StreamedModel's
    (weights read a layer at a time) where `streamable`, else mlx-lm's whole model and None."""
    from mixquant.loading import load

    if not streamable(path):
        loaded = load(Path(path), dtype="float32", dequantize=True, config_dir=config_dir)
        return loaded.model, loaded.tokenizer, loaded.config, None
    streamed = StreamedModel(Path(path), config_dir)
    return streamed.model, streamed.tokenizer, streamed.config, streamed


class StreamedModel:
    """An mlx-lm model (float32) whose weights stay in the source outside `with layer(i)` / `with outer()`."""

    def __init__(self, path: Path, config_dir: Path | None = None):
        import importlib

        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        from mixquant.arch import family_for_config
        from mixquant.errors import MixquantError
        from mixquant.kernels import adopt_kernels, uses_token_loop
        from mixquant.loading import load_tokenizer, side_files
        from mixquant.quant.plan import make_plan
        from mixquant.sources import open_source

        self.source = open_source(Path(path), config_dir)
        family = family_for_config(self.source.config, self.source.config_path)
        plan = make_plan(family.build(self.source, keep_vision=False, keep_mtp=False), None, "float32")
        self.config = plan.output_config()
        module = importlib.import_module(f"mlx_lm.models.{self.config['model_type']}")
        self.model = module.Model(module.ModelArgs.from_dict(self.config))
        self.model.eval()
        adopt_kernels(self.model, chunked=uses_token_loop())
        entries = [e for e in plan.entries if e.tensor.scope == SCOPE_MODEL]
        self.layer_entries: dict[int | None, list] = {}
        for e in entries:
            self.layer_entries.setdefault(e.tensor.layer, []).append(e)
        # where each weight goes: (module, key), found before anything wraps a module
        modules = dict(self.model.named_modules())
        self.slots = {}
        for name, value in tree_flatten(self.model.parameters()):
            owner, key = name.rsplit(".", 1)
            self.slots[name] = (modules[owner], key, value.shape, value.dtype)
        missing = set(self.slots) - {e.tensor.name for e in entries}
        if missing:
            raise MixquantError(f"{path}: the plan gives no tensor for {sorted(missing)[:3]}")
        with side_files(self.source) as folder:
            self.tokenizer = load_tokenizer(folder, self.config)
        embed_path = next(e.tensor.module for e in entries if e.tensor.role.kind == Kind.EMBEDDING)
        self.embedding = _embedding_stand_in()(modules[embed_path])
        self.model.update_modules(tree_unflatten([(embed_path, self.embedding)]))
        self._mx = mx

    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    @contextmanager
    def _held(self, entries):
        """These tensors read from the source for the block, then put back to unevaluated
        placeholders (which hold no memory)."""
        mx = self._mx
        arrays = []
        for e in entries:
            module, key, _, _ = self.slots[e.tensor.name]
            module[key] = mx.array(read_tensor(self.source, e.tensor), dtype=mx.float32)
            arrays.append(module[key])
        mx.eval(arrays)
        try:
            yield
        finally:
            for e in entries:
                module, key, shape, dtype = self.slots[e.tensor.name]
                module[key] = mx.zeros(shape, dtype)

    def layer(self, layer: int):
        """Decoder layer `layer`'s weights, for the block. The embedding computes only while layer 0
        runs (later layers replay kept states)."""
        self.embedding._live = layer == 0
        return self._held(self.layer_entries.get(layer, []))

    def outer(self):
        """The embedding, final norm and lm_head (the tensors outside the decoder layers), for the block."""
        return self._held(self.layer_entries.get(None, []))


def collect_streamed(streamed: StreamedModel, windows, progress=None, samples: bool = True,
                     after_layer=None) -> dict:
    """mixquant.calib.collect.collect's statistics, computed layer by layer (same windows, same order,
    one window per pass, so the same numbers). after_layer(layer, stats), if given, is called once
    each decoder layer's inputs are recorded, before the next layer runs."""
    from mixquant.calib.collect import recording
    from mixquant.calib.runner import LayerRunner

    model = streamed.model
    with recording(model, samples) as stats, streamed.outer():
        runner = LayerRunner(model, windows, batch=1)
        n = streamed.n_layers
        for layer in range(n):
            with streamed.layer(layer):
                runner.advance(layer)
            runner.inputs[layer] = None
            if after_layer:
                after_layer(layer, stats)
            if progress:
                progress(layer + 1, n + 1)
        runner.unwrap()  # the last layer's pass went on through the final norm and lm_head
    if progress:
        progress(n + 1, n + 1)
    return stats


def streamed_logits(streamed: StreamedModel, windows, progress=None):
    """Yields the logits [ctx, V] (float32 numpy) of each window, the model run one decoder layer at
    a time over every window (the states between layers kept); the last layer and the head run one
    window at a time, so one window's logits are held at once."""
    import mlx.core as mx

    from mixquant.calib.runner import LayerRunner

    runner = LayerRunner(streamed.model, windows, batch=1)
    n = streamed.n_layers
    try:
        with streamed.outer():
            for layer in range(n - 1):
                with streamed.layer(layer):
                    runner.advance(layer)
                runner.inputs[layer] = None
                if progress:
                    progress(layer + 1, n)
            with streamed.layer(n - 1):
                if progress:
                    progress(n, n)
                for w in range(runner.n_batches):
                    yield np.array(runner.logits(n - 1, w)[0][0].astype(mx.float32))
    finally:
        runner.unwrap()
