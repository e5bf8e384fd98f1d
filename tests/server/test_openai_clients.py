"""What clients lean on, on the real engine (the fixture, float32): responses that follow OpenAI's
spec (tests/server/openai_schemas.py), log-probabilities equal to the model's own log-softmax,
seeded sampling, n choices, structured output by a JSON schema, token prompts and prompt scoring."""

import json
import random
import threading
from collections.abc import Iterator, MappingView

import jsonschema
import numpy as np
import pytest

import openai_schemas as spec
from serving import KEY, Running, ScriptedEngine, chat_model, live  # noqa: F401 - fixtures
from test_api import WEATHER, reply

USER = [{"role": "user", "content": "Tell me about the weather in spring."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def post(live, path, body):
    status, raw = live.post(path, body, timeout=120)
    assert status == 200, raw
    return json.loads(raw)


def stream(live, path, body) -> list[dict]:
    status, raw = live.post(path, {**body, "stream": True}, timeout=120)
    assert status == 200, raw
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def model_logprobs(chat_model, ids: list[int]) -> np.ndarray:
    """[len(ids), V] log-softmax of the model's logits over `ids` in one forward, no cache."""
    import mlx.core as mx

    logits = chat_model.model(mx.array(ids)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_every_response_kind_follows_the_spec(live, chat_model):
    chat = {"model": "m", "messages": USER, "max_tokens": 6, **NO_THINKING}
    jsonschema.validate(post(live, "/v1/chat/completions", chat), spec.CHAT_COMPLETION)
    jsonschema.validate(post(live, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 3, "n": 2,
                                                            "temperature": 1.0}), spec.CHAT_COMPLETION)
    structured = post(live, "/v1/chat/completions", {**chat, "max_tokens": 64, "response_format": {
        "type": "json_schema", "json_schema": {"name": "w", "strict": True, "schema": {
            "type": "object", "properties": {"sunny": {"type": "boolean"}}, "required": ["sunny"],
            "additionalProperties": False}}}})
    jsonschema.validate(structured, spec.CHAT_COMPLETION)
    assert isinstance(json.loads(structured["choices"][0]["message"]["content"])["sunny"], bool)
    chunks = stream(live, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 2, "n": 2,
                                                   "stream_options": {"include_usage": True}})
    for chunk in chunks:
        jsonschema.validate(chunk, spec.CHAT_CHUNK)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert sorted(c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]) \
        == ["length", "length"]
    text = {"model": "m", "prompt": "The weather in spring", "max_tokens": 5}
    for body in (text, {**text, "echo": True, "logprobs": 2}, {**text, "prompt": [[5, 6, 7], [8, 9]], "n": 2}):
        jsonschema.validate(post(live, "/v1/completions", body), spec.completion(streamed=False))
        for chunk in stream(live, "/v1/completions", {**body, "stream_options": {"include_usage": True}}):
            jsonschema.validate(chunk, spec.completion(streamed=True))


def test_tool_calls_follow_the_spec(chat_model):
    scripted = Running(ScriptedEngine(chat_model, reply))
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]}
        whole = post(scripted, "/v1/chat/completions", body)
        jsonschema.validate(whole, spec.CHAT_COMPLETION)
        assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        chunks = stream(scripted, "/v1/chat/completions", body)
        for chunk in chunks:
            jsonschema.validate(chunk, spec.CHAT_CHUNK)
        assert any(c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    finally:
        scripted.stop()


def test_chat_logprobs_are_the_models_log_softmax(live, chat_model):
    body = {"model": "m", "messages": USER, "max_tokens": 8, "logprobs": True, "top_logprobs": 5, "temperature": 0,
            **NO_THINKING}
    entries = post(live, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    ids = chat_model.encode(chat_model.prompt(USER, enable_thinking=False))
    start = len(ids)
    for _ in entries:  # greedy, one forward of the whole sequence per token
        ids.append(int(np.argmax(model_logprobs(chat_model, ids)[-1])))
    reference = model_logprobs(chat_model, ids)[start - 1:-1]
    table = chat_model.token_table
    for i, entry in enumerate(entries):
        token = ids[start + i]
        assert bytes(entry["bytes"]) == table.token_bytes(token)
        assert abs(entry["logprob"] - reference[i, token]) < 1e-4
        best = np.argsort(-reference[i])[:5]
        assert [t["bytes"] for t in entry["top_logprobs"]] == [list(table.token_bytes(int(t))) for t in best]
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], reference[i, best], atol=1e-4)


def test_prompt_scoring_with_echo_and_max_tokens_0(live, chat_model):
    ids = chat_model.encode("The weather in spring is mild, and the days grow longer.")
    body = {"model": "m", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}
    choice = post(live, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    reference = model_logprobs(chat_model, ids)
    assert choice["text"] == chat_model.tokenizer.decode(ids) and len(lp["token_logprobs"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], reference[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    for i in range(1, len(ids)):
        assert sorted(lp["top_logprobs"][i].values(), reverse=True) == pytest.approx(
            np.sort(reference[i - 1])[::-1][:3], abs=1e-4)
    assert lp["text_offset"] == np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()


def test_same_seed_same_text_alone_and_batched(live):
    body = {"model": "m", "messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": 1234, **NO_THINKING}

    def text(b):
        return post(live, "/v1/chat/completions", b)["choices"][0]["message"]["content"]

    alone = [text(body) for _ in range(5)]
    batched, others = [None] * 5, []

    def seeded(i):
        batched[i] = text(body)

    def unseeded(i):
        others.append(text({**body, "seed": None, "messages": [{"role": "user", "content": f"Story {i}"}],
                            "max_tokens": 40}))

    threads = [threading.Thread(target=f, args=(i,)) for i in range(5) for f in (seeded, unseeded)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(alone)) == 1 and batched == alone, (alone, batched)
    assert text({**body, "seed": 1235}) != alone[0]


def test_n_choices_and_usage(live, chat_model):
    body = {"model": "m", "messages": USER, "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 3, **NO_THINKING}
    out = post(live, "/v1/chat/completions", body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in out["choices"]}) > 1
    prompt = chat_model.encode(chat_model.prompt(USER, enable_thinking=False))
    assert out["usage"]["prompt_tokens"] == len(prompt) and out["usage"]["completion_tokens"] == 30
    assert post(live, "/v1/chat/completions", body)["choices"] == out["choices"]


def test_top_p_0_is_greedy_and_logit_bias_applies(live, chat_model):
    body = {"model": "m", "messages": USER, "max_tokens": 8, **NO_THINKING}
    greedy = post(live, "/v1/chat/completions", {**body, "temperature": 0})["choices"][0]["message"]["content"]
    assert post(live, "/v1/chat/completions", {**body, "temperature": 1.0, "top_p": 0, "stream": None}
                )["choices"][0]["message"]["content"] == greedy
    token = chat_model.encode(" rain")[0]
    biased = post(live, "/v1/chat/completions", {**body, "logit_bias": {str(token): 100}})
    assert biased["choices"][0]["message"]["content"] == chat_model.tokenizer.decode([token] * 8).lstrip()
    empty = post(live, "/v1/chat/completions", {**body, "max_completion_tokens": 0})
    assert empty["choices"][0]["message"]["content"] == "" and empty["choices"][0]["finish_reason"] == "length"
    assert empty["usage"]["completion_tokens"] == 0


def test_a_405_names_the_allowed_method(live):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(live.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 405 and e.value.headers["allow"] == "POST"


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema of the kinds agents send: nested objects, arrays, enums, required fields,
    bounded numbers and strings, anyOf."""
    kinds = ["integer", "number", "string", "boolean", "enum"] + (["object", "array", "anyOf"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": rng.randint(0, 1000)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 100}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 24)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "north", "south", "yes", "no"], rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 1, "maxItems": rng.randint(1, 3)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    names = rng.sample(["name", "city", "count", "tags", "score", "ok", "kind", "items", "when"], rng.randint(1, 4))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(1, len(names))), "additionalProperties": False}


def test_json_schema_outputs_always_validate(live):
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(30)]
    schemas = [s if s.get("type") == "object" else
               {"type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}
               for s in schemas]
    outputs = [None] * len(schemas)

    def ask(i):
        body = {"model": "m", "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 400,
                "temperature": 1.0, "seed": i, "response_format": {"type": "json_schema", "json_schema": {
                    "name": f"s{i}", "strict": True, "schema": schemas[i]}}}
        outputs[i] = post(live, "/v1/chat/completions", body)["choices"][0]

    for start in range(0, len(schemas), 6):
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(start, min(start + 6, len(schemas)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for schema, out in zip(schemas, outputs):
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["message"]["content"]), schema)


STRICT = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                     "hourly": {"type": "boolean"}},
    "required": ["city", "unit", "days", "hourly"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {"name": "set_alarm", "strict": True, "parameters": {
    "type": "object", "properties": {"minutes": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 59}, "maxItems": 3}},
    "required": ["minutes"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_alarm"}}])
def test_strict_forced_tool_calls_follow_their_schema(live, choice):
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (STRICT, ALARM)}
    for seed in range(6):
        body = {"model": "m", "messages": [{"role": "user", "content": "What's the weather in Lisbon?"}],
                "tools": [STRICT, ALARM], "tool_choice": choice, "temperature": 1.0, "seed": seed, "max_tokens": 200}
        out = post(live, "/v1/chat/completions", body)["choices"][0]
        assert out["finish_reason"] == "tool_calls", out
        (call,) = out["message"]["tool_calls"]
        if isinstance(choice, dict):
            assert call["function"]["name"] == "set_alarm"
        jsonschema.validate(json.loads(call["function"]["arguments"]), tools[call["function"]["name"]])


def _jsonable(value):
    """A request the SDK's types allow, as JSON (their Iterable fields as lists)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, (list, tuple, set, frozenset, Iterator, MappingView)):
        return [_jsonable(v) for v in value]
    return None  # an `object` field's arbitrary Python value (a network address, NotImplemented, ...)


def test_fuzz_from_the_spec_gives_no_5xx_and_only_spec_responses(chat_model):
    """Requests generated from the OpenAI SDK's request types (generated from OpenAI's OpenAPI
    spec), with max_tokens and n kept small, each sent as drawn and again with only the fields this
    server honours and a plain message: never a 5xx, and every 200 (streamed or not) follows the
    spec's response schema."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from openai.types import completion_create_params as completion
    from openai.types.chat import completion_create_params as chat

    from mixquant.server import openai_api as oai
    from mixquant.server.engine import Engine
    from mixquant.server.generation import Limits

    live = Running(Engine(chat_model, max_concurrency=4), limits=Limits(max_prompt_tokens=512, max_tokens=4))
    kinds = {"/v1/chat/completions": (chat.CompletionCreateParamsNonStreaming, spec.CHAT_COMPLETION, spec.CHAT_CHUNK),
             "/v1/completions": (completion.CompletionCreateParamsNonStreaming, spec.completion(False),
                                 spec.completion(True))}
    seen = {"ok": 0, "refused": 0}

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(sorted(kinds)), data=st.data(), streamed=st.booleans())
    def check(path, data, streamed):
        request, whole, chunk = kinds[path]
        body = _jsonable(data.draw(st.from_type(request)))
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = min(max(body[key], 0), 4)
        for key in ("n", "best_of"):
            if isinstance(body.get(key), int):
                body[key] = min(max(body[key], 1), 2)
        body["stream"] = streamed
        fields = (oai.ChatCompletionRequest if path == "/v1/chat/completions" else oai.CompletionRequest).model_fields
        honoured = {k: v for k, v in body.items() if k in fields}  # the same request without what is refused
        honoured.update({"messages": [{"role": "user", "content": "Hi"}]} if "messages" in fields else {"prompt": "Hi"})
        for sent in (body, honoured):
            status, raw = live.post(path, sent, timeout=120)
            assert status < 500, (path, sent, raw)
            if status != 200:
                seen["refused"] += 1
                assert "error" in json.loads(raw)
                continue
            seen["ok"] += 1
            if not streamed:
                jsonschema.validate(json.loads(raw), whole)
                continue
            events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                jsonschema.validate(json.loads(event), chunk)

    import torch

    torch.set_flush_denormal(False)  # hypothesis draws subnormal floats (conftest flushes them for torch's GDN)
    try:
        check()
    finally:
        torch.set_flush_denormal(True)
        live.stop()
    assert seen["ok"] >= 5, seen  # the fuzz reached the decoding paths, not only the refusals
