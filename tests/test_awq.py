"""AWQ scales folded into norms and up_proj rows: the float function is preserved."""

import json

import numpy as np
import pytest

from conftest import mlx_logits, run_cli, save_tiny_qwen35, token_ids

IMATRIX_ARGS = ("--calib", "mix", "--awq-alpha", "0.5")


def _assert_same_function(src, tmp_path, vocab, *extra):
    plain, scaled = tmp_path / "plain", tmp_path / "awq"
    assert run_cli("convert", "-i", src, "-o", plain, "--dtype", "float32") == 0
    assert run_cli("convert", "-i", src, "-o", scaled, "--dtype", "float32", *extra) == 0
    ids = token_ids(64, vocab, seed=4)
    diff = np.abs(mlx_logits(scaled, ids) - mlx_logits(plain, ids)).max()
    assert diff <= 1e-4, diff
    return plain, scaled


def test_fixture_function_preserved(fixture_dir, tmp_path):
    from safetensors import safe_open

    plain, scaled = _assert_same_function(fixture_dir, tmp_path, 8166, *IMATRIX_ARGS)
    name = "language_model.model.layers.0.input_layernorm.weight"
    with safe_open(plain / "model.safetensors", "np") as a, safe_open(scaled / "model.safetensors", "np") as b:
        assert not np.allclose(a.get_tensor(name), b.get_tensor(name))  # the scales really were folded
    assert "## AWQ" in (scaled / "README.md").read_text()


@pytest.mark.parametrize("ratio", [2, 3])
def test_tiny_models_function_preserved(tmp_path, ratio):
    src = save_tiny_qwen35(tmp_path / f"r{ratio}", ratio=ratio, vocab_size=8192, seed=ratio)
    _assert_same_function(src, tmp_path, 8166, *IMATRIX_ARGS)


def test_moe_function_preserved(tmp_path):
    src = save_tiny_qwen35(tmp_path / "moe", ratio=2, moe=True, vocab_size=8192, seed=7)
    _assert_same_function(src, tmp_path, 8166, *IMATRIX_ARGS)


def test_imatrix_file_with_searched_alpha_quantizes(fixture_dir, tmp_path):
    im = tmp_path / "im.gguf"
    assert run_cli("imatrix", "-m", fixture_dir, "-o", im, "--tokens", 1024, "--ctx", 256) == 0
    out = tmp_path / "q"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--q-bits", "3", "--imatrix-path", im,
                   "--awq-judge-windows", "0") == 0
    card = (out / "README.md").read_text()
    assert "alpha searched per group (24 groups" in card
    assert json.loads((out / "config.json").read_text())["quantization"]["language_model.lm_head"]["bits"] == 6


def test_missing_imatrix_entries_warn_or_fail(fixture_dir, tmp_path, capsys):
    from mixquant.io.imatrix import read_imatrix, write_imatrix_gguf

    im = tmp_path / "im.gguf"
    run_cli("imatrix", "-m", fixture_dir, "-o", im, "--tokens", 512, "--ctx", 256)
    partial = read_imatrix(im)
    partial.entries = {k: v for k, v in partial.entries.items() if not k.startswith("blk.3.")}
    write_imatrix_gguf(tmp_path / "partial.gguf", partial)
    capsys.readouterr()
    out = tmp_path / "q"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--imatrix-path", tmp_path / "partial.gguf",
                   "--awq-alpha", "0.5") == 0
    assert capsys.readouterr().err.count("warning: imatrix does not cover every group") == 1
    card = (out / "README.md").read_text()
    assert "- layer 3 attn: no imatrix entry" in card and "- layer 3 mlp: no imatrix entry" in card
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "strict", "-q", "--imatrix-path",
                   tmp_path / "partial.gguf", "--awq-alpha", "0.5", "--imatrix-strict") == 2
    err = capsys.readouterr().err
    assert "imatrix: language_model.model.layers.3." in err and "no imatrix entry" in err
    assert not (tmp_path / "strict").exists()


def test_alpha_is_kept_only_when_the_held_out_rows_confirm():
    from mixquant.quant.awq import _choose

    assert _choose(lambda a: (1.0 - 0.5 * a, 1.0 - 0.5 * a)) == 1.0
    assert _choose(lambda a: (1.0 - 0.5 * a, 1.0 + a)) == 0.0  # fits the chosen rows, hurts the others
    assert _choose(lambda a: (1.0 - 0.5 * a, 1.0 - 0.001 * a)) == 0.0  # under 1%: noise
    assert _choose(lambda a: ((a - 0.3) ** 2, (a - 0.3) ** 2)) == 0.3


def test_scales_are_normalised_and_follow_importance():
    from mixquant.quant.awq import scales_for

    imp = np.array([0.01, 1.0, 4.0, 100.0])
    s = scales_for(imp, 0.5)
    assert s.max() * s.min() == pytest.approx(1.0)
    assert np.all(np.diff(s) > 0)
    np.testing.assert_allclose(scales_for(imp, 0.0), np.ones(4))


def _mean_kl(model_dir, windows, reference):
    from mixquant.eval.kld import forward_logits
    from mixquant.eval.metrics import log_softmax
    from mixquant.loading import load

    model = load(model_dir, dequantize=True).model
    total = sum(float((np.exp(r) * (r - log_softmax(forward_logits(model, w)))).sum())
                for w, r in zip(windows, reference))
    return total / sum(len(r) for r in reference)


@pytest.mark.parametrize("moe", [False, True])
def test_judged_search_matches_the_written_model(tmp_path, monkeypatch, moe):
    """The end-to-end check's divergences are those of the models convert writes: without AWQ
    before the search, with the chosen scales and clipping fits after it (MoE: expert groups are
    decided without the check, the rest with it)."""
    from mixquant.convert import AwqOptions, ConvertOptions, convert
    from mixquant.quant import awq
    from mixquant.quant.recipe import uniform

    src = save_tiny_qwen35(tmp_path / "src", ratio=2, moe=moe, vocab_size=8192, seed=11)
    seen = {}
    real_compute = awq.compute

    def spy(*args):
        seen["judge"], seen["result"] = args[-1], real_compute(*args)
        return seen["result"]

    monkeypatch.setattr(awq, "compute", spy)
    options = dict(recipe=uniform(3, 32), dtype="float32", keep_vision=False, keep_mtp=False, progress=False)
    convert(src, tmp_path / "awq", ConvertOptions(**options, awq=AwqOptions(tokens=1024, ctx=128, judge_windows=2)))
    convert(src, tmp_path / "plain", ConvertOptions(**options))
    judge, result = seen["judge"], seen["result"]
    before, after = result.judged
    assert after < before
    assert result.fits or any(result.alphas.values())
    assert _mean_kl(tmp_path / "plain", judge.windows, judge.reference) == pytest.approx(before, rel=1e-3)
    assert _mean_kl(tmp_path / "awq", judge.windows, judge.reference) == pytest.approx(after, rel=1e-3)
    card = (tmp_path / "awq" / "README.md").read_text()
    assert f"mean KL divergence {before:.5f} without AWQ, {after:.5f} with it" in card


def test_judge_leaves_the_model_as_it_was(tmp_path):
    from mixquant.calib.imatrix import calibrate

    src = save_tiny_qwen35(tmp_path / "src", ratio=3, vocab_size=8192, seed=12)
    _, _, windows, judge = calibrate(src, "mix", 512, 128, judge_windows=2)
    assert len(judge.windows) == 2 and judge.windows.shape[1] == 128
    assert judge.divergence() == pytest.approx(0.0, abs=1e-9)
    module = next(m for m in judge.modules if m.endswith("layers.0.mlp.down_proj"))
    w = judge.weight(module)
    assert judge.try_weights({module: w * 1.5}) > 1e-4
    np.testing.assert_array_equal(np.array(judge.modules[module].weight), w)
    assert judge.divergence() == pytest.approx(0.0, abs=1e-9)


def test_negative_judge_windows_is_an_error(fixture_dir, tmp_path, capsys):
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "q", "-q", "--calib", "mix",
                   "--awq-judge-windows", "-1") == 2
    assert "--awq-judge-windows: must be 0 or more, got -1" in capsys.readouterr().err


# --- an imatrix must belong to the model ----------------------------------------------------------

def test_imatrix_of_another_model_is_an_error(fixture_dir, tmp_path, capsys):
    from pathlib import Path

    smollm2 = Path(__file__).parent / "fixtures" / "smollm2-imatrix" / "imatrix.gguf"
    capsys.readouterr()
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "q", "-q", "--imatrix-path", smollm2,
                   "--awq-alpha", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "entry blk.0.ffn_gate.weight has rows of 576 values" in err[0], err
    assert "layers.0.mlp.gate_proj.weight has 256 inputs: the imatrix is of another model" in err[0]
    assert not (tmp_path / "q").exists()


def test_imatrix_matching_nothing_or_of_another_architecture(fixture_dir, tmp_path, capsys):
    from mixquant.io.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_gguf

    none = Imatrix(entries={"blk.99.ffn_up.weight": ImatrixEntry(np.ones((1, 256), np.float32),
                                                                np.ones(1, np.float32))})
    write_imatrix_gguf(tmp_path / "none.gguf", none)
    capsys.readouterr()
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "q", "-q", "--imatrix-path",
                   tmp_path / "none.gguf", "--awq-alpha", "0.5") == 2
    assert "no entry matches a tensor of this model" in capsys.readouterr().err

    im = tmp_path / "im.gguf"
    assert run_cli("imatrix", "-m", fixture_dir, "-o", im, "--tokens", 256, "--ctx", 128) == 0
    ours = read_imatrix(im)
    assert ours.architecture == "qwen35"
    ours.architecture = "llama"
    write_imatrix_gguf(tmp_path / "llama.gguf", ours)
    capsys.readouterr()
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "q", "-q", "--imatrix-path",
                   tmp_path / "llama.gguf", "--awq-alpha", "0.5") == 2
    assert "computed on a llama model; this model is qwen35" in capsys.readouterr().err


def test_a_model_too_large_for_the_judge_is_searched_layer_by_layer(fixture_dir, monkeypatch, caplog):
    from mixquant import convert as conv
    from mixquant.quant.recipe import uniform

    source, plan = conv.build_plan(fixture_dir, conv.ConvertOptions(recipe=uniform(3, 32), keep_vision=False,
                                                                   keep_mtp=False))
    monkeypatch.setattr(conv, "fits_in_memory", lambda plan: False)
    result = conv.run_awq(fixture_dir, source, plan, conv.AwqOptions(tokens=512, ctx=128, judge_windows=2))
    assert result.judged is None and len(result.alphas) == 24
    assert f"the float model ({conv.float_bytes(plan) / 1e9:.1f} GB in float32) does not fit" in caplog.text
