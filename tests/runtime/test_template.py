"""Our chat-template rendering equals transformers' apply_chat_template on the fixture's template."""

import pytest

from mixquant.errors import MixquantError
from mixquant.io.hf import read_chat_template
from mixquant.runtime.template import render

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lisbon"}}}]}

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "How are you?"}],
    "tool_call_and_result": [{"role": "user", "content": "Weather in Lisbon?"}, CALL,
                             {"role": "tool", "content": '{"temperature": 19}'}],
    "tool_result_answered": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Lisbon?"}, CALL,
                             {"role": "tool", "content": "19 C"},
                             {"role": "assistant", "content": "It is 19 °C."}, {"role": "user", "content": "Thanks"}],
    "reasoning_in_history": [{"role": "user", "content": "2+2?"},
                             {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
                             {"role": "user", "content": "3+3?"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(fixture_dir):
    import transformers as tf

    return tf.AutoTokenizer.from_pretrained(fixture_dir)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_renders_like_transformers(fixture_dir, hf_tokenizer, name, thinking, with_tools):
    template, specials = read_chat_template(fixture_dir)
    messages = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    extra = {} if thinking is None else {"enable_thinking": thinking}
    want = hf_tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **extra)
    got = render(template, messages, tools=tools, add_generation_prompt=True, specials=specials, **extra)
    assert got == want


def test_template_is_used_unmodified(fixture_dir):
    template, _ = read_chat_template(fixture_dir)
    assert template == (fixture_dir / "chat_template.jinja").read_text()


def test_raise_exception_becomes_a_clear_error(fixture_dir):
    template, specials = read_chat_template(fixture_dir)
    with pytest.raises(MixquantError, match="chat template: "):
        render(template, [], specials=specials)
