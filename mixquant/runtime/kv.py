"""A quantized KV cache: attention layers' keys and values stored at fewer bits once the cache holds
`start` tokens; Gated DeltaNet state is never quantized.

Two forms. Uniform (`--kv-bits 4|8`): mlx-lm's own QuantizedKVCache, every attention layer at one
width, through generate_step's arguments (the names are mlx-lm's: --kv-bits, --kv-group-size, --kv-start).
Per layer (`--kv-bits auto`, and every server run, whose batches need a cache that merges): each
attention layer's cache is a mixquant.runtime.kvcache.MixedKVCache holding K and V at the widths a
measured allocation chose (mixquant.kvplan), K and V possibly different."""

from __future__ import annotations

from dataclasses import dataclass

from mixquant.errors import MixquantError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize takes
AUTO = "auto"
CONFIG_KEY = "kv"  # under config.json's mixquant section: the measured per-layer allocation


@dataclass(frozen=True)
class Width:
    """How one tensor (a layer's K or V) is stored: `bits` per element with a scale and a bias per
    `group_size` elements, or None for the model's dtype."""

    bits: int | None
    group_size: int = 64

    def element_bytes(self, dtype_bytes: int) -> float:
        return dtype_bytes if self.bits is None else self.bits / 8 + 2 * dtype_bytes / self.group_size

    @property
    def label(self) -> str:
        return "float" if self.bits is None else f"{self.bits}g{self.group_size}"

    @staticmethod
    def parse(text: str) -> "Width":
        if text == "float":
            return Width(None)
        bits, _, group = text.partition("g")
        return Width(int(bits), int(group))


FLOAT = Width(None)


@dataclass(frozen=True)
class LayerKV:
    k: Width
    v: Width

    @property
    def label(self) -> str:
        return f"K {self.k.label} V {self.v.label}"


@dataclass(frozen=True)
class KVQuant:
    """Uniform: `bits`/`group_size` on every attention layer. Per layer: `layers` maps a cache index
    (the model's layer) to its LayerKV; attention layers not named keep the model's dtype."""

    bits: int | None
    group_size: int = 64
    start: int = 0
    layers: tuple[tuple[int, LayerKV], ...] | None = None

    @property
    def uniform(self) -> bool:
        return self.layers is None

    def args(self) -> dict:
        """mlx-lm's generate_step arguments (uniform only; a per-layer cache quantizes itself)."""
        if not self.uniform:
            return {}
        return {"kv_bits": self.bits, "kv_group_size": self.group_size, "quantized_kv_start": self.start}

    def spec(self, index: int) -> LayerKV | None:
        if self.uniform:
            w = Width(self.bits, self.group_size)
            return LayerKV(w, w)
        return dict(self.layers).get(index)

    def apply(self, cache) -> None:
        """Uniform: quantize, in place, the attention layers' caches that have reached `start` tokens,
        as mlx-lm's generate_step does after each prefill chunk. Per layer: nothing (the caches do it)."""
        if self.uniform:
            from mlx_lm.generate import maybe_quantize_kv_cache

            maybe_quantize_kv_cache(cache, self.start, self.group_size, self.bits)

    def adopt(self, cache: list, mixed: bool = False) -> list:
        """`cache` (a model's prompt cache) with its attention layers' float caches replaced by
        MixedKVCaches: per layer always, and in the uniform form too when `mixed` (the server, whose
        batches need a cache that merges). Uniform without `mixed`: unchanged (apply quantizes it)."""
        from mlx_lm.models.cache import KVCache

        from mixquant.runtime.kvcache import MixedKVCache

        if self.uniform and not mixed:
            return cache
        if not self.uniform:
            attention = {i for i, c in enumerate(cache) if type(c) is KVCache}
            stray = sorted(i for i, _ in self.layers if i not in attention)
            if stray:
                raise MixquantError(f"--kv-bits auto: the stored allocation names layer {stray[0]}, which is not "
                                    f"one of this model's attention layers ({', '.join(map(str, sorted(attention)))})")
        for i, c in enumerate(cache):
            spec = self.spec(i) if type(c) is KVCache else None
            if spec is not None and spec != LayerKV(FLOAT, FLOAT):
                cache[i] = MixedKVCache(spec, self.start)
        return cache

    def describe(self) -> str:
        if self.uniform:
            return f"{self.bits}-bit, group {self.group_size}, from token {self.start}"
        return "per layer: " + "; ".join(f"{i}: {s.label}" for i, s in self.layers)


def kv_quant(bits, group_size: int | None = None, start: int | None = None, config: dict | None = None,
             where: str = "") -> KVQuant | None:
    """The settings as given on the command line or to mixquant.load: None without bits; a one-line
    error for bits, a group size or a start the cache does not take. `bits` 'auto': the allocation
    stored in the model's config.json (`config`, read from `where`)."""
    if bits is None:
        if group_size is not None or start is not None:
            raise MixquantError("--kv-group-size and --kv-start: only with --kv-bits")
        return None
    start = 0 if start is None else start
    if start < 0:
        raise MixquantError(f"--kv-start: must be at least 0, got {start}")
    if bits == AUTO:
        if group_size is not None:
            raise MixquantError("--kv-group-size: not with --kv-bits auto (the allocation sets each layer's)")
        stored = ((config or {}).get("mixquant") or {}).get(CONFIG_KEY)
        if not stored:
            raise MixquantError(f"{where}: --kv-bits auto needs a measured KV allocation, and config.json has "
                                f"none; convert with --kv-bits auto to measure one")
        return KVQuant(None, start=start, layers=layers_from_config(stored, where))
    try:
        bits = int(bits)
    except ValueError:
        raise MixquantError(f"--kv-bits: {bits!r} is not one of {', '.join(map(str, KV_BITS))} or {AUTO}") from None
    if bits not in KV_BITS:
        raise MixquantError(f"--kv-bits: {bits} is not one of {', '.join(map(str, KV_BITS))} or {AUTO}")
    group_size = 64 if group_size is None else group_size
    if group_size not in KV_GROUP_SIZES:
        raise MixquantError(f"--kv-group-size: {group_size} is not one of {', '.join(map(str, KV_GROUP_SIZES))}")
    return KVQuant(bits, group_size, start)


def layers_from_config(stored: dict, where: str) -> tuple[tuple[int, LayerKV], ...]:
    try:
        layers = tuple(sorted((int(i), LayerKV(Width.parse(k), Width.parse(v)))
                              for i, (k, v) in stored["layers"].items()))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise MixquantError(f"{where}: config.json's mixquant.kv.layers is not a map of layer -> [K, V] widths "
                            f"such as \"4g64\"") from None
    for i, spec in layers:
        for w in (spec.k, spec.v):
            if w.bits is not None and (w.bits not in QUANT_BITS or w.group_size not in KV_GROUP_SIZES):
                raise MixquantError(f"{where}: config.json's mixquant.kv: layer {i} has width {w.label}, which "
                                    f"MLX does not quantize")
    return layers


def kv_settings(bits, group_size: int | None, start: int | None, model_path) -> KVQuant | None:
    """kv_quant for a model on disk, its stored allocation read from its config.json for 'auto'."""
    from pathlib import Path

    from mixquant.io.textfile import read_json_object

    config = None
    if bits == AUTO:
        path = Path(model_path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise MixquantError(f"{path}: --kv-bits auto needs a model folder converted with --kv-bits auto")
        config = read_json_object(config_file)
    return kv_quant(bits, group_size, start, config, str(model_path))
