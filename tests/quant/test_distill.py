"""Distillation of scales and biases: codes read back exactly, held-out divergence never worse, and a
real gain where there is room for one."""

import mlx.core as mx
import numpy as np
import pytest

from mixquant.quant.distill import _codes, distill, learning_rate
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
    from mixquant.vocab import embedding_rows

    source, plan = build_plan(fixture_dir, ConvertOptions(recipe=uniform(2, 64), keep_vision=False, keep_mtp=False))
    encodings = nearest_encodings(source, plan, None, {})
    loaded = load(fixture_dir, dtype="float32", dequantize=True)
    windows = calibration_set("mix", loaded.model, loaded.tokenizer, 8 * 64, 64,
                              embedding_rows(loaded.config, fixture_dir))[:8]
    return loaded.model, windows, plan, encodings


def test_the_annealed_learning_rate_holds_for_half_the_steps_then_falls_linearly():
    assert learning_rate(3e-4, 10, anneal=False) == 3e-4
    schedule = learning_rate(3e-4, 10, anneal=True)
    rates = [float(schedule(mx.array(step))) for step in range(10)]
    np.testing.assert_allclose(rates, 3e-4 * np.array([1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]), rtol=1e-6)


def test_annealing_lowers_the_rate_of_the_last_steps_only(setup):
    """A 2-step annealed run is a constant-rate one (its falling step starts at the full rate); at 4
    steps the last one, at half the rate, ends elsewhere: the schedule reaches the optimizer."""
    model, windows, plan, encodings = setup
    name = "language_model.model.layers.0.mlp.down_proj.weight"

    def scales(steps, anneal):
        result = distill(model, windows, plan, encodings, mx.bfloat16, steps=steps, eval_every=steps,
                         anneal=anneal)
        assert result.kept
        return result.encodings[name][0][1]

    np.testing.assert_array_equal(scales(2, False), scales(2, True))
    constant, annealed = scales(4, False), scales(4, True)
    assert not np.array_equal(constant, annealed)


def test_a_harmful_run_is_not_kept(setup):
    model, windows, plan, encodings = setup
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=2, lr=50.0)
    assert not result.kept and result.after == result.before
    assert result.best_step == 0 and [s for s, _ in result.checks] == [2]  # the last step is always checked
    assert result.encodings == encodings  # the same arrays: nothing was written over


def test_a_few_steps_lower_the_held_out_divergence(setup):
    model, windows, plan, encodings = setup
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=12, eval_every=6)
    assert result.kept and result.after < 0.97 * result.before
    assert [s for s, _ in result.checks] == [6, 12]
    best_step, best = min(result.checks, key=lambda c: c[1])
    assert (result.best_step, result.after) == (best_step, best)
    name = "language_model.model.layers.0.mlp.down_proj.weight"
    packed, scales, biases = result.encodings[name][0]
    np.testing.assert_array_equal(packed, encodings[name][0][0])  # codes kept
    assert not np.array_equal(scales, encodings[name][0][1])  # scales moved
    assert np.array_equal(np.array(mx.array(scales).astype(mx.bfloat16).astype(mx.float32)), scales)


def test_norm_multipliers_move_with_the_scales_and_the_model_is_given_back(setup):
    from mlx.utils import tree_flatten

    model, windows, plan, encodings = setup
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=12, eval_every=6, norms=True)
    assert result.kept and result.after < result.before
    text_norms = {e.tensor.name for e in plan.entries if e.tensor.name.endswith("norm.weight")
                  and e.tensor.name.startswith("language_model.")}
    assert set(result.floats) == text_norms
    name = "language_model.model.layers.0.input_layernorm.weight"
    assert not np.allclose(result.floats[name], before[name])
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def test_every_unquantized_float_of_the_text_model_moves_with_floats(setup):
    """floats: the norms, Gated DeltaNet's conv1d, dt_bias and A_log of the text model move (the MTP
    head's do not: it is not in this plan); the model is given back unchanged."""
    from mlx.utils import tree_flatten

    model, windows, plan, encodings = setup
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=12, eval_every=6, floats=True)
    assert result.kept and result.after < result.before
    expected = {e.tensor.name for e in plan.entries if e.tensor.name.startswith("language_model.")
                and e.tensor.name.endswith(("norm.weight", "conv1d.weight", ".A_log", ".dt_bias"))}
    assert len(expected) == 6 * 3 + 8 * 2 + 2 * 2 + 6 * 1 + 1  # conv1d/dt_bias/A_log, layer norms, q/k norms
    assert set(result.floats) == expected
    for leaf in ("conv1d.weight", "A_log", "dt_bias"):
        name = f"language_model.model.layers.0.linear_attn.{leaf}"
        assert result.floats[name].shape == before[name].shape
        assert not np.allclose(result.floats[name], before[name])
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_short_convolutions_and_per_head_parameters_move_at_a_tenth_of_the_rate(setup):
    """Adam's first step (mlx's, without bias correction: (1 - beta1) / sqrt(1 - beta2) times the rate)
    moves every element with a gradient by the same amount: the rate 1e-3 for the norms, SLOW_RATE
    times that for conv1d, dt_bias and A_log."""
    from mlx.utils import tree_flatten

    from mixquant.quant.distill import SLOW_RATE

    model, windows, plan, encodings = setup
    start = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=1, lr=1e-3, floats=True)
    assert result.kept and result.best_step == 1
    for name, moved in result.floats.items():
        rate = 1e-3 * (SLOW_RATE if name.endswith(("conv1d.weight", ".A_log", ".dt_bias")) else 1)
        first_step = rate * (1 - 0.9) / np.sqrt(1 - 0.999)
        assert np.abs(moved - start[name]).max() == pytest.approx(first_step, rel=1e-3), name


def test_a_teacher_recomputed_per_window_gives_the_cached_teachers_result(setup):
    """Past the cache budget the unquantized model's log-probs are recomputed (its own modules and
    norms swapped back in): the same run, the same numbers, and the model given back unchanged."""
    from mlx.utils import tree_flatten

    model, windows, plan, encodings = setup
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    cached = distill(model, windows, plan, encodings, mx.bfloat16, steps=8, eval_every=4, norms=True)
    one_window = windows.shape[1] * 8192 * 4
    for budget in (0, 3 * one_window):
        recomputed = distill(model, windows, plan, encodings, mx.bfloat16, steps=8, eval_every=4, norms=True,
                             teacher_cache_bytes=budget)
        assert recomputed.kept and (recomputed.before, recomputed.after) == (cached.before, cached.after)
        for name, parts in cached.encodings.items():
            for (_, s, b), (_, s2, b2) in zip(parts, recomputed.encodings[name]):
                np.testing.assert_array_equal(s, s2)
                np.testing.assert_array_equal(b, b2)
        for name, value in cached.floats.items():
            np.testing.assert_array_equal(value, recomputed.floats[name])
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert all(np.array_equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("case", ["norms", "awq", "floats"])
def test_distilled_floats_are_written_as_distilled(tmp_path, case):
    """--q-distill-norms (alone, or with AWQ's scales folded into the same norms and an annealed rate)
    and --q-distill-floats: the written quant has the held-out KL divergence that distillation
    reported, its tuned tensors differ from the source's, and mlx_lm.load reads them as written."""
    import re

    from conftest import FIXTURE, run_cli
    from mlx.utils import tree_flatten
    from mlx_lm import load as mlx_load

    from mixquant.calib.data import DEFAULT_CALIB, calibration_set
    from mixquant.loading import load
    from mixquant.quant.distill import held_out_count
    from mixquant.vocab import embedding_rows

    awq = case == "awq"
    out = tmp_path / case
    assert run_cli("convert", "-i", FIXTURE, "-o", out, "--q-recipe", "uniform", "--q-bits", 2, "--q-distill", 8,
                   "--q-distill-floats" if case == "floats" else "--q-distill-norms", "--calib-tokens", 2048,
                   "--drop-vision", "--drop-mtp",
                   *(["--awq", "--awq-alpha", 0.5, "--q-distill-anneal", "--q-distill-lr", 1e-3] if awq else [])) == 0
    card = (out / "README.md").read_text()
    rate = " at learning rate 0.001 (the learning rate annealed toward zero over the second half)" if awq else \
        " at learning rate 0.0003"
    what = "every unquantized float tensor of the text model" if case == "floats" else "norm multipliers"
    assert f"Scales, biases and {what} distilled for 8 steps{rate} on" in card and ", kept." in card
    reported = float(re.search(r"held-out mean KL [0-9.]+ -> ([0-9.]+)", card).group(1))
    checks = re.search(r"Held-out mean KL at each check \(step: KL\): (.*); the state after step (\d+) is the "
                       r"one kept\.", card)
    by_step = {int(s): float(kl) for s, kl in (c.split(": ") for c in checks.group(1).split(", "))}
    assert list(by_step) == [3, 6, 8]  # one held-out window of four, so a check after every pass of three
    assert by_step[int(checks.group(2))] == min(by_step.values()) == reported

    source = load(FIXTURE, dtype="float32", dequantize=True)
    quant = load(out, dtype="float32", dequantize=True).model
    windows = calibration_set(DEFAULT_CALIB, source.model, source.tokenizer, 2048, 512,  # as convert took them
                              embedding_rows(source.config, FIXTURE))
    held = windows[np.random.default_rng(0).permutation(len(windows))[: held_out_count(len(windows))]]

    def logprobs(model, window):
        lg = model(mx.array(window[None]))[0]
        return lg - mx.logsumexp(lg, axis=-1, keepdims=True)

    kl = np.mean([float((mx.exp(logprobs(source.model, w)) * (logprobs(source.model, w) - logprobs(quant, w)))
                        .sum(-1).mean()) for w in held])
    assert kl == pytest.approx(reported, rel=2e-3 if awq else 1e-5, abs=1e-5)

    tuned = {"input_layernorm.weight": mx.bfloat16}
    if case == "floats":
        tuned.update({"linear_attn.conv1d.weight": mx.bfloat16, "linear_attn.A_log": mx.float32})
    files = mx.load(str(out / "model.safetensors"))
    originals = dict(tree_flatten(source.model.language_model.model.layers[0].parameters()))
    loaded = dict(tree_flatten(mlx_load(str(out))[0].language_model.model.layers[0].parameters()))
    for leaf, dtype in tuned.items():
        written = files[f"language_model.model.layers.0.{leaf}"]
        assert written.dtype == dtype and not mx.array_equal(written, originals[leaf].astype(dtype))
        assert mx.array_equal(loaded[leaf], written)


@pytest.mark.parametrize("flag", [["--q-distill-norms"], ["--q-distill-floats"], ["--q-distill-anneal"],
                                  ["--q-distill-lr", "1e-3"]])
def test_distill_options_need_distill(capsys, flag):
    from conftest import FIXTURE, run_cli

    assert run_cli("convert", "-i", FIXTURE, "-o", "/nonexistent/x", "--q-recipe", "uniform", "--q-bits", 3,
                   *flag) != 0
    assert f"{flag[0]}: only with --q-distill STEPS" in capsys.readouterr().err


@pytest.mark.parametrize("lr", ["0", "-0.001", "1", "nan"])
def test_distill_learning_rate_must_be_between_0_and_1(tmp_path, capsys, lr):
    from conftest import FIXTURE, run_cli

    out = tmp_path / "q"
    assert run_cli("convert", "-i", FIXTURE, "-o", out, "--q-recipe", "uniform", "--q-bits", 3,
                   "--q-distill", 4, "--q-distill-lr", lr) == 2
    err = capsys.readouterr().err
    assert f"--q-distill-lr: must be above 0 and below 1 (got {float(lr)})" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("windows, held", [(1, 1), (4, 1), (8, 2), (64, 16), (256, 64), (1024, 64)])
def test_held_out_is_a_quarter_up_to_64_windows(windows, held):
    from mixquant.quant.distill import held_out_count

    assert held_out_count(windows) == held


def test_floats_tune_the_bias_of_a_quantized_attention_projection(tmp_path):
    """A quantized linear's own bias sits on the module that replaces it while distilling: with
    floats it moves too, and is returned for writing like any other float."""
    from conftest import save_tiny_qwen35, token_ids

    from mixquant.convert import ConvertOptions, build_plan, nearest_encodings
    from mixquant.loading import load
    from mixquant.quant.recipe import uniform

    path = save_tiny_qwen35(tmp_path / "bias", attention_bias=True)
    source, plan = build_plan(path, ConvertOptions(recipe=uniform(2, 32), keep_mtp=False))
    encodings = nearest_encodings(source, plan, None, {})
    model = load(path, dtype="float32", dequantize=True).model
    windows = np.stack([token_ids(32, 512, seed) for seed in range(4)])
    result = distill(model, windows, plan, encodings, mx.bfloat16, steps=6, eval_every=3, floats=True)
    assert result.kept
    biases = {n for n in result.floats if n.endswith("_proj.bias")}
    assert biases == {f"language_model.model.layers.{i}.self_attn.{p}_proj.bias" for i in (1, 3) for p in "qkvo"}
    layer = model.language_model.model.layers[1].self_attn
    assert not np.allclose(result.floats["language_model.model.layers.1.self_attn.q_proj.bias"],
                           np.array(layer.q_proj.bias))


@pytest.mark.parametrize("flags, asked", [(["--q-recipe", "uniform", "--q-bits", "3", "--q-distill", "8"], "--q-distill"),
                                          (["--target-bpw", "3.6", "--quality", "best"], "--quality best")])
def test_distilling_a_model_that_does_not_fit_is_a_one_line_error(tmp_path, capsys, monkeypatch, flags, asked):
    from conftest import FIXTURE, run_cli

    import mixquant.loading

    monkeypatch.setattr(mixquant.loading, "memory_bytes", lambda: 40_000_000)  # a machine of 40 MB
    out = tmp_path / "q"
    assert run_cli("convert", "-i", FIXTURE, "-o", out, *flags) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("mixquant: note:")]
    assert len(err) == 1, err
    assert err[0].startswith(f"mixquant: error: {FIXTURE}: {asked}: distillation holds the whole unquantized model ("), err
    assert "more than half of this machine's memory (0.0 GB); use --q-rounding learned" in err[0], err
    assert not out.exists()
