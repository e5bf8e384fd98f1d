"""Servers on 127.0.0.1 for the SDK tests (a helper module, not a conftest: its name would shadow
the tests' own conftest): one on the real engine (the fixture in float32), one on
an engine that plays scripted replies through the same tokenizer, template and text pipeline."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

KEY = "test-key"


class Running:
    def __init__(self, engine, **config):
        import uvicorn

        from mixquant.server.app import BodyLimit, ServerConfig, create_app

        self.engine = engine
        config.setdefault("api_key", KEY)
        self.config = ServerConfig("qwen35-tiny", **config)
        app = BodyLimit(create_app(engine, self.config), self.config.max_body_bytes)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def openai(self, key=KEY):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def anthropic(self, key=KEY):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=key, max_retries=0)

    def post(self, path: str, body: bytes | dict, headers=None, timeout=30):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method="POST", headers={
            "content-type": "application/json", "authorization": f"Bearer {KEY}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class ScriptedEngine:
    """The Engine's interface; replies come from `reply(prompt_text)` as the model's tokens, then its
    end-of-sequence token."""

    mtp = 0

    def __init__(self, model, reply):
        self.model, self.reply, self.active = model, reply, {}

    def submit(self, job):
        from mixquant.server.engine import END, Step

        def play():
            text = self.reply(self.model.tokenizer.decode(job.prompt))
            for token in (self.model.encode(text) + [self.model.tokenizer.eos_token_id])[: job.max_tokens]:
                if job.cancelled:
                    break
                job.deliver(Step(token))
            job.deliver(END)

        threading.Thread(target=play, daemon=True).start()

    def cancel(self, job):
        job.cancelled = True

    def close(self):
        pass


@pytest.fixture(scope="session")
def chat_model(fixture_dir):
    from mixquant.loading import load
    from mixquant.runtime.chat import Model

    return Model(load(fixture_dir, dtype="float32", dequantize=True))


@pytest.fixture(scope="module")
def live(chat_model):
    from mixquant.server.engine import Engine

    engine = Engine(chat_model, max_concurrency=4)
    running = Running(engine)
    yield running
    running.stop()
