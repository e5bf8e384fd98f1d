"""Distillation of scales and biases: codes read back exactly, held-out divergence never worse, and a
real gain where there is room for one."""

import mlx.core as mx
import numpy as np
import pytest

from mixquant.quant.distill import _codes, distill
from mixquant.quant.gptq import pack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_codes_unpack_what_pack_wrote(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(7, 96))
    np.testing.assert_array_equal(_codes(pack_codes(codes, bits), bits, 96), codes)


@pytest.fixture(scope="module")
def setup(fixture_dir):
    """The fixture in float32, its 2-bit uniform plan, the nearest-rounding encodings, and windows."""
    from mixquant.calib.data import calibration_set
    from mixquant.convert import ConvertOptions, build_plan, nearest_encodings
    from mixquant.loading import load
    from mixquant.quant.recipe import uniform

    source, plan = build_plan(fixture_dir, ConvertOptions(recipe=uniform(2, 64), keep_vision=False, keep_mtp=False))
    encodings = nearest_encodings(source, plan, None, {})
    loaded = load(fixture_dir, dtype="float32", dequantize=True)
    windows = calibration_set("mix", loaded.model, loaded.tokenizer, 8 * 64, 64)[:8]
    return loaded.model, windows, plan, encodings


def test_a_harmful_run_is_not_kept(setup):
    model, windows, plan, encodings = setup
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=2, lr=50.0)
    assert not result.kept and result.after == result.before
    assert result.encodings == encodings  # the same arrays: nothing was written over


def test_a_few_steps_lower_the_held_out_divergence(setup):
    model, windows, plan, encodings = setup
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=12, eval_every=6)
    assert result.kept and result.after < 0.97 * result.before
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    packed, scales, biases = result.encodings[name][0]
    np.testing.assert_array_equal(packed, encodings[name][0][0])  # codes kept
    assert not np.array_equal(scales, encodings[name][0][1])  # scales moved
    assert np.array_equal(np.array(mx.array(scales).astype(mx.bfloat16).astype(mx.float32)), scales)
