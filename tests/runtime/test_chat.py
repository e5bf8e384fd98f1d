"""Chat on the fixture: multi-turn cache reuse (KV and Gated DeltaNet state), streaming, tools."""

import numpy as np
import pytest

import mixquant
from conftest import run_cli


@pytest.fixture(scope="module")
def fixture_f32(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "f32"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--dtype", "float32", "--drop-vision", "--drop-mtp") == 0
    return mixquant.load(out)


def test_turn_two_prefills_only_new_tokens_and_matches_full_prefill(fixture_f32):
    from mlx_lm.models.cache import make_prompt_cache

    m = fixture_f32
    session = mixquant.ChatSession(m)
    turn1 = [{"role": "user", "content": "def add(a, b):"}]
    r1 = session.chat(turn1, max_new_tokens=6, temperature=0.0, enable_thinking=False)
    prompt1 = m.encode(m.prompt(turn1, enable_thinking=False))
    assert session.last_prefill == len(prompt1)
    assert r1.num_tokens >= 1

    turn2 = turn1 + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "import os"}]
    prompt2 = m.encode(m.prompt(turn2, enable_thinking=False))
    history1 = m.encode(m.render_history(turn1, enable_thinking=False))
    assert prompt2[: len(history1)] == history1  # turn 2 extends the conversation as it stood
    logits = np.array(session.prefill(prompt2))
    assert session.last_prefill == len(prompt2) - len(history1) < len(prompt2)

    fresh = make_prompt_cache(m.model)
    full = np.array(m.forward(prompt2, fresh))
    assert np.abs(logits - full).max() <= 1e-4
    assert any(type(c).__name__ == "ArraysCache" for c in session.cache)  # Gated DeltaNet state was reused


def test_edited_history_falls_back_to_full_prefill(fixture_f32):
    m = fixture_f32
    session = mixquant.ChatSession(m)
    session.chat([{"role": "user", "content": "first"}], max_new_tokens=2, temperature=0.0, enable_thinking=False)
    edited = [{"role": "user", "content": "something else entirely"}]
    session.chat(edited, max_new_tokens=2, temperature=0.0, enable_thinking=False)
    assert session.last_prefill == len(m.encode(m.prompt(edited, enable_thinking=False)))


def test_stream_equals_chat_at_temperature_zero(fixture_f32):
    msgs = [{"role": "user", "content": "class Config(object):"}]
    result = fixture_f32.chat(msgs, max_new_tokens=24, temperature=0.0, enable_thinking=False)
    events = list(fixture_f32.chat_stream(msgs, max_new_tokens=24, temperature=0.0, enable_thinking=False))
    assert events[-1].type == "done"
    assert "".join(e.text for e in events if e.type == "text") == result.text
    assert result.finish_reason in ("stop", "length") and result.timings["decode_tok_s"] > 0


def test_thinking_is_separated(fixture_f32):
    r = fixture_f32.chat([{"role": "user", "content": "Why?"}], max_new_tokens=12, temperature=0.0,
                         enable_thinking=True)
    events = list(fixture_f32.chat_stream([{"role": "user", "content": "Why?"}], max_new_tokens=12,
                                          temperature=0.0, enable_thinking=True))
    thinking = "".join(e.text for e in events if e.type == "thinking")
    assert thinking.strip("\n") == r.thinking
    assert "</think>" not in r.text and "</think>" not in r.thinking


def test_stopping_the_stream_leaves_the_model_usable(fixture_f32):
    stream = fixture_f32.chat_stream([{"role": "user", "content": "hello"}], max_new_tokens=50, temperature=0.0)
    next(stream)
    stream.close()
    r = fixture_f32.chat([{"role": "user", "content": "hello"}], max_new_tokens=4, temperature=0.0)
    assert r.num_tokens >= 1


def test_tool_definition_shape():
    tool = mixquant.create_tool_definition("get_weather", "Weather", {"city": {"type": "string"}}, ["city"])
    assert tool == {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
