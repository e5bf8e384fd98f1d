"""Learned rounding: zero offsets are rounding to nearest, training lowers a layer's output error
(and what it reports is what it writes), a no-better result falls back to nearest, and quants
(dense, with AWQ) that mlx-lm loads; MoE in test_gptq.py's per-expert test."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mixquant.quant import learned


def _learner(w, bits=3, group=32):
    q, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=group, bits=bits)
    s, b = np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
    kind = "experts" if w.ndim == 3 else "linear"
    return learned.learner_class()(w, s, b, group, bits, kind), s, b


def _bf16(a):
    return np.array(mx.array(a.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))


@pytest.mark.parametrize("shape", [(16, 64), (3, 16, 64)])
def test_zero_offsets_are_rounding_to_nearest(shape):
    w = _bf16(np.random.default_rng(0).normal(size=shape))
    learner, s, b = _learner(w)
    codes, scales, biases, deq = learned.encoding(learner)
    scale, bias = np.repeat(s, 32, axis=-1), np.repeat(b, 32, axis=-1)
    np.testing.assert_array_equal(codes, np.clip(np.round((w - bias) / scale), 0, 7))
    np.testing.assert_array_equal(scales, s)
    np.testing.assert_array_equal(biases, b)
    np.testing.assert_allclose(deq, codes * scale + bias, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(learner.weight_now()), deq, rtol=0, atol=1e-6)


class _Layer(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def __call__(self, x, scale=1.0):
        return self.proj(x) * scale


def _correlated(rng, n, tokens, rank=4):
    """Inputs in a few directions: where rounding to nearest is far from the best rounding."""
    basis = rng.normal(size=(rank, n))
    return (rng.normal(size=(tokens, rank)) @ basis + 0.05 * rng.normal(size=(tokens, n))).astype(np.float32)


def test_training_lowers_the_layer_error_and_reports_what_it_writes():
    rng = np.random.default_rng(1)
    w = _bf16(rng.normal(size=(24, 64)) * 0.1)
    learner, s, b = _learner(w)
    layer = _Layer(learner)
    xs = [mx.array(_correlated(rng, 64, 256)) for _ in range(4)]
    calls = [(x, (), {"scale": 2.0}) for x in xs]  # the layer's own arguments reach it
    targets = [2.0 * x @ mx.array(w).T for x in xs]
    before, after, kept = learned.train_layer(layer, calls, targets, [learner], steps=100)
    assert kept and after < 0.5 * before, (before, after)
    codes, _, _, deq = learned.encoding(learner)
    nearest = np.clip(np.round((w - np.repeat(b, 32, axis=1)) / np.repeat(s, 32, axis=1)), 0, 7)
    assert 0 < np.mean(codes != nearest) and np.all(np.abs(codes - nearest) <= 1)
    written = np.mean([float(mx.mean((2.0 * x @ mx.array(deq).T - t) ** 2)) for x, t in zip(xs, targets)])
    assert written == pytest.approx(after, rel=1e-5)
    np.testing.assert_allclose(np.array(mx.dequantize(mx.array(_pack(codes)), mx.array(s), mx.array(b), 32, 3)), deq,
                               rtol=0, atol=1e-6)


def _pack(codes):
    from mixquant.quant.gptq import pack_codes

    return pack_codes(codes, 3)


def test_a_rounding_no_better_than_nearest_is_not_kept():
    """Targets that the nearest rounding reproduces exactly: nothing can beat it, so the offsets
    go back to zero and the encoding is rounding to nearest."""
    rng = np.random.default_rng(2)
    w = _bf16(rng.normal(size=(8, 64)))
    learner, _, _ = _learner(w)
    _, _, _, nearest = learned.encoding(learner)
    layer = _Layer(learner)
    xs = [mx.array(rng.normal(size=(32, 64)).astype(np.float32)) for _ in range(2)]
    before, after, kept = learned.train_layer(layer, [(x, (), {}) for x in xs], [x @ mx.array(nearest).T for x in xs],
                                              [learner], steps=20)
    assert not kept and after == before
    assert float(mx.abs(learner.v).max()) == 0.0
    np.testing.assert_array_equal(learned.encoding(learner)[3], nearest)


def _convert_both(tmp_path, src, reference, steps, tokens, *flags):
    """Mean KL divergence of the fixture quantized uniform 3-bit, rounded to nearest and learned."""
    from conftest import run_cli

    from mixquant.eval.kld import evaluate

    kld = {}
    for rounding in ("nearest", "learned"):
        extra = ["--q-learn-steps", steps] if rounding == "learned" else []
        assert run_cli("convert", "-i", src, "-o", tmp_path / rounding, "--q-recipe", "uniform", "--q-bits", 3,
                       "--drop-vision", "--drop-mtp", "--q-rounding", rounding, "--calib-tokens", tokens, *extra,
                       *flags) == 0
        kld[rounding] = evaluate(tmp_path / rounding, reference)["kld"]["mean"]
    return kld


def test_learned_quant_beats_nearest_and_loads_in_mlx_lm(tmp_path):
    """On the fixture (16 steps per layer, 4096 calibration tokens): lower KL divergence than rounding
    to nearest on text the calibration does not see."""
    from conftest import FIXTURE, assert_loads_as_it_is

    from mixquant.eval.kld import compute_reference

    kld = _convert_both(tmp_path, FIXTURE, compute_reference(FIXTURE, None, 128, 8), 16, 4096)
    assert kld["learned"] < 0.9 * kld["nearest"], kld
    assert "Learned rounding (AutoRound-style" in (tmp_path / "learned" / "README.md").read_text()
    assert_loads_as_it_is(tmp_path / "learned")


def test_learned_rounding_composes_with_awq(tmp_path):
    """With AWQ's channel scales the learner rounds the scaled weight and the written quant undoes
    the scales where AWQ folded them: a misplaced scale would multiply the divergence, not leave it
    near nearest's (8 steps on 2048 tokens learn little)."""
    from conftest import FIXTURE, assert_loads_as_it_is

    from mixquant.eval.kld import compute_reference

    kld = _convert_both(tmp_path, FIXTURE, compute_reference(FIXTURE, None, 128, 8), 8, 2048,
                        "--awq", "--awq-alpha", 0.5)
    assert kld["learned"] < 1.25 * kld["nearest"], kld
    assert_loads_as_it_is(tmp_path / "learned")


@pytest.mark.parametrize("argv, message", [
    (["--q-learn-steps", 8], "--q-learn-steps: only with --q-rounding learned"),
    (["--q-rounding", "learned", "--q-learn-steps", 0], "--q-learn-steps: must be at least 1, got 0"),
])
def test_learn_steps_flag_errors(capsys, argv, message):
    from conftest import FIXTURE, run_cli

    assert run_cli("convert", "-i", FIXTURE, "-o", "/nonexistent/x", "--q-recipe", "uniform", "--q-bits", 3,
                   *argv) != 0
    assert message in capsys.readouterr().err
