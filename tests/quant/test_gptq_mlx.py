"""GPTQ in MLX (mixquant.quant.gptq_mlx) against the NumPy float64 reference (mixquant.quant.gptq),
matrix by matrix of a stack, and the Hessians of routed inputs gathered per expert in one batch."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mixquant.quant.gptq import gptq
from mixquant.quant.gptq_mlx import gptq_stack


def _problem(seed, stack, rows, n, dead=()):
    rng = np.random.default_rng(seed)
    mix = np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n)
    x = rng.standard_normal((stack, 1024, n)) @ mix
    x[..., :4] *= 6  # a few loud inputs: act-order moves them first
    h = np.einsum("eti,etj->eij", x, x) / x.shape[1]
    for e, col in dead:
        h[e, col, :] = h[e, :, col] = 0
    w = (rng.standard_normal((stack, rows, n)) * 0.05).astype(np.float32)
    return w, h


@pytest.mark.parametrize("columns", ["numpy", "mlx"])
@pytest.mark.parametrize("bits, group, fit, act_order", [(3, 64, True, True), (4, 32, True, True),
                                                        (2, 64, False, True), (3, 32, True, False)])
def test_each_matrix_of_a_stack_is_what_the_reference_gives_it(bits, group, fit, act_order, columns):
    w, h = _problem(bits * 10 + group, 3, 48, 320, dead=[(1, 7), (2, 300)])
    packed, scales, biases, deq = gptq_stack(w, h, bits, group, mx.bfloat16, act_order=act_order, fit=fit,
                                             columns=columns)
    assert packed.shape == (3, 48, 320 * bits // 32) and scales.shape == biases.shape == (3, 48, 320 // group)
    for e in range(3):
        rp, rs, rb, rd = gptq(w[e], h[e], bits, group, mx.bfloat16, act_order=act_order, fit=fit)
        step = np.repeat(rs, group, axis=1)
        same_code = np.abs(deq[e] - rd) <= 1e-3 * np.abs(step)
        assert same_code.mean() >= 0.99, (e, same_code.mean())
        assert np.mean(scales[e] == rs) >= 0.99 and np.mean(biases[e] == rb) >= 0.99
        err_ref = np.einsum("rj,jk,rk->", w[e] - rd, h[e], w[e] - rd)
        err = np.einsum("rj,jk,rk->", w[e] - deq[e], h[e], w[e] - deq[e])
        assert err == pytest.approx(err_ref, rel=1e-3)
        # the packed codes unpack to what the scales and biases dequantize
        back = mx.dequantize(mx.array(packed[e]), mx.array(scales[e]), mx.array(biases[e]), group_size=group, bits=bits)
        assert np.allclose(np.array(back), deq[e], atol=1e-6)


def test_routed_inputs_are_summed_per_expert_in_one_batch():
    from mixquant.calib.rounding import _gram

    rng = np.random.default_rng(3)
    x = rng.standard_normal((25, 1, 1, 16)).astype(np.float32)  # as a SwitchLinear gets it: top-2 of 6 experts
    experts = np.stack([rng.choice([0, 1, 2, 3, 5], 2, replace=False) for _ in range(25)])  # none reaches 4
    got, count = _gram(mx.array(x), mx.array(experts), 6)
    got = np.array(got)
    rows = x.reshape(25, 16).astype(np.float64)
    for e in range(6):
        sel = rows[(experts == e).any(axis=1)]
        assert np.allclose(got[e], sel.T @ sel, rtol=1e-5, atol=1e-5)
        assert count[e] == len(sel)
    assert not got[4].any() and count[4] == 0


def test_linears_reading_one_input_share_its_product():
    from mixquant.calib.rounding import _hooks

    Hessian = _hooks()
    q, k = Hessian(nn.Linear(8, 4), 1, 8, [range(2)]), Hessian(nn.Linear(8, 3), 1, 8, [range(2)])
    x = mx.array(np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32))
    q(x), k(x)
    assert len(Hessian.grams) == 1
    rows = np.array(x).reshape(10, 8).astype(np.float64)
    Hessian.grams.clear()
    q(x + 1)
    k(x)
    assert np.allclose(k.sums()[0][0], 2 * rows.T @ rows, atol=1e-4) and k.sums()[1][0] == 20
    assert np.allclose(q.sums()[0][0], rows.T @ rows + (rows + 1).T @ (rows + 1), atol=1e-3) and q._count[0] == 20


def test_a_chunk_of_experts_gets_the_sums_the_whole_stack_gives_them():
    from mixquant.calib.rounding import _gram

    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 1, 1, 16)).astype(np.float32)
    experts = np.stack([rng.choice(8, 2, replace=False) for _ in range(40)])
    whole, count = _gram(mx.array(x), mx.array(experts), 8)
    part, part_count = _gram(mx.array(x), mx.array(experts), 3, range(2, 5))
    assert np.array(part).tobytes() == np.array(whole)[2:5].tobytes()
    assert part_count.tolist() == count[2:5].tolist()


class _Stack:
    def __init__(self, n_matrices, in_features):
        self.n_matrices, self.in_features = n_matrices, in_features


def test_expert_chunks_keep_a_layers_hessians_within_the_budget():
    from mixquant.calib.rounding import expert_chunks

    stacks = [_Stack(8, 64), _Stack(8, 64), _Stack(8, 32)]  # gate, up, down
    per_expert = (2 * 64 ** 2 + 32 ** 2) * (4 * 3 + 8)  # 4 batches: three levels of float32 partials, then float64
    assert expert_chunks(stacks, 4, 3 * per_expert) == [range(0, 3), range(3, 6), range(6, 8)]
    assert expert_chunks(stacks, 4, 3 * per_expert - 1) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert expert_chunks(stacks, 4, 8 * per_expert) == [None]
    assert expert_chunks(stacks, 4, 1) == [range(e, e + 1) for e in range(8)]
    assert expert_chunks([], 4, 1) == [None] and expert_chunks([_Stack(8, 64), _Stack(4, 64)], 4, 1) == [None]


def test_gptq_of_experts_in_chunks_is_that_of_the_whole_stack(tmp_path):
    """A layer run once per chunk of its experts (here: one expert a chunk) gives every expert the
    Hessian, and so the codes, scales and biases, it gets from one run of the whole stack."""
    from conftest import save_tiny_qwen35

    from mixquant.calib.data import calibration_set
    from mixquant.calib.rounding import run_gptq
    from mixquant.convert import ConvertOptions, build_plan
    from mixquant.loading import load
    from mixquant.quant.encode import mx_dtype
    from mixquant.quant.recipe import uniform
    from mixquant.vocab import embedding_rows

    path = save_tiny_qwen35(tmp_path / "moe", moe=True, vocab_size=8192, seed=9, num_experts=8)
    _, plan = build_plan(path, ConvertOptions(recipe=uniform(3, 32), keep_vision=False, keep_mtp=False))
    loaded = load(path, dtype="float32", dequantize=True)
    windows = calibration_set("mix", None, loaded.tokenizer, 2048, 256, embedding_rows(loaded.config, path))
    dtype = mx_dtype(plan.entries[0].dtype)
    whole = run_gptq(loaded.model, windows, plan, dtype)
    loaded = load(path, dtype="float32", dequantize=True)
    chunked = run_gptq(loaded.model, windows, plan, dtype, hessian_bytes=1)
    stacks = [n for n in whole if "switch_mlp" in n]
    assert whole.keys() == chunked.keys() and len(stacks) == 3 * 4 and len(whole[stacks[0]]) == 8  # 4 layers
    for name, parts in whole.items():
        for a, b in zip(parts, chunked[name], strict=True):
            for x, y in zip(a, b, strict=True):
                assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), name
