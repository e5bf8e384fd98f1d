"""Calibration, GPTQ and the evaluation's reference run one decoder layer at a time give what the
whole model in memory gives."""

import numpy as np
import pytest

from conftest import save_tiny_qwen35


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


@pytest.mark.parametrize("which", ["fixture", "moe"])
def test_streamed_awq_decides_as_the_in_memory_search(which, fixture_dir, tmp_path):
    """AWQ without the judge, layer-streamed (each layer's groups decided as soon as its inputs are
    recorded), chooses the alphas and scales of the search over the whole model's statistics."""
    from mixquant.arch import family_for_config
    from mixquant.calib.data import DEFAULT_CALIB
    from mixquant.calib.imatrix import calibrate
    from mixquant.convert import AwqOptions, ConvertOptions, build_plan, run_awq
    from mixquant.quant import awq
    from mixquant.quant.recipe import uniform

    path = fixture_dir if which == "fixture" else save_tiny_qwen35(tmp_path, ratio=2, moe=True, vocab_size=8192,
                                                                    seed=7)  # the vocabulary of the mix's tokens
    source, plan = build_plan(path, ConvertOptions(recipe=uniform(3, 32), keep_vision=False, keep_mtp=False))
    opts = AwqOptions(tokens=1024, ctx=128, judge_windows=0)
    streamed = run_awq(path, source, plan, opts)

    stats, _, _, _ = calibrate(path, DEFAULT_CALIB, 1024, 128)  # the default calibration, as run_awq took it
    structure = family_for_config(source.config, source.config_path).structure
    whole = awq.compute(source, plan, structure,
                        lambda m, i: stats[m].sum2[i] / stats[m].counts[i] if stats[m].counts[i] else None,
                        lambda m, i: stats[m].sample(i), None, False)
    assert streamed.alphas == whole.alphas
    assert any(whole.alphas.values()) and streamed.skipped == whole.skipped
    assert streamed.ops.keys() == whole.ops.keys()
    for key, ops in whole.ops.items():
        for (op_a, a), (op_b, b) in zip(streamed.ops[key], ops, strict=True):
            assert op_a == op_b
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("which", ["fixture", "moe"])
def test_streamed_gptq_equals_the_in_memory_gptq(which, fixture_dir, tmp_path):
    """GPTQ reading one decoder layer at a time from the source rounds every tensor as GPTQ over the
    whole float model does."""
    from mixquant.calib.data import DEFAULT_CALIB, calibration_set
    from mixquant.calib.rounding import run_gptq
    from mixquant.convert import ConvertOptions, build_plan, run_rounding
    from mixquant.loading import load
    from mixquant.quant.encode import mx_dtype
    from mixquant.quant.recipe import uniform
    from mixquant.vocab import embedding_rows

    path = fixture_dir if which == "fixture" else save_tiny_qwen35(tmp_path, ratio=2, moe=True, vocab_size=8192,
                                                                    seed=7)
    options = ConvertOptions(recipe=uniform(3, 32), keep_vision=False, keep_mtp=False, rounding="gptq",
                             calib_tokens=1024)
    _, plan = build_plan(path, options)
    streamed = run_rounding(path, plan, options, None)

    loaded = load(path, dtype="float32", dequantize=True)
    windows = calibration_set(DEFAULT_CALIB, loaded.model, loaded.tokenizer, 1024, 512,  # as run_rounding took them
                              embedding_rows(loaded.config, path), source=path)
    whole = run_gptq(loaded.model, windows, plan, mx_dtype(plan.entries[0].dtype))
    assert streamed.keys() == whole.keys() and len(whole) > 10
    for name, parts in whole.items():
        for (codes_a, s_a, b_a), (codes_b, s_b, b_b) in zip(streamed[name], parts, strict=True):
            np.testing.assert_array_equal(codes_a, codes_b, err_msg=name)
            np.testing.assert_allclose(s_a, s_b, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(b_a, b_b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("which", ["fixture", "moe"])
def test_streamed_reference_equals_the_in_memory_one(which, fixture_dir, tmp_path):
    """The evaluation's reference of an HF checkpoint, run a layer at a time, is that of the same
    weights loaded whole (a float32 MLX conversion, which mlx-lm loads)."""
    from conftest import run_cli

    from mixquant.eval.kld import compute_reference

    src = fixture_dir if which == "fixture" else save_tiny_qwen35(tmp_path / "src", ratio=2, moe=True,
                                                                   vocab_size=8192, seed=7)
    whole = tmp_path / "f32"
    assert run_cli("convert", "-i", src, "-o", whole, "--dtype", "float32", "--drop-vision", "--drop-mtp") == 0
    streamed, loaded = (compute_reference(p, None, 64, 3, topk=0) for p in (src, whole))
    assert streamed.n_params == loaded.n_params and streamed.tokenizer == loaded.tokenizer
    np.testing.assert_array_equal(streamed.windows, loaded.windows)
    np.testing.assert_allclose(np.stack(streamed.full), np.stack(loaded.full), atol=1e-5)
