"""The OpenAI and Anthropic SDKs against `mixquant serve`'s app: tool-call round trips, thinking on
and off, the Responses API, streaming against non-streaming, keys, errors. Replies are scripted
(the fixture cannot be relied on to call tools) and go through the real tokenizer, chat template
and text pipeline."""

import json

import pytest

from serving import KEY, Running, ScriptedEngine, chat_model  # noqa: F401 - chat_model: a fixture

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ANTHROPIC_WEATHER = {"name": "get_weather", "description": "Current weather in a city",
                     "input_schema": WEATHER["function"]["parameters"]}
RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}
CALL = "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


def reply(prompt: str) -> str:
    thinking = prompt.endswith("<think>\n")
    out = "The user wants the weather.\n</think>\n\n" if thinking else ""
    if prompt.endswith("<function=get_weather>\n"):
        return CALL[CALL.index("<parameter") :]
    if prompt.endswith("<tool_call>\n"):
        return CALL
    if "<tool_response>" in prompt.rsplit("<|im_start|>user", 1)[-1]:
        return out + "It is sunny in Paris."
    if "get_weather" in prompt:
        return out + "Let me check.\n\n<tool_call>\n" + CALL
    return out + "Hello there."


@pytest.fixture(scope="module")
def scripted(chat_model):
    running = Running(ScriptedEngine(chat_model, reply))
    yield running
    running.stop()


def test_openai_tool_call_round_trip(scripted):
    client = scripted.openai()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], max_tokens=100,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.content == "Let me check."
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], max_tokens=100,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert second.choices[0].message.content == "It is sunny in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls


def test_openai_streamed_tool_call_and_thinking(scripted):
    client = scripted.openai()
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], max_tokens=100,
        stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert reasoning.strip() == "The user wants the weather." and content == "Let me check."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in calls] == [("get_weather", {"city": "Paris"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens > 0


@pytest.mark.parametrize("thinking", [True, False])
def test_openai_thinking_switch(scripted, thinking):
    r = scripted.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=50,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    message = r.choices[0].message
    assert message.content == "Hello there."
    assert getattr(message, "reasoning_content", None) == ("The user wants the weather." if thinking else None)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_tool_choice_forces_a_call(scripted, choice):
    r = scripted.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], tool_choice=choice, max_tokens=100)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_openai_tool_choice_none_hides_the_tools(scripted):
    r = scripted.openai().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER], tool_choice="none", max_tokens=50,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == "Hello there." and not r.choices[0].message.tool_calls


def test_responses_text_and_tool_call(scripted):
    client = scripted.openai()
    r = client.responses.create(model="m", input="Hi", max_output_tokens=50, reasoning={"effort": "none"})
    assert r.output_text == "Hello there." and r.status == "completed"
    r = client.responses.create(model="m", input="Weather in Paris?", tools=[RESPONSES_WEATHER],
                                max_output_tokens=100, reasoning={"effort": "none"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    follow = client.responses.create(model="m", tools=[RESPONSES_WEATHER], max_output_tokens=100,
                                     reasoning={"effort": "none"}, input=[
                                         {"role": "user", "content": "Weather in Paris?"},
                                         {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                                          "arguments": calls[0].arguments},
                                         {"type": "function_call_output", "call_id": calls[0].call_id,
                                          "output": "sunny"}])
    assert follow.output_text == "It is sunny in Paris."


def test_responses_stream_events(scripted):
    with scripted.openai().responses.stream(model="m", input="Weather in Paris?", tools=[RESPONSES_WEATHER],
                                            max_output_tokens=100) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert final.output_text == "Let me check."


def test_anthropic_tool_use_round_trip(scripted):
    client = scripted.anthropic()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.messages.create(model="m", max_tokens=100, messages=messages, tools=[ANTHROPIC_WEATHER])
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    use = first.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}]
    second = client.messages.create(model="m", max_tokens=100, messages=messages, tools=[ANTHROPIC_WEATHER])
    assert second.stop_reason == "end_turn" and second.content[0].text == "It is sunny in Paris."


@pytest.mark.parametrize("thinking", [True, False])
def test_anthropic_stream_matches_create(scripted, thinking):
    client = scripted.anthropic()
    kwargs = dict(model="m", max_tokens=100, messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=[ANTHROPIC_WEATHER])
    if thinking:
        kwargs["thinking"] = {"type": "enabled", "budget_tokens": 1024}
    created = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [b.model_dump(exclude={"id", "signature"}) for b in streamed.content] == \
        [b.model_dump(exclude={"id", "signature"}) for b in created.content]
    kinds = [b.type for b in created.content]
    assert kinds == (["thinking", "text", "tool_use"] if thinking else ["text", "tool_use"])
    assert streamed.stop_reason == created.stop_reason == "tool_use"


def test_anthropic_stop_sequence_and_count_tokens(scripted):
    client = scripted.anthropic()
    r = client.messages.create(model="m", max_tokens=50, messages=[{"role": "user", "content": "Hi"}],
                               stop_sequences=["there"])
    assert r.content[0].text == "Hello " and r.stop_reason == "stop_sequence" and r.stop_sequence == "there"
    count = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert count.input_tokens == len(scripted.engine.model.encode(scripted.engine.model.prompt(
        [{"role": "user", "content": "Hi"}], enable_thinking=False)))


def test_models_health_and_keys(scripted):
    import anthropic
    import openai

    assert [m.id for m in scripted.openai().models.list()] == ["qwen35-tiny"]
    with pytest.raises(openai.AuthenticationError):
        scripted.openai("wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        scripted.anthropic("wrong").messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})):
        status, raw = scripted.post(path, body, headers={"authorization": ""})  # no key at all
        error = json.loads(raw)["error"]
        assert status == 401 and error["type"] == "authentication_error"
        assert error["message"] == "invalid or missing API key"
    import urllib.request

    with urllib.request.urlopen(scripted.url + "/health") as r:  # no key needed
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/chat/completions", b"{not json", 400, "the body is not valid JSON"),
    ("/v1/chat/completions", {"messages": []}, 400,
     "messages: List should have at least 1 item after validation, not 0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400,
     "max_tokens: Input should be greater than or equal to 0"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}, 400,
     "audio: audio output is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokenz": 5}, 400,
     "max_tokenz: unknown field"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs: needs logprobs set to true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"99999": 1}}, 400,
     "logit_bias: '99999' is not a token id of this model (0..8191)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}}, 400,
     'response_format: the JSON schema cannot be compiled: Unimplemented keys: ["not"]'),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400,
     "max_tokens 0 scores the prompt: it needs echo and logprobs"),
    ("/v1/completions", {"prompt": [5, 9999], "max_tokens": 2}, 400,
     "prompt[0]: 9999 is not a token id of this model (0..8191)"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400,
     "suffix: not supported (no fill-in-the-middle prompt for this model)"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of (1) must be at least n (2)"),
    ("/v1/completions", {"prompt": ["x"] * 9, "n": 8}, 400, "9 prompts x 8 choices: over this server's limit of 64 "
     "per request"),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}, 400,
     "previous_response_id: this server keeps no responses: send the whole input"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "mcp_servers": []}, 400,
     "mcp_servers: MCP servers are not supported"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temprature": 1}, 400,
     "temprature: unknown field"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice requires a tool call but no tools were given"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "messages[0].tool_calls[0].function: arguments are not valid JSON"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x"}]}, 400, "max_tokens: Field required"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role: Input should be 'user' or 'assistant'"),
])
def test_bad_requests_get_api_style_errors(scripted, path, body, status, message):
    got, raw = scripted.post(path, body)
    data = json.loads(raw)
    assert got == status
    if path.startswith("/v1/messages"):
        assert data["type"] == "error" and data["error"]["message"] == message
    else:
        assert data["error"]["message"] == message


def test_body_size_limit(chat_model):
    running = Running(ScriptedEngine(chat_model, reply), max_body_bytes=4096)
    try:
        status, raw = running.post("/v1/chat/completions", b"x" * 10_000)
        assert status == 413 and "request body over 4096 bytes" in json.loads(raw)["error"]["message"]
    finally:
        running.stop()
