"""--kv-bits auto: caches with K and V at widths of their own per layer (MixedKVCache and its batch
form), the measured allocation (mixquant.kvplan), `convert --kv-bits auto` storing it, and the
commands that read it."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest

import mixquant
from conftest import run_cli, run_cli_error
from mixquant.errors import MixquantError
from mixquant.runtime.kv import KVQuant, LayerKV, Width


def _prompt(model, fixture_dir, n):
    return model.tokenizer.encode((fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:20000])[:n]


def _greedy(model, prompt, cache, n=24, **kw):
    from mlx_lm.generate import generate_step

    out = [(t, np.array(lp)) for (t, lp), _ in zip(generate_step(
        mx.array(prompt), model.model, max_tokens=n, prompt_cache=cache, prefill_step_size=256, **kw), range(n))]
    return [t for t, _ in out], np.stack([lp for _, lp in out])


@pytest.fixture(scope="module")
def model(fixture_dir):
    return mixquant.load(fixture_dir)


@pytest.mark.parametrize("bits, group, start", [(8, 64, 0), (4, 32, 0), (4, 64, 300)])
def test_one_width_for_k_and_v_is_mlx_lms_quantized_cache_exactly(model, fixture_dir, bits, group, start):
    """A per-layer cache whose K and V share a width decodes as mlx-lm's own generate_step on its
    QuantizedKVCache: the same tokens, the same log-probabilities, the same packed arrays."""
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    from mixquant.runtime.kvcache import MixedKVCache

    prompt = _prompt(model, fixture_dir, 700)
    theirs_cache = make_prompt_cache(model.model)
    theirs = _greedy(model, prompt, theirs_cache, kv_bits=bits, kv_group_size=group, quantized_kv_start=start)
    w = Width(bits, group)
    ours_cache = KVQuant(None, start=start, layers=((3, LayerKV(w, w)), (7, LayerKV(w, w)))).adopt(
        make_prompt_cache(model.model))
    ours = _greedy(model, prompt, ours_cache)
    assert ours[0] == theirs[0]
    assert np.array_equal(ours[1], theirs[1])
    pairs = [(a, b) for a, b in zip(ours_cache, theirs_cache) if isinstance(b, QuantizedKVCache)]
    assert len(pairs) == 2 and all(isinstance(a, MixedKVCache) and a.bits == bits for a, _ in pairs)
    for a, b in pairs:
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            assert np.array_equal(np.array(x[..., : a.offset, :]), np.array(y[..., : b.offset, :]))


def test_k_and_v_at_different_widths_are_what_mx_quantize_makes_of_them(model, fixture_dir):
    """The prompt's K and V (computed in float, as the float cache holds them) are packed at each
    tensor's own width, and attention is handed exactly their dequantized values."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt = mx.array([_prompt(model, fixture_dir, 300)])
    ref = make_prompt_cache(model.model)
    model.model(prompt, cache=ref)
    spec = LayerKV(Width(5, 32), Width(3, 64))
    cache = KVQuant(None, layers=((3, spec), (7, spec))).adopt(make_prompt_cache(model.model))
    model.model(prompt, cache=cache)
    for i in (3, 7):
        c, r = cache[i], ref[i]
        assert not hasattr(c, "bits")  # two widths: mlx-lm's packed attention cannot read it
        c._settle(c.offset)
        for packed, floats, w in ((c.keys, r.keys, spec.k), (c.values, r.values, spec.v)):
            expected = mx.quantize(floats[..., : r.offset, :], group_size=w.group_size, bits=w.bits)
            for x, y in zip(packed, expected):
                assert np.array_equal(np.array(x[..., : c.offset, :]), np.array(y))
        k, v = c.update_and_fetch(mx.zeros((1, 2, 1, 64)), mx.zeros((1, 2, 1, 64)))
        expected_k = mx.dequantize(*(x[..., : r.offset, :] for x in c.keys), group_size=32, bits=5)
        assert k.shape[2] == r.offset + 1 and np.array_equal(np.array(k[..., : r.offset, :]), np.array(expected_k))


def test_a_batch_merges_extends_filters_and_extracts_sequences_unchanged(model, fixture_dir):
    from mlx_lm.models.cache import make_prompt_cache

    from mixquant.runtime.kvcache import BatchMixedKVCache, MixedKVCache

    kv = KVQuant(None, layers=((3, LayerKV(Width(8, 64), Width(4, 32))), (7, LayerKV(Width(4, 64), Width(6, 64)))))
    tokens = _prompt(model, fixture_dir, 400)
    singles = []
    for n in (90, 200, 130):
        cache = kv.adopt(make_prompt_cache(model.model))
        model.model(mx.array([tokens[:n]]), cache=cache)
        model.model(mx.array([tokens[n: n + 1]]), cache=cache)  # packs, then appends one packed position
        singles.append(cache[3])
    batch = MixedKVCache.merge(singles[:2])
    other = MixedKVCache.merge(singles[2:])
    assert isinstance(batch, BatchMixedKVCache) and batch.quantized
    batch.extend(other)
    assert batch.left_padding.tolist() == [110, 0, 70]
    batch.filter([0, 2])
    assert batch.left_padding.tolist() == [40, 0]
    for idx, single in ((0, singles[0]), (1, singles[2])):
        out = batch.extract(idx)
        assert out.offset == single.offset and out.spec == single.spec and out.quantized
        for x, y in zip(out.keys + out.values, single.keys + single.values):
            assert np.array_equal(np.array(x), np.array(y[..., : single.offset, :]))


def test_the_allocation_is_the_cheapest_within_the_budget():
    from mixquant.kvplan import TOKENS_PER_UNIT, allocate_kv

    costs = {"k": {"3g64": 0.5, "4g64": 0.1, "5g64": 0.02, "8g64": 0.001},
             "v": {"3g64": 0.01, "4g64": 0.004, "5g64": 0.002, "8g64": 0.0}}
    quiet = {t: {w: c / 100 for w, c in per.items()} for t, per in costs.items()}
    measured = {"layers": {3: costs, 7: quiet}, "shapes": {3: [2, 64], 7: [2, 64]}, "dtype_bytes": 2,
                "context": 2048, "scored": 128, "windows": 2, "every_width": True}
    entry = allocate_kv(measured)
    # uniform 4g64 is 4.5 bits per element; K of the loud layer buys most from more bits
    assert entry["layers"] == {"3": ["5g64", "4g64"], "7": ["4g64", "3g64"]}
    assert entry["bytes_per_token"] == entry["budget_bytes_per_token"] == 4 * 128 * 4.5 / 8
    assert entry["predicted_kld"] == pytest.approx(0.02 + 0.004 + 0.001 + 0.0001)
    assert TOKENS_PER_UNIT * entry["bytes_per_token"] % 1 == 0


def test_measured_costs_fall_with_bits_and_equal_the_evaluation_of_each_tensor_alone(model):
    from mixquant import kvplan
    from mixquant.runtime.kv import FLOAT

    tokens = kvplan.calibration_tokens("mix", model.tokenizer)
    measured = kvplan.measure(model.model, tokens, 2, context=384, scored=64, count=1,
                              widths=(Width(3, 64), Width(4, 64), Width(8, 64)), every_width=True)
    assert sorted(measured["layers"]) == [3, 7] and measured["shapes"] == {3: [2, 64], 7: [2, 64]}
    for per in measured["layers"].values():
        for t in "kv":
            assert per[t]["3g64"] > per[t]["4g64"] > per[t]["8g64"] > 0
    settings = {"7k": {7: LayerKV(Width(4, 64), FLOAT)}, "3v": {3: LayerKV(FLOAT, Width(3, 64))}}
    alone = kvplan.evaluate(model.model, tokens, settings, 384, 64, 1)
    assert alone["7k"]["kld"]["mean"] == pytest.approx(measured["layers"][7]["k"]["4g64"], rel=1e-9)
    assert alone["3v"]["kld"]["mean"] == pytest.approx(measured["layers"][3]["v"]["3g64"], rel=1e-9)


def test_costs_scaled_from_two_widths_allocate_as_every_width_measured(model):
    """The default measures 3g64 and 5g64 per tensor and scales the rest by their squared errors:
    the widths between come out within a factor 1.5 of their measured costs on the layer that
    matters most, and the allocation is the one measuring every width gives."""
    from mixquant import kvplan

    tokens = kvplan.calibration_tokens("mix", model.tokenizer)
    every = kvplan.measure(model.model, tokens, 2, every_width=True)
    scaled = kvplan.measure(model.model, tokens, 2)
    for t in "kv":
        for w in ("3g32", "4g64", "4g32"):
            ratio = scaled["layers"][7][t][w] / every["layers"][7][t][w]
            assert 1 / 1.5 < ratio < 1.5, (t, w, ratio)
        for w in ("3g64", "5g64"):  # measured both ways
            assert scaled["layers"][7][t][w] == pytest.approx(every["layers"][7][t][w], rel=1e-9)
    assert kvplan.allocate_kv(scaled)["layers"] == kvplan.allocate_kv(every)["layers"]


@pytest.fixture(scope="module")
def converted(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kvauto") / "q4"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--q-recipe", "unsloth", "--q-bits", "4",
                   "--kv-bits", "auto", "--drop-vision") == 0
    return out


def test_convert_stores_the_allocation_and_the_model_card_shows_it(converted):
    entry = json.loads((converted / "config.json").read_text())["mixquant"]["kv"]
    assert sorted(entry["layers"]) == ["3", "7"]
    assert entry["bytes_per_token"] <= entry["budget_bytes_per_token"] == 2 * 2 * 2 * 64 * 4.5 / 8
    assert entry["calibration"] == "mix"
    assert entry["measured"] == {"context": 2048, "scored": 128, "windows": 2, "every_width": False}
    widths = {w for pair in entry["layers"].values() for w in pair}
    assert widths != {"4g64"}  # the allocation spends the bytes unevenly
    card = (converted / "README.md").read_text()
    assert "| KV cache with `--kv-bits auto` | layer 3: K " in card


def test_kv_bits_auto_loads_the_stored_widths(converted):
    from mixquant.runtime.chat import ChatSession
    from mixquant.runtime.kvcache import MixedKVCache

    entry = json.loads((converted / "config.json").read_text())["mixquant"]["kv"]
    model = mixquant.load(converted, kv_bits="auto")
    session = ChatSession(model)
    list(model.stream(model.encode("def main():"), session, max_new_tokens=4))
    mixed = {i: c.spec for i, c in enumerate(session.cache) if isinstance(c, MixedKVCache)}
    assert {str(i): [s.k.label, s.v.label] for i, s in mixed.items()} == entry["layers"]


def test_generate_with_kv_bits_auto_matches_mlx_lm_on_the_same_caches(converted, capsys):
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from mixquant.loading import load_for_running
    from mixquant.runtime.kv import kv_settings

    assert run_cli("generate", converted, "--prompt", "def fibonacci(n):", "--max-tokens", "24",
                   "--kv-bits", "auto") == 0
    ours = capsys.readouterr().out
    loaded = load_for_running(converted)
    cache = kv_settings("auto", None, None, converted).adopt(make_prompt_cache(loaded.model))
    theirs = "".join(r.text for r in stream_generate(loaded.model, loaded.tokenizer, "def fibonacci(n):",
                                                     max_tokens=24, sampler=make_sampler(0.0), prompt_cache=cache))
    assert ours == theirs + "\n"


def test_a_malformed_stored_allocation_is_a_one_line_error(converted, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    config = json.loads((bad / "config.json").read_text())
    config["mixquant"]["kv"]["layers"]["3"] = ["7g64", "4g64"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(MixquantError, match="^" + re.escape(f"{bad}: config.json's mixquant.kv: layer 3 has width "
                                                            "7g64, which MLX does not quantize") + "$"):
        mixquant.load(bad, kv_bits="auto")
    config["mixquant"]["kv"]["layers"] = ["4g64"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(MixquantError, match="mixquant.kv.layers is not a map of layer"):
        mixquant.load(bad, kv_bits="auto")


def test_convert_takes_only_auto(fixture_dir, tmp_path, capsys):
    assert "invalid choice: '4'" in run_cli_error(["convert", "-i", str(fixture_dir), "-o", str(tmp_path / "o"),
                                                   "--kv-bits", "4"], capsys)


@pytest.mark.parametrize("kv", [None, KVQuant(8), KVQuant(4, 32)])
def test_bench_measures_the_cache_it_decodes_on(fixture_dir, kv):
    """The cache per token bench reports is the one the model keeps: mlx-lm's caches' bytes equal
    mixquant.kvbytes's count for the model as loaded (float32 on this backend)."""
    from mixquant.arch import family_for_config
    from mixquant.kvbytes import fixed_bytes, kv_bytes_per_token
    from mixquant.runtime.bench import cache_of
    from mixquant.runtime.chat import load_model

    from mlx.utils import tree_flatten

    model = load_model(fixture_dir, kv=kv)
    config = json.loads((fixture_dir / "config.json").read_text())
    attention = family_for_config(config, "config.json").attention(config, "config.json")
    c = cache_of(model)
    dtype_bytes = tree_flatten(model.model.parameters())[0][1].dtype.size
    assert c["bytes_per_token"] == kv_bytes_per_token(attention, dtype_bytes, kv and kv.bits, kv.group_size if kv else 64)
    assert c["fixed_bytes"] == fixed_bytes(attention, dtype_bytes)
