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
    from mlx_lm.models.cache import ArraysCache, make_prompt_cache

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
    import mlx.core as mx

    tail = session.prepare(prompt2)
    assert session.last_prefill == len(prompt2) - len(history1) < len(prompt2)
    logits = np.array(m.model(mx.array([tail]), cache=session.cache)[0, -1])
    full = np.array(m.model(mx.array([prompt2]), cache=make_prompt_cache(m.model))[0, -1])
    assert np.abs(logits - full).max() <= 1e-4
    assert any(isinstance(c, ArraysCache) for c in session.cache)  # Gated DeltaNet state was reused


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


# --- chat and chat_stream agree, whatever the output holds ------------------------------------------

SCRIPTS = {
    "thinking then answer": "Let me think about it.</think>\n\nThe answer is 42. Done.",
    "tool call": 'Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n'
                 '</tool_call>',
    "two calls and text": '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\nand\n<tool_call>\n'
                          '{"name": "b", "arguments": {"x": 1}}\n</tool_call>',
    "broken call": "<tool_call>\n<function=f>\n<parameter=x>\n1\n",
    "stop mid answer": "first line\nSTOP here and more text after",
    "stop inside thinking": "I think STOP never mind</think>\n\nanswer",
    "stop inside a call": "<tool_call>\n<function=f>\n<parameter=x>STOP\n</parameter>\n</function>\n</tool_call>",
    "stop split over tokens": "abc ST" + "OP def",
    "no stop at all": "plain text without the word",
}
TOOLS = [mixquant.create_tool_definition("get_weather", "Weather", {"city": {"type": "string"}}, ["city"])]


def _scripted(model, text):
    """The model's decoder replaced by one that emits `text`'s tokens: chat_stream's own text
    pipeline (detokenizer, stop strings, thinking and tool-call splitting) runs on them."""
    ids = model.encode(text)

    def stream(prompt, session, *, max_new_tokens, **_):
        session.prepare(prompt)
        yield from ids[:max_new_tokens]

    model.stream = stream
    return ids


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest.mark.parametrize("thinking", [True, False])
def test_chat_equals_joined_stream(fixture_f32, name, thinking):
    import copy

    model = copy.copy(fixture_f32)
    _scripted(model, SCRIPTS[name])
    kwargs = dict(max_new_tokens=200, enable_thinking=thinking, tools=TOOLS, stop=["STOP"])
    result = model.chat([{"role": "user", "content": "go"}], **kwargs)
    events = list(model.chat_stream([{"role": "user", "content": "go"}], **kwargs))
    streamed = events[-1].result
    assert "".join(e.text for e in events if e.type == "text") == result.text == streamed.text
    assert "".join(e.text for e in events if e.type == "thinking").strip("\n") == result.thinking
    assert [(e.tool_call.name, e.tool_call.arguments) for e in events if e.type == "tool_call"] == \
        [(c.name, c.arguments) for c in result.tool_calls]
    assert result.finish_reason == streamed.finish_reason
    assert "STOP" not in result.text + result.thinking
    if "STOP" in SCRIPTS[name]:
        assert result.finish_reason == "stop" and "after" not in result.text and "def" not in result.text


def test_stop_string_ends_text_where_it_begins(fixture_f32):
    import copy

    model = copy.copy(fixture_f32)
    _scripted(model, SCRIPTS["stop split over tokens"])
    r = model.chat([{"role": "user", "content": "go"}], max_new_tokens=50, enable_thinking=False, stop=["STOP"])
    assert r.text == "abc " and r.finish_reason == "stop"
    _scripted(model, SCRIPTS["tool call"])
    r = model.chat([{"role": "user", "content": "go"}], max_new_tokens=50, enable_thinking=False, tools=TOOLS)
    assert r.text == "Checking." and [c.arguments for c in r.tool_calls] == [{"city": "Oslo"}]
    assert r.finish_reason == "tool_calls"


def test_real_decoding_with_stop_strings_agrees(fixture_f32):
    msgs = [{"role": "user", "content": "class Config(object):"}]
    kwargs = dict(max_new_tokens=40, temperature=0.0, enable_thinking=False, stop=["self", "\n\n\n"])
    result = fixture_f32.chat(msgs, **kwargs)
    events = list(fixture_f32.chat_stream(msgs, **kwargs))
    assert "".join(e.text for e in events if e.type == "text") == result.text
    assert "self" not in result.text


def test_cache_holds_exactly_the_session_tokens(fixture_f32):
    from mlx_lm.models.cache import KVCache

    session = mixquant.ChatSession(fixture_f32)
    r = session.chat([{"role": "user", "content": "import os"}], max_new_tokens=7, temperature=0.0,
                     enable_thinking=False)
    kv = [c for c in session.cache if isinstance(c, KVCache)]
    assert kv and all(c.offset == len(session.tokens) for c in kv)
    prompt = fixture_f32.encode(fixture_f32.prompt([{"role": "user", "content": "import os"}], enable_thinking=False))
    assert len(session.tokens) == len(prompt) + r.num_tokens


def test_each_token_of_an_answer_streams_its_text_at_once(fixture_f32):
    """Spaces and newlines are not held back without tools or stop strings: after each token the
    streamed text is the decoded text of the tokens so far (mlx-lm's detokenizer alone holds a lone
    space until the next token)."""
    from mixquant.runtime.chat import Decoder

    model = fixture_f32
    text = "Hello  world.\n\nNext line   then\n a b  c \n\n\nend ."
    ids = model.encode(text)
    assert any(model.tokenizer.decode([t]) == " " for t in ids)
    decoder = Decoder(model, "prompt")
    streamed = ""
    for i, token in enumerate(ids):
        streamed += "".join(e.text for e in decoder.feed(token) if e.type == "text")
        assert streamed == model.tokenizer.decode(ids[: i + 1]), (i, streamed)
    streamed += "".join(e.text for e in decoder.close() if e.type == "text")
    assert streamed == text


def test_whitespace_before_a_tool_call_is_still_dropped(fixture_f32):
    from mixquant.runtime.chat import Decoder

    model = fixture_f32
    ids = model.encode("Checking.\n\n" + SCRIPTS["tool call"].split("\n", 1)[1])
    decoder = Decoder(model, "prompt", tools=TOOLS)
    events = [e for t in ids for e in decoder.feed(t)] + list(decoder.close())
    assert "".join(e.text for e in events if e.type == "text") == "Checking."
    assert [e.tool_call.arguments for e in events if e.type == "tool_call"] == [{"city": "Oslo"}]
