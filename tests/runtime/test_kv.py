"""--kv-bits: the chat path's cache quantized as mlx-lm's QuantizedKVCache stores it, with the same
numbers as mlx-lm's own generation on that cache."""

import re

import mlx.core as mx
import numpy as np
import pytest

import mixquant
from mixquant.errors import MixquantError

MESSAGES = [{"role": "user", "content": "Write a Python function that reads a config file."}]


@pytest.fixture(scope="module")
def kv8(fixture_dir):
    return mixquant.load(fixture_dir, kv_bits=8)


def _mlx_lm_reference(model, prompt, boundary, kv, n):
    """mlx-lm alone: the conversation prefilled in 512-token chunks, its cache quantized after each
    as generate_step does, then generate_step with the same settings."""
    from mlx_lm.generate import generate_step, maybe_quantize_kv_cache
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model.model)
    for i in range(0, boundary, 512):
        model.model(mx.array([prompt[i: min(i + 512, boundary)]]), cache=cache)
        maybe_quantize_kv_cache(cache, kv.start, kv.group_size, kv.bits)
    tokens = [t for t, _ in zip((t for t, _ in generate_step(
        mx.array(prompt[boundary:]), model.model, max_tokens=n, prompt_cache=cache, prefill_step_size=512,
        kv_bits=kv.bits, kv_group_size=kv.group_size, quantized_kv_start=kv.start)), range(n))]
    return tokens, cache


@pytest.mark.parametrize("bits, long", [(8, False), (4, False), (4, True)])
def test_chat_decodes_as_mlx_lm_does_on_the_same_quantized_cache(fixture_dir, bits, long):
    """A long conversation is prefilled in several chunks, the later ones attending to quantized KV."""
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    from mixquant.runtime.chat import ChatSession

    model = mixquant.load(fixture_dir, kv_bits=bits)
    messages = [{"role": "user", "content": (fixture_dir / "heldout.txt").read_text()[:5000]}] if long else MESSAGES
    text, prompt, boundary = model.rendered(messages, enable_thinking=False)
    assert boundary > 1024 if long else boundary < 512
    session = ChatSession(model)
    ours = list(model.stream(prompt, session, max_new_tokens=40, boundary=boundary))
    theirs, cache = _mlx_lm_reference(model, prompt, boundary, model.kv, 40)
    assert ours == theirs
    quantized = [(a, b) for a, b in zip(session.cache, cache) if isinstance(b, QuantizedKVCache)]
    assert len(quantized) == 2 and not any(isinstance(c, KVCache) for c in session.cache)
    for a, b in quantized:
        assert a.bits == b.bits == bits and a.offset == b.offset
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            assert np.array_equal(np.array(x[..., : a.offset, :]), np.array(y[..., : b.offset, :]))


def test_without_kv_bits_the_cache_stays_float(fixture_dir):
    from mlx_lm.models.cache import KVCache

    from mixquant.runtime.chat import ChatSession

    model = mixquant.load(fixture_dir)
    session = ChatSession(model)
    list(model.stream(model.rendered(MESSAGES, enable_thinking=False)[1], session, max_new_tokens=4))
    assert model.kv is None and sum(type(c) is KVCache for c in session.cache) == 2


def test_a_quantized_snapshot_restores_exactly(kv8):
    """A second turn from the kept conversation (a snapshot of the quantized cache) continues as the
    live cache does."""
    from mixquant.runtime.chat import ChatSession, restore_cache, snapshot_cache

    session = ChatSession(kv8)
    prompt = kv8.rendered(MESSAGES, enable_thinking=False)[1]
    list(kv8.stream(prompt, session, max_new_tokens=12))
    restored = ChatSession(kv8)
    restored.cache, restored.tokens = restore_cache(kv8.model, snapshot_cache(session.cache)), list(session.tokens)
    more = prompt[:3]
    a = list(kv8.stream(session.tokens + more, session, max_new_tokens=12))
    b = list(kv8.stream(restored.tokens + more, restored, max_new_tokens=12))
    assert a == b


def test_two_turns_reuse_the_quantized_cache(kv8):
    from mixquant.runtime.chat import ChatSession

    session = ChatSession(kv8)
    first = session.chat(MESSAGES, max_new_tokens=16, temperature=0.0, enable_thinking=False)
    messages = MESSAGES + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter."}]
    session.chat(messages, max_new_tokens=8, temperature=0.0, enable_thinking=False)
    full = len(kv8.rendered(messages, enable_thinking=False)[1])
    assert session.last_prefill < full  # the kept conversation, not a fresh prefill


@pytest.mark.parametrize("args, message", [
    ((3, None, None), "--kv-bits: 3 is not one of 4, 8 or auto"),
    (("six", None, None), "--kv-bits: 'six' is not one of 4, 8 or auto"),
    (("auto", 32, None), "--kv-group-size: not with --kv-bits auto (the allocation sets each layer's)"),
    ((8, 48, None), "--kv-group-size: 48 is not one of 32, 64, 128"),
    ((8, None, -1), "--kv-start: must be at least 0, got -1"),
    ((None, 64, None), "--kv-group-size and --kv-start: only with --kv-bits"),
])
def test_settings_mlx_lm_does_not_take_are_one_line_errors(args, message):
    from mixquant.runtime.kv import kv_quant

    with pytest.raises(MixquantError, match="^" + re.escape(message) + "$"):
        kv_quant(*args)


@pytest.mark.parametrize("argv, message", [
    (["generate", "{m}", "--prompt", "x", "--kv-bits", "3"], "--kv-bits: 3 is not one of 4, 8 or auto"),
    (["bench", "{m}", "--mtp", "--kv-bits", "8"], "--kv-bits with --mtp: bench --mtp compares plain and MTP"),
    (["chat", "{m}", "--kv-bits", "auto"], "{m}: --kv-bits auto needs a measured KV allocation, and config.json "
     "has none; convert with --kv-bits auto to measure one"),
    (["serve", "{m}", "--kv-bits", "auto"], "{m}: --kv-bits auto needs a measured KV allocation"),
    (["bench", "{m}", "--kv-start", "5"], "--kv-group-size and --kv-start: only with --kv-bits"),
])
def test_the_cli_refuses_bad_kv_settings_before_loading(fixture_dir, capsys, argv, message):
    from conftest import run_cli_error

    assert message.format(m=fixture_dir) in run_cli_error([a.format(m=fixture_dir) for a in argv], capsys)


def test_generate_with_kv_bits_matches_mlx_lms_stream_generate(fixture_dir, capsys):
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from conftest import run_cli
    from mixquant.loading import load_for_running

    assert run_cli("generate", fixture_dir, "--prompt", "def fibonacci(n):", "--max-tokens", "24",
                   "--kv-bits", "4", "--kv-group-size", "32") == 0
    ours = capsys.readouterr().out
    loaded = load_for_running(fixture_dir)
    theirs = "".join(r.text for r in stream_generate(loaded.model, loaded.tokenizer, "def fibonacci(n):", max_tokens=24,
                                                     sampler=make_sampler(0.0), kv_bits=4, kv_group_size=32,
                                                     quantized_kv_start=0))
    assert ours == theirs + "\n"
