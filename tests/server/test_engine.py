"""The server on the real engine (the fixture, float32): batched decoding, the shared prefix cache,
clients that leave, and malformed bodies from every path of its OpenAPI spec."""

import http.client
import json
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import KEY, Running, chat_model, live  # noqa: F401 - fixtures

USER = [{"role": "user", "content": "Write a Python function that reads a config file."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def test_streamed_equals_unstreamed_and_plain_chat(live, chat_model):
    client = live.openai()
    kwargs = dict(model="m", messages=USER, max_tokens=24, temperature=0, extra_body=NO_THINKING)
    whole = client.chat.completions.create(**kwargs)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    reference = chat_model.chat(USER, max_new_tokens=24, temperature=0.0, enable_thinking=False)
    assert whole.choices[0].message.content == streamed == reference.text
    assert whole.usage.completion_tokens == reference.num_tokens


def test_second_turn_reuses_the_conversation_cache(live, chat_model):
    client = live.openai()
    messages = [{"role": "user", "content": "Explain what a hash map is, briefly."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                           extra_body=NO_THINKING)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a linked list?"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                            extra_body=NO_THINKING)
    # the first turn kept its cache where the conversation ended before the generation prompt
    history = chat_model.encode(chat_model.render_history(messages[:1], enable_thinking=False))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == len(history) > 0
    reference = chat_model.chat(messages, max_new_tokens=16, temperature=0.0, enable_thinking=False)
    assert second.choices[0].message.content == reference.text  # restored state is exact


def test_a_long_first_turn_is_kept_at_its_boundary(live, chat_model, fixture_dir):
    """A first turn prefilled in several pieces (prefill_pieces) keeps its cache where the
    conversation ends, however many pieces lead there."""
    text = (fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:7000]
    messages = [{"role": "user", "content": "Summarise:\n" + text}]
    history = chat_model.encode(chat_model.render_history(messages, enable_thinking=False))
    assert len(history) > 3 * 512
    client = live.openai()
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0,
                                           extra_body=NO_THINKING)
    (kept,) = [e for e in live.engine.prefix.entries if e.tokens == tuple(history)]
    assert {offset for kind, _, offset in kept.snapshot if kind == "kv"} == {len(history)}  # the whole history
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Shorter."}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0,
                                            extra_body=NO_THINKING)
    assert second.usage.prompt_tokens_details.cached_tokens == len(history)


def test_concurrent_clients_are_decoded_together(live):
    results, peak = {}, [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], len(live.engine.active))
            time.sleep(0.005)

    def client(i):
        stream = live.openai().chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}], max_tokens=32,
            stream=True, extra_body=NO_THINKING)
        results[i] = sum(1 for c in stream if c.choices and c.choices[0].delta.content)

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    assert sorted(results) == [0, 1, 2, 3] and all(n > 0 for n in results.values())
    assert peak[0] >= 2  # not one after another


def test_a_client_that_leaves_mid_stream_frees_its_slot(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    body = json.dumps({"messages": USER, "max_tokens": 2000, "stream": True, "chat_template_kwargs":
                       {"enable_thinking": False}})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json",
                                                        "authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event
    while not live.engine.active:
        time.sleep(0.01)
    conn.sock.close()
    conn.close()
    left = time.monotonic()
    while live.engine.active and time.monotonic() - left < 5:
        time.sleep(0.01)
    assert not live.engine.active and time.monotonic() - left < 1.0
    r = live.openai().chat.completions.create(model="m", messages=USER, max_tokens=4, extra_body=NO_THINKING)
    assert r.choices[0].finish_reason == "length"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_subnormal=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=12)
FIELDS = ["model", "messages", "max_tokens", "stream", "tools", "tool_choice", "prompt", "input", "system",
          "temperature", "top_p", "stop", "max_output_tokens", "thinking", "n", "content", "role"]
BODY = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=64),
)


def test_malformed_bodies_never_get_a_5xx(chat_model):
    from mixquant.server.engine import Engine
    from mixquant.server.generation import Limits

    live = Running(Engine(chat_model, max_concurrency=4), limits=Limits(max_prompt_tokens=256, max_tokens=4))
    try:
        _fuzz(live)
    finally:
        live.stop()


def _fuzz(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    conn.request("GET", "/openapi.json", headers={"authorization": f"Bearer {KEY}"})
    spec = json.loads(conn.getresponse().read())
    paths = sorted(p for p, ops in spec["paths"].items() if "post" in ops)
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
            "/v1/messages/count_tokens"} <= set(paths)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), body=BODY)
    def check(path, body):
        status, raw = live.post(path, body)
        assert status < 500, (path, body, raw)
        if status >= 400:
            data = json.loads(raw)
            assert "error" in data

    check()
    # a new connection: the first can idle past uvicorn's keep-alive while the fuzz runs
    fresh = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    fresh.request("GET", "/health")
    assert fresh.getresponse().status == 200


def test_mtp_engine_decodes_as_plain_chat(fixture_dir):
    from mixquant.loading import load
    from mixquant.runtime.chat import Model
    from mixquant.server.engine import Engine

    model = Model(load(fixture_dir, dtype="float32", dequantize=True, mtp=True))
    live = Running(Engine(model, mtp=2))
    try:
        client = live.openai()
        kwargs = dict(model="m", messages=USER, max_tokens=24, temperature=0, extra_body=NO_THINKING)
        first, second = (client.chat.completions.create(**kwargs) for _ in range(2))
        reference = model.chat(USER, max_new_tokens=24, temperature=0.0, enable_thinking=False)
        assert first.choices[0].message.content == second.choices[0].message.content == reference.text
        assert second.usage.prompt_tokens_details.cached_tokens > 0  # the session's kept conversation
    finally:
        live.stop()


def test_prefix_cache_says_what_it_drops(chat_model):
    """Under --shard rank 0 tells the other ranks which snapshots its prefix cache dropped (their
    own shares of a snapshot have other sizes): it lists them only when asked to."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mixquant.server.engine import PrefixCache

    cache = make_prompt_cache(chat_model.model)
    mx.eval(chat_model.model(mx.array([[1, 2, 3]]), cache=cache))
    told, plain = PrefixCache(1, evicted=[]), PrefixCache(1)  # room for one snapshot
    for prefix in (told, plain):
        prefix.store([1, 2, 3], cache)
        prefix.store([1, 2], cache)
        assert [e.tokens for e in prefix.entries] == [(1, 2)]
    assert told.evicted == [(1, 2, 3)] and plain.evicted is None
    told.drop((1, 2))
    assert told.entries == [] and told.lookup([1, 2, 3]) == (0, None)
