"""`mixquant serve` (the real command, in a subprocess on 127.0.0.1) against clients that hold
connections open with half-sent headers, bodies that are huge in message count, chunked bodies
over the limit, and a SIGTERM in the middle of a stream: /health keeps answering within a second,
the log stays small, and streams end with their finish chunk and [DONE]."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

KEY = "k-test"
CAP = 128  # the server's --max-connections: fewer than the connections the test opens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, model, log_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mixquant.cli", "serve", str(model), "--port", str(self.port), "--api-key", KEY,
             "--max-connections", str(CAP)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, self.log_text()
            try:
                self.health()
                break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)

    def health(self, timeout=5.0) -> float:
        start = time.monotonic()
        with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
            assert r.status == 200
        return time.monotonic() - start

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def served(fixture_dir, tmp_path_factory):
    s = Served(fixture_dir, tmp_path_factory.mktemp("serve") / "log.txt")
    yield s
    s.stop()


class HealthWatch:
    """Polls /health every 0.1 s in a thread; the slowest answer (a failure counts as infinite)."""

    def __init__(self, served):
        self.served, self.worst, self.count, self.stop_flag = served, 0.0, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            try:
                self.worst = max(self.worst, self.served.health(timeout=3.0))
            except OSError:
                self.worst = float("inf")
            self.count += 1
            time.sleep(0.1)

    def finish(self) -> float:
        self.stop_flag = True
        self.thread.join(10)
        return self.worst


def test_half_sent_headers_do_not_lock_anyone_out(served):
    """Twice the server's connection cap in connections that send part of a request head and stop."""
    watch = HealthWatch(served)
    held = []
    try:
        for _ in range(2 * CAP):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/js")
            held.append(s)
            time.sleep(0.005)
        time.sleep(1.0)
        assert served.health(timeout=2.0) < 1.0
    finally:
        worst = watch.finish()
        for s in held:
            s.close()
    assert watch.count > 10 and worst < 1.0, worst
    served.health()
    log = served.log_text()
    assert len(log) < 10_000, log[-2000:]
    assert "Too many open files" not in log and "Traceback" not in log


def test_a_body_of_many_tiny_messages_is_refused_without_blocking(served):
    body = json.dumps({"model": "m", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "a"}] * 150_000}).encode()
    assert 4 << 20 < len(body) < 8 << 20
    watch = HealthWatch(served)
    try:
        req = urllib.request.Request(served.url + "/v1/chat/completions", data=body, method="POST", headers={
            "content-type": "application/json", "authorization": f"Bearer {KEY}"})
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        took = time.monotonic() - start
    finally:
        worst = watch.finish()
    assert e.value.code == 400
    message = json.loads(e.value.read())["error"]["message"]
    assert message == "the prompt has at least 150000 tokens, over this server's limit of 32768"
    assert worst < 1.0, worst
    assert took < 10, took


def test_a_chunked_body_over_the_limit_is_413(served):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)

    def chunks():
        piece = b"x" * (1 << 20)
        for _ in range(9):
            yield piece

    conn.request("POST", "/v1/chat/completions", body=chunks(), encode_chunked=True,
                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["error"]["message"] == f"request body over {8 << 20} bytes"


def test_sigterm_ends_streams_with_their_finish_chunk_and_done(fixture_dir, tmp_path):
    s = Served(fixture_dir, tmp_path / "log.txt")
    try:
        req = urllib.request.Request(s.url + "/v1/chat/completions", method="POST", data=json.dumps({
            "model": "m", "stream": True, "max_tokens": 4000, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Write a long story."}]}).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        lines = []
        with urllib.request.urlopen(req, timeout=60) as r:
            for raw in r:
                line = raw.decode().strip()
                if line:
                    lines.append(line)
                if len(lines) == 5:
                    s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 128 + signal.SIGTERM  # as every mixquant command ends on SIGTERM
        log = s.log_text()
    finally:
        s.stop()
    assert "Traceback" not in log, log
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert 5 < len(lines) < 4000
