"""The server with a quantized KV cache: batched requests, the prefix cache and a second turn decode
what the chat path decodes on the same cache (mlx-lm's QuantizedKVCache at 8 bits; a per-layer
allocation with K and V at different widths)."""

import threading

import pytest

from serving import Running

QUESTIONS = ["Write a Python function that reads a config file.", "What is a hash map?",
             "Explain recursion to a child.", "List three sorting algorithms."]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def _model(fixture_dir, kv):
    from mixquant.loading import load
    from mixquant.runtime.chat import Model

    return Model(load(fixture_dir, dtype="float32", dequantize=True), kv)


def _per_layer():
    from mixquant.runtime.kv import KVQuant, LayerKV, Width

    return KVQuant(None, layers=((3, LayerKV(Width(8, 64), Width(4, 32))), (7, LayerKV(Width(4, 64), Width(8, 64)))))


@pytest.fixture(scope="module", params=["8-bit", "per layer"])
def served(request, fixture_dir):
    from mixquant.runtime.kv import KVQuant
    from mixquant.server.engine import Engine

    model = _model(fixture_dir, KVQuant(8) if request.param == "8-bit" else _per_layer())
    engine = Engine(model, max_concurrency=4)
    running = Running(engine)
    yield model, running
    running.stop()


def test_batched_requests_decode_as_chat_does_on_the_same_cache(served):
    model, live = served
    replies = {}

    def ask(i):
        r = live.openai().chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[i]}],
                                                  max_tokens=24, temperature=0, extra_body=NO_THINKING)
        replies[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, q in enumerate(QUESTIONS):
        reference = model.chat([{"role": "user", "content": q}], max_new_tokens=24, temperature=0.0,
                               enable_thinking=False)
        assert replies[i] == reference.text, q


def test_the_kept_cache_is_quantized_and_a_second_turn_reuses_it(served):
    model, live = served
    client = live.openai()
    messages = [{"role": "user", "content": "Explain what a linked list is, briefly."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                           extra_body=NO_THINKING)
    history = model.encode(model.render_history(messages, enable_thinking=False))
    (kept,) = [e for e in live.engine.prefix.entries if e.tokens == tuple(history)]
    mixed = [meta for kind, _, meta in kept.snapshot if kind == "mixed"]
    assert len(mixed) == 2 and all(n == len(history) and quantized for n, spec, _, quantized in mixed)
    assert [spec for _, spec, _, _ in mixed] == [model.kv.spec(3), model.kv.spec(7)]
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And a tree?"}]
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                            extra_body=NO_THINKING)
    assert second.usage.prompt_tokens_details.cached_tokens == len(history)
    reference = model.chat(messages, max_new_tokens=16, temperature=0.0, enable_thinking=False)
    assert second.choices[0].message.content == reference.text
