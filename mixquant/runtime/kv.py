"""A quantized KV cache, as mlx-lm stores it: attention layers' keys and values quantized to `bits`
(group `group_size`) once the cache holds `start` tokens; Gated DeltaNet state is never quantized.
The names are mlx-lm's: --kv-bits, --kv-group-size, --kv-start (its quantized_kv_start)."""

from __future__ import annotations

from dataclasses import dataclass

from mixquant.errors import MixquantError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class KVQuant:
    bits: int
    group_size: int = 64
    start: int = 0

    def args(self) -> dict:
        """mlx-lm's generate_step arguments."""
        return {"kv_bits": self.bits, "kv_group_size": self.group_size, "quantized_kv_start": self.start}

    def apply(self, cache) -> None:
        """Quantize, in place, the attention layers' caches that have reached `start` tokens."""
        from mlx_lm.generate import maybe_quantize_kv_cache

        maybe_quantize_kv_cache(cache, self.start, self.group_size, self.bits)


def kv_quant(bits: int | None, group_size: int | None = None, start: int | None = None) -> KVQuant | None:
    """The settings as given on the command line or to mixquant.load: None without bits; a one-line
    error for bits, a group size or a start mlx-lm's quantized cache does not take."""
    if bits is None:
        if group_size is not None or start is not None:
            raise MixquantError("--kv-group-size and --kv-start: only with --kv-bits")
        return None
    if bits not in KV_BITS:
        raise MixquantError(f"--kv-bits: {bits} is not one of {', '.join(map(str, KV_BITS))}")
    group_size = 64 if group_size is None else group_size
    if group_size not in KV_GROUP_SIZES:
        raise MixquantError(f"--kv-group-size: {group_size} is not one of {', '.join(map(str, KV_GROUP_SIZES))}")
    start = 0 if start is None else start
    if start < 0:
        raise MixquantError(f"--kv-start: must be at least 0, got {start}")
    return KVQuant(bits, group_size, start)
