"""The cache bytes that plan and the model card report equal what mlx-lm's caches hold."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mixquant.arch import family_for_config
from mixquant.kvbytes import cache_bytes


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_cache_bytes_equal_mlx_lms_caches_after_a_prefill(fixture_dir, bits):
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    from mixquant.loading import load

    config = json.loads((fixture_dir / "config.json").read_text())
    attention = family_for_config(config, "config.json").attention(config, "config.json")
    model = load(fixture_dir, dtype="float32", dequantize=True).model
    cache = make_prompt_cache(model)
    tokens = 512  # a whole number of mlx-lm's 256-token KV steps
    model(mx.array(np.arange(tokens) % 8000)[None], cache=cache)
    if bits is not None:
        cache = [c.to_quantized(group_size=64, bits=bits) if isinstance(c, KVCache) else c for c in cache]
    mx.eval([c.state for c in cache])
    assert sum(c.nbytes for c in cache) == cache_bytes(attention, tokens, 4, bits)


def test_plan_and_model_card_report_the_cache(fixture_dir):
    """Two attention layers of 2 KV heads of 64 in bfloat16: 1024 bytes of K and V per token; at 8
    and 4 bits (group 64) a scale and a bias per 64 values; six Gated DeltaNet layers' fixed state."""
    from mixquant.convert import ConvertOptions, build_plan
    from mixquant.modelcard import model_card
    from mixquant.quant.recipe import uniform

    _, plan = build_plan(fixture_dir, ConvertOptions(recipe=uniform(4, 64), keep_vision=False, keep_mtp=False))
    cache = plan.summary()["cache"]
    assert cache["kv_bytes_per_token"] == {"bfloat16": 1024, "8-bit": 544, "4-bit": 288}
    assert cache["fixed_bytes"] == 6 * 3 * (2 * 2 * 64 + 8 * 32) * 2 + 6 * 8 * 32 * 64 * 4
    assert cache["contexts"][0] == {"tokens": 8192, "bfloat16": 8192 * 1024 + cache["fixed_bytes"],
                                    "8-bit": 8192 * 544 + cache["fixed_bytes"],
                                    "4-bit": 8192 * 288 + cache["fixed_bytes"]}
    card = model_card(plan, "qwen35-tiny")
    assert "| KV cache per token | bfloat16 1.00 KiB, 8-bit 0.53 KiB, 4-bit 0.28 KiB; plus 0.41 MB" in card
    weights = plan.summary()["model_bytes"]
    assert f"| weights + cache at 256k tokens | bfloat16 {(weights + 262144 * 1024 + cache['fixed_bytes']) / 1e9:.3f} GB" \
        in card
    assert "cache per sequence: 1.00 KiB of KV per token in bfloat16 (2 attention layers)" in plan.format_table()
