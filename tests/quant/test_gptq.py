"""GPTQ in MLX's format: packing as MLX unpacks, equality with round-to-nearest where nothing can be
compensated, a lower output error where inputs are correlated, and quants that mlx-lm loads."""

import mlx.core as mx
import numpy as np
import pytest

from mixquant.quant.gptq import DAMP, gptq, pack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_is_what_mlx_unpacks(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(5, 128))
    packed = pack_codes(codes, bits)
    ones, zeros = mx.ones((5, 2)), mx.zeros((5, 2))
    back = np.array(mx.dequantize(mx.array(packed), ones, zeros, group_size=64, bits=bits))
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uncorrelated_inputs_give_round_to_nearest(bits):
    """With a diagonal Hessian there is nothing to compensate: MLX's own scales and biases, and each
    weight at the code nearest to it under them (MLX itself rounds with the scale before it is
    stored in bfloat16, so its codes can be one off; never closer)."""
    rng = np.random.default_rng(bits)
    w = np.array(mx.array(rng.normal(size=(16, 128)).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    h = np.diag(rng.uniform(0.5, 2.0, size=128))
    packed, s, b, deq = gptq(w, h, bits, 64, mx.bfloat16, fit=False)
    q, s_ref, b_ref = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=bits)
    np.testing.assert_array_equal(s, np.array(s_ref.astype(mx.float32)))
    np.testing.assert_array_equal(b, np.array(b_ref.astype(mx.float32)))
    scale, bias = np.repeat(s, 64, axis=1), np.repeat(b, 64, axis=1)
    nearest = np.clip(np.round((w - bias) / scale), 0, 2**bits - 1)
    np.testing.assert_array_equal(packed, pack_codes(nearest.astype(np.int64), bits))
    theirs = np.array(mx.dequantize(q, s_ref.astype(mx.float32), b_ref.astype(mx.float32), group_size=64, bits=bits))
    assert np.all(np.abs(deq - w) <= np.abs(theirs - w) + 1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uncorrelated_inputs_with_the_fit_give_the_weighted_clipping_fit(bits):
    """With a diagonal Hessian and the fit (the default), each group's pair is mixquant.quant.fit's
    clipping fit weighted by the (damped) diagonal, and the weighted error is never above MLX's."""
    from mixquant.quant.fit import quantize

    rng = np.random.default_rng(20 + bits)
    w = np.array(mx.array(rng.normal(size=(16, 128)).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    d = rng.uniform(0.5, 2.0, size=128)
    packed, s, b, deq = gptq(w, np.diag(d), bits, 64, mx.bfloat16)
    damped = d + DAMP * d.mean()
    _, s_ref, b_ref = quantize(w, bits, 64, mx.bfloat16, damped)
    np.testing.assert_array_equal(s, np.array(s_ref.astype(mx.float32)))
    np.testing.assert_array_equal(b, np.array(b_ref.astype(mx.float32)))
    rtn = np.array(mx.dequantize(*mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=bits),
                                 group_size=64, bits=bits).astype(mx.float32))
    assert float((damped * (deq - w) ** 2).sum()) <= float((damped * (rtn - w) ** 2).sum()) + 1e-9


def _correlated_inputs(rng, n, rank=8, tokens=4096):
    basis = rng.normal(size=(rank, n)) * rng.lognormal(0, 1, size=n)
    return rng.normal(size=(tokens, rank)) @ basis + 0.05 * rng.normal(size=(tokens, n))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_correlated_inputs_lower_the_output_error(bits):
    rng = np.random.default_rng(10 + bits)
    x = _correlated_inputs(rng, 128)
    w = (rng.normal(size=(32, 128)) * 0.1).astype(np.float32)
    h = x.T @ x / len(x)
    packed, s, b, deq = gptq(w, h, bits, 32, mx.bfloat16)
    mlx_deq = np.array(mx.dequantize(mx.array(packed), mx.array(s), mx.array(b), group_size=32, bits=bits))
    np.testing.assert_array_equal(mlx_deq, deq)  # what MLX will compute is what GPTQ optimised
    q, ss, bb = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=32, bits=bits)
    rtn = np.array(mx.dequantize(q, ss.astype(mx.float32), bb.astype(mx.float32), group_size=32, bits=bits))
    err = {name: float(np.square(x @ (d - w).T).mean()) for name, d in (("gptq", deq), ("rtn", rtn))}
    assert err["gptq"] < 0.7 * err["rtn"], err
    assert np.array_equal(np.array(mx.array(s).astype(mx.bfloat16).astype(mx.float32)), s)


def test_gptq_quant_loads_and_matches_its_dequantized_forward(tmp_path):
    """mlx_lm.load reads the GPTQ quant as it is (no side files); its quantized forward agrees with
    the same weights dequantized."""
    from conftest import FIXTURE, assert_loads_as_it_is, run_cli

    out = tmp_path / "gptq"
    assert run_cli("convert", "-i", FIXTURE, "-o", out, "-q", "--q-recipe", "uniform", "--q-bits", "3",
                   "--q-rounding", "gptq", "--calib-tokens", 2048, "--drop-vision", "--drop-mtp") == 0
    assert sorted(p.name for p in out.iterdir()) == [".mixquant-output.json", "README.md", "chat_template.jinja",
                                                      "config.json",
                                                      "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert "## Rounding" in (out / "README.md").read_text()
    assert_loads_as_it_is(out)


@pytest.mark.parametrize("rounding, flags, every_expert", [
    ("gptq", ["--calib-tokens", 2048], True),
    ("learned", ["--calib-tokens", 8192, "--q-learn-steps", 32], False),
])
def test_rounding_per_expert_on_a_tiny_moe(tmp_path, rounding, flags, every_expert):
    """Expert stacks are rounded per expert (GPTQ: each on the tokens routed to it; learned: through
    the router, as the layer runs): lower KL divergence than rounding to nearest, and mlx_lm.load
    reads the result as quantized SwitchLinears."""
    from conftest import run_cli, save_tiny_qwen35
    from mlx_lm import load as mlx_load
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from safetensors import safe_open

    from mixquant.eval.kld import compute_reference, evaluate

    src = save_tiny_qwen35(tmp_path / "moe", ratio=2, moe=True, vocab_size=8192, seed=31)
    reference = compute_reference(src, None, 64, 16)
    stack = "language_model.model.layers.0.mlp.switch_mlp.down_proj.weight"
    kld, codes = {}, {}
    for method in ("nearest", rounding):
        out = tmp_path / method
        assert run_cli("convert", "-i", src, "-o", out, "--q-recipe", "uniform", "--q-bits", 3, "--q-group-size", 32,
                       "--q-rounding", method, *(flags if method == rounding else ["--calib-tokens", 2048])) == 0
        kld[method] = evaluate(out, reference)["kld"]["mean"]
        with safe_open(str(out / "model.safetensors"), "np") as f:
            codes[method] = f.get_tensor(stack)  # packed uint32 [experts, out, in * bits / 32]
    assert codes[rounding].shape == codes["nearest"].shape and codes[rounding].shape[0] == 4
    changed = [not np.array_equal(codes[rounding][e], codes["nearest"][e]) for e in range(4)]
    assert all(changed) if every_expert else any(changed)
    assert kld[rounding] < kld["nearest"], kld
    model, _ = mlx_load(str(tmp_path / rounding))
    assert isinstance(model.language_model.model.layers[0].mlp.switch_mlp.down_proj, QuantizedSwitchLinear)


def test_rounding_cache_is_read_back_and_keyed(tmp_path, capsys):
    """--q-rounding-cache: a second conversion with the same settings takes the rounding from the cache
    (what the cache holds is what it writes), one with other calibration settings rounds again into a
    file of its own, and a cache file that is not one is a one-line error."""
    import mlx.core as mx

    from conftest import FIXTURE, run_cli
    from mixquant.io.rounding_cache import load_rounded, save_rounded

    cache = tmp_path / "cache"
    args = ["-i", FIXTURE, "-q", "--q-recipe", "uniform", "--q-bits", "3", "--q-rounding", "gptq", "--drop-vision",
            "--drop-mtp", "--q-rounding-cache", cache]
    assert run_cli("convert", "-o", tmp_path / "a", *args, "--calib-tokens", 512) == 0
    [entry] = list(cache.iterdir())
    rounded = load_rounded(entry)
    name = sorted(rounded)[0]
    q, s, b = rounded[name][0]
    rounded[name] = [(np.zeros_like(q), s, b)]
    save_rounded(entry, rounded)
    assert run_cli("convert", "-o", tmp_path / "b", *args, "--calib-tokens", 512) == 0
    a, b = (mx.load(str(tmp_path / o / "model.safetensors")) for o in ("a", "b"))
    assert not np.any(np.array(b[name])) and np.any(np.array(a[name]))
    assert sorted(a) == sorted(b)
    for key in a:
        if key != name:
            np.testing.assert_array_equal(np.array(a[key].astype(mx.float32)), np.array(b[key].astype(mx.float32)))

    assert run_cli("convert", "-o", tmp_path / "c", *args, "--calib-tokens", 1024) == 0
    assert len(list(cache.iterdir())) == 2
    entry.write_bytes(b"not a zip")
    capsys.readouterr()
    assert run_cli("convert", "-o", tmp_path / "d", *args, "--calib-tokens", 512) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mixquant: error: {entry}: not a readable rounding cache (not an .npz file); remove it"]
    assert not (tmp_path / "d").exists()


def test_the_allocation_prices_gptq_by_the_error_it_leaves():
    """gptq_ratio (the proxy's price of a linear after GPTQ) against GPTQ itself: the H-weighted
    output error of GPTQ over that of rounding to nearest, on inputs from independent to strongly
    correlated, within 12% and in the same order; exactly 1 for a diagonal Hessian."""
    from mixquant.quant.fit import fake_quantize
    from mixquant.quant.sensitivity import gptq_ratio

    rng = np.random.default_rng(3)
    n = 128
    w = rng.standard_normal((256, n)).astype(np.float32)
    predicted, measured = [], []
    for mixing in (0.0, 0.5, 2.0):
        x = rng.standard_normal((4096, n)) @ (np.eye(n) + mixing * rng.standard_normal((n, n)) / np.sqrt(n))
        h = x.T @ x / len(x)
        _, _, _, deq = gptq(w, h, 3, 64, mx.float32, fit=False)

        def error(q):
            d = q.astype(np.float64) - w
            return float(np.einsum("ij,jk,ik->", d, h, d))

        measured.append(error(deq) / error(fake_quantize(w, 3, 64, mx.float32)))
        predicted.append(gptq_ratio(h))
    assert predicted == pytest.approx(measured, rel=0.12)
    assert predicted == sorted(predicted, reverse=True) and measured == sorted(measured, reverse=True)
    assert predicted[-1] < 0.6
    assert gptq_ratio(np.diag(rng.uniform(0.5, 2, n))) == pytest.approx(1.0, rel=1e-12)
