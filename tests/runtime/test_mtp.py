"""MTP speculative decoding on the fixture's trained head: exactly plain decoding when greedy, the
same distribution when sampling; the head converted, quantized and loaded."""

import json

import numpy as np
import pytest

from conftest import run_cli

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 20, 24, 64
GREEDY_PROMPTS = 10  # each decoded plainly, at depths 1-3 and adaptively, in two models


def _load(path, **kw):
    from mixquant.loading import load
    from mixquant.runtime.chat import Model

    return Model(load(path, mtp=True, **kw))


@pytest.fixture(scope="module")
def unsloth3(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp") / "ud3"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--q-recipe", "unsloth", "--q-bits", "3",
                   "--drop-vision") == 0
    return out


@pytest.fixture(scope="module")
def prompts(fixture_dir):
    from mixquant.loading import load_tokenizer

    text = (fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:200_000]
    ids = load_tokenizer(fixture_dir).encode(text)
    step = len(ids) // PROMPTS
    return [list(ids[i * step : i * step + PROMPT_TOKENS]) for i in range(PROMPTS)]


def _decode(model, prompt, **kw):
    from mixquant.runtime.chat import ChatSession

    return list(model.stream(prompt, ChatSession(model), max_new_tokens=NEW_TOKENS, **kw))


@pytest.mark.parametrize("which", ["float32", "unsloth-3"])
def test_greedy_mtp_is_plain_greedy_token_for_token(which, fixture_dir, unsloth3, prompts):
    from mixquant.runtime.mtp import Stats

    model = _load(fixture_dir, dtype="float32", dequantize=True) if which == "float32" else \
        _load(unsloth3, dequantize=True)
    stats = {d: Stats() for d in (1, 2, 3)}
    for prompt in prompts[:: PROMPTS // GREEDY_PROMPTS]:
        plain = _decode(model, prompt)
        assert len(plain) == NEW_TOKENS
        for depth in (1, 2, 3):
            assert _decode(model, prompt, mtp=depth, stats=stats[depth], mtp_fixed=True) == plain, \
                (which, depth, prompt)
        assert _decode(model, prompt, mtp=3) == plain, (which, "adaptive", prompt)
    for depth, s in stats.items():  # the trained head drafts well: most first drafts are kept
        assert s.emitted == GREEDY_PROMPTS * (NEW_TOKENS - 1)
        assert s.acceptance()[0] > 0.5, (depth, s.acceptance())


@pytest.mark.parametrize("bits, start", [(8, 0), (4, 40)])
def test_greedy_mtp_on_a_quantized_cache_is_plain_greedy_on_it(fixture_dir, prompts, bits, start):
    """With --kv-bits, MTP's verification passes write quantized KV and its rollback trims it; the
    cache is quantized after the prompt and after each round, as generate_step quantizes after each
    call (`start` is passed mid-generation)."""
    from mlx_lm.models.cache import QuantizedKVCache

    from mixquant.runtime.chat import ChatSession, Model
    from mixquant.runtime.kv import KVQuant

    base = _load(fixture_dir, dtype="float32", dequantize=True)
    model = Model(base.loaded, KVQuant(bits, 64, start))
    for prompt in prompts[:6]:
        plain = _decode(model, prompt)
        for depth in (1, 3):
            session = ChatSession(model)
            assert list(model.stream(prompt, session, max_new_tokens=NEW_TOKENS, mtp=depth, mtp_fixed=True)) \
                == plain, (depth, prompt)
        assert sum(isinstance(c, QuantizedKVCache) and c.bits == bits for c in session.cache) == 2


def test_adaptive_depth_keeps_to_the_fastest_and_tries_the_others_again():
    from mixquant.runtime.mtp import Adaptive

    chooser = Adaptive({0, 1, 3})
    rates = {0: 100.0, 1: 80.0, 3: 60.0}  # tokens per second: plain decoding is fastest here
    tokens_per_round = {0: 1, 1: 1.8, 3: 2.5}
    chosen = []
    for _ in range(2000):
        d = chooser.next_depth()
        chosen.append(d)
        chooser.record(d, tokens_per_round[d], tokens_per_round[d] / rates[d])
    assert chosen[:9] == [0, 0, 0, 1, 1, 1, 3, 3, 3]  # each depth's first round only warms up
    tokens = sum(tokens_per_round[d] for d in chosen)
    seconds = sum(tokens_per_round[d] / rates[d] for d in chosen)
    assert tokens / seconds > 0.97 * rates[0]  # trials cost under 3%
    assert chosen[-100:].count(0) >= 96
    rates[3] = 300.0  # now drafting three pays: a later trial finds it
    for _ in range(2500):
        d = chooser.next_depth()
        chooser.record(d, tokens_per_round[d], tokens_per_round[d] / rates[d])
    assert chooser.best == 3 and chooser.next_depth() == 3


def test_a_slow_first_use_does_not_decide_the_depth():
    """MLX's first pass of a new shape is slow; the chooser does not hold that against the depth."""
    from mixquant.runtime.mtp import Adaptive

    chooser = Adaptive({0, 1, 2})
    rates = {0: 100.0, 1: 130.0, 2: 150.0}
    tokens_per_round = {0: 1, 1: 1.9, 2: 2.5}
    first = set()
    for _ in range(9):
        d = chooser.next_depth()
        slow = 50.0 if d not in first else 1.0
        first.add(d)
        chooser.record(d, tokens_per_round[d], slow * tokens_per_round[d] / rates[d])
    assert chooser.best == 2 and chooser.next_depth() == 2


def test_rolling_back_by_recomputing_gives_the_same_tokens(fixture_dir, prompts):
    from mixquant.runtime.chat import ChatSession
    from mixquant.runtime.mtp import RECOMPUTE, speculative_steps
    from mixquant.runtime.sampling import GREEDY

    model = _load(fixture_dir, dtype="float32", dequantize=True)
    for prompt in prompts[:3]:
        session = ChatSession(model)
        fresh = session.prepare(prompt)
        steps = speculative_steps(model.mtp, session, fresh, max_new_tokens=NEW_TOKENS, sampling=GREEDY, depth=3,
                                  rollback=RECOMPUTE)
        assert list(steps) == _decode(model, prompt)


def test_a_session_keeps_the_cache_exact_across_turns(fixture_dir):
    from mixquant.runtime.chat import ChatSession

    model = _load(fixture_dir, dtype="float32", dequantize=True)
    turns = ["Write a Python function that adds two numbers.", "Now make it multiply them."]
    texts = {}
    for mtp in (False, 2):
        session, messages, out = ChatSession(model), [], []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            result = session.chat(messages, max_new_tokens=40, temperature=0.0, mtp=mtp)
            messages.append({"role": "assistant", "content": result.text})
            out.append((result.text, result.num_tokens))
        texts[mtp] = out
    assert texts[False] == texts[2]


def _chi2_sf(x: float, dof: int) -> float:
    import torch

    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def _homogeneity(a: list[int], b: list[int], bins: int = 8) -> float:
    """p-value of a chi-square test that two samples of tokens come from one distribution (the most
    frequent tokens each a bin, the rest one more)."""
    values, counts = np.unique(a + b, return_counts=True)
    top = list(values[np.argsort(-counts)][:bins])
    table = np.array([[sum(t == v for t in s) for v in top] + [sum(t not in top for t in s)] for s in (a, b)], float)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return _chi2_sf(stat, table.shape[1] - 1)


def test_acceptance_rule_samples_the_main_models_distribution(fixture_dir, prompts):
    """One round's first token, drafts drawn from the head's distribution q and judged against the main
    model's p at temperature 1 (both from the fixture at one context), is distributed as p."""
    import mlx.core as mx

    from mixquant.runtime.mtp import accept_sampled
    from mixquant.runtime.sampling import Sampling

    model = _load(fixture_dir, dtype="float32", dequantize=True)
    parts, sampling = model.mtp, Sampling(temperature=1.0)

    def distributions(prompt):
        ids = mx.array([prompt])
        hidden = parts.body(ids)
        target = sampling.probs(parts.logits(hidden[:, -1:])[0])  # the token after the prompt
        head = parts.head(parts.embed(ids[:, 1:]), hidden[:, :-1], "causal", None)
        return target, sampling.probs(parts.logits(head[:, -1:])[0])  # the head's guess for the same token

    # the context where the head is furthest from the main model: the rule has the most to correct
    target, q = max((distributions(p) for p in prompts), key=lambda pq: float(mx.abs(pq[0] - pq[1]).sum()))
    p = mx.concatenate([target, target])  # its row, and the bonus row (unused: only the first token counts)
    mx.random.seed(7)
    draws = 6000
    drafts = mx.random.categorical(mx.log(q[0]), num_samples=draws).tolist()
    first = [accept_sampled(p, q, [d])[0] for d in drafts]
    expected = np.array(p[0])
    top = list(np.argsort(-expected)[:10])
    observed = np.array([sum(t == v for t in first) for v in top] + [sum(t not in top for t in first)], float)
    exp = draws * np.append(expected[top], 1 - expected[top].sum())
    stat = float(((observed - exp) ** 2 / exp).sum())
    assert _chi2_sf(stat, len(top)) > 1e-3, (observed, exp)
    assert np.abs(np.array(q[0]) - expected).sum() > 0.3  # q is far from p: the rule had work to do


def test_sampled_mtp_matches_plain_sampling(fixture_dir, prompts):
    """At temperature 1, the tokens after the first (the speculated ones) have the distribution plain
    sampling gives them."""
    import mlx.core as mx

    from mixquant.runtime.chat import ChatSession
    from mixquant.runtime.sampling import Sampling

    model = _load(fixture_dir, dtype="float32", dequantize=True)
    sampling = Sampling(temperature=1.0)
    prompt = prompts[3][:12]
    draws = 300
    samples = {}
    for mtp in (0, 2):
        mx.random.seed(11 + mtp)
        session = ChatSession(model)  # the prompt but its last token prefilled once, restored for every draw
        samples[mtp] = [list(model.stream(prompt, session, max_new_tokens=3, sampling=sampling, mtp=mtp,
                                          boundary=len(prompt) - 1)) for _ in range(draws)]
        assert session.last_prefill == 1
    for position in (1, 2):
        p = _homogeneity([s[position] for s in samples[0]], [s[position] for s in samples[2]])
        assert p > 1e-3, (position, p)


def test_the_head_loads_quantized_from_the_sidecar(unsloth3):
    import mlx.nn as nn

    model = _load(unsloth3, dequantize=False)
    q = json.loads((unsloth3 / "config.json").read_text())["quantization"]
    fc = model.mtp.head.fc
    assert isinstance(fc, nn.QuantizedLinear) and fc.bits == q["mtp.fc"]["bits"] == 5
    assert isinstance(model.mtp.head.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.mtp.head.norm, nn.RMSNorm)


def test_no_head_is_a_clear_error(fixture_dir, tmp_path):
    import mixquant
    from mixquant.errors import MixquantError
    from mixquant.runtime.chat import ChatSession

    out = tmp_path / "nomtp"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--drop-mtp", "--drop-vision") == 0
    with pytest.raises(MixquantError, match=r"nomtp: no MTP head in this model"):
        mixquant.load(out, mtp=True)
    model = mixquant.load(out)
    with pytest.raises(MixquantError, match=r"loaded without its MTP head"):
        next(model.stream([1, 2, 3], ChatSession(model), max_new_tokens=4, mtp=2))
    with pytest.raises(MixquantError, match=r"mtp depth: must be 1\.\.4, got 5"):
        model.chat([{"role": "user", "content": "hi"}], mtp=5)


def test_bench_mtp_reports_acceptance_and_speedup(fixture_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert run_cli("bench", str(fixture_dir), "--mtp", "--mtp-depths", "1,2", "--prompt-tokens", "16",
                   "--gen-tokens", "12", "--turns", "1", "--repeats", "2", "--json", str(out)) == 0
    table = capsys.readouterr().out
    assert "mtp depth 2" in table and "best depth" in table
    result = json.loads(out.read_text())
    assert [r["depth"] for r in result["mtp"]] == [1, 2] and result["best_depth"] in (1, 2)
    for r in result["mtp"]:
        assert len(r["acceptance"]) == r["depth"] and all(0 <= a <= 1 for a in r["acceptance"])
        assert len(r["speedups"]) == 2 and r["speedup"] > 0 and 1 <= r["tokens_per_round"] <= r["depth"] + 1
