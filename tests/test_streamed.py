"""Calibration one decoder layer at a time gives the statistics of the whole model in memory."""

import numpy as np
import pytest


@pytest.mark.parametrize("which", ["fixture", "moe-text"])
def test_streamed_statistics_equal_the_in_memory_ones(which, fixture_dir, tiny_models):
    from mixquant.calib.collect import collect
    from mixquant.calib.streamed import StreamedModel, collect_streamed
    from mixquant.loading import load

    path = fixture_dir if which == "fixture" else tiny_models[which]
    loaded = load(path, dtype="float32", dequantize=True)
    vocab = loaded.model.language_model.args.vocab_size
    windows = np.random.default_rng(0).integers(0, vocab, (4, 64))
    whole = collect(loaded.model, windows)
    streamed = collect_streamed(StreamedModel(path), windows, samples=False)
    assert set(streamed) == set(whole) and len(whole) > 10
    for module, s in whole.items():
        np.testing.assert_array_equal(streamed[module].counts, s.counts, err_msg=module)
        scale = max(float(np.abs(s.sum2).max()), 1e-30)
        assert float(np.abs(streamed[module].sum2 - s.sum2).max()) <= 1e-5 * scale, module
        assert streamed[module].samples == [None] * len(s.samples)  # not kept: imatrix needs none
    if which == "moe-text":
        assert any(s.sum2.shape[0] > 1 for s in whole.values())  # expert stacks, per expert
