"""What the cache of one sequence takes at a given context: the KV of the attention layers (as
mlx-lm's KVCache holds it, or its QuantizedKVCache at `bits` with scales and biases per group),
plus the fixed-size state of the other layers (Gated DeltaNet)."""

from __future__ import annotations

from mixquant.arch.tensors import Attention

CONTEXTS = (8192, 32768, 131072, 262144)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_bytes_per_token(a: Attention, dtype_bytes: int, bits: int | None = None, group_size: int = 64) -> float:
    """Bytes of K and V per token over all attention layers; `bits`: quantized, each group of
    `group_size` with a scale and a bias in the model's dtype."""
    from mixquant.runtime.kv import Width

    return 2 * a.layers * a.kv_heads * a.head_dim * Width(bits, group_size).element_bytes(dtype_bytes)


def fixed_bytes(a: Attention, dtype_bytes: int) -> int:
    return a.window_elements * dtype_bytes + a.state_elements * 4


def cache_bytes(a: Attention, tokens: int, dtype_bytes: int, bits: int | None = None, group_size: int = 64) -> int:
    return int(round(tokens * kv_bytes_per_token(a, dtype_bytes, bits, group_size))) + fixed_bytes(a, dtype_bytes)


def kv_table(a: Attention, dtype: str) -> list[dict]:
    """Per context: the cache at the model's dtype and at 8 and 4 bits (group 64)."""
    db = DTYPE_BYTES[dtype]
    rows = []
    for n in CONTEXTS:
        row = {"tokens": n}
        for name, bits in ((dtype, None), ("8-bit", 8), ("4-bit", 4)):
            row[name] = cache_bytes(a, n, db, bits)
        rows.append(row)
    return rows


def format_kv(a: Attention, dtype: str, weights_bytes: int) -> list[str]:
    db = DTYPE_BYTES[dtype]
    lines = [f"cache per sequence: {kv_bytes_per_token(a, db) / 1024:.2f} KiB of KV per token in {dtype} "
             f"({a.layers} attention layers), 8-bit {kv_bytes_per_token(a, db, 8) / 1024:.2f} KiB, 4-bit "
             f"{kv_bytes_per_token(a, db, 4) / 1024:.2f} KiB; {fixed_bytes(a, db) / 1e6:.2f} MB of fixed state"]
    for row in kv_table(a, dtype):
        cells = ", ".join(f"{k} {row[k] / 1e9:.3f} GB (total {(weights_bytes + row[k]) / 1e9:.3f})"
                          for k in (dtype, "8-bit", "4-bit"))
        lines.append(f"  at {row['tokens'] // 1024}k tokens: {cells}")
    return lines
