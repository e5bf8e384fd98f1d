"""`mixquant chat` driven in tmux like a person would, and SmolLM2 answering through the runtime."""

import shutil
import subprocess
import sys
import time

import pytest

import llamacpp_tools
import mixquant
from conftest import run_cli


def _wait_for(session, text, count=1, timeout=120):
    deadline = time.time() + timeout
    screen = ""
    while time.time() < deadline:
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-S", "-200", "-t", session], capture_output=True,
                                text=True).stdout
        if screen.count(text) >= count:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {text!r}; screen:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_repl_in_tmux(fixture_dir, tmp_path):
    model = tmp_path / "q4"
    assert run_cli("convert", "-i", fixture_dir, "-o", model, "-q", "--q-bits", "4", "--drop-vision") == 0
    session = f"mixquant-test-{id(tmp_path)}"
    cmd = f"{sys.executable} -m mixquant.cli chat {model} --max-tokens 8 --temperature 0; echo EXITED-$?; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True)
    try:
        _wait_for(session, ">>>")  # capture-pane drops the trailing space
        for i, line in enumerate(["def add(a, b):", "import os"], start=1):
            subprocess.run(["tmux", "send-keys", "-t", session, line, "Enter"], check=True)
            screen = _wait_for(session, "tok/s]", count=i)
        assert "prefill" in screen and "decode" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "/reset", "Enter"], check=True)
        _wait_for(session, "(conversation reset)")
        subprocess.run(["tmux", "send-keys", "-t", session, "/exit", "Enter"], check=True)
        screen = _wait_for(session, "EXITED-")
        assert "EXITED-0" in screen and "Traceback" not in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smol"
    assert run_cli("convert", "-i", llamacpp_tools.smollm2_gguf(), "-o", out) == 0
    return mixquant.load(out)


def test_smollm2_answers_and_streams_the_same(smollm2, capsys):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    result = smollm2.chat(msgs, max_new_tokens=24, temperature=0.0)
    with capsys.disabled():
        print(f"\nSmolLM2 chat: {result.text!r}")
    assert "Paris" in result.text and result.finish_reason == "stop"
    streamed = "".join(e.text for e in smollm2.chat_stream(msgs, max_new_tokens=24, temperature=0.0)
                       if e.type == "text")
    assert streamed == result.text


def test_smollm2_stopped_stream_leaves_model_usable(smollm2):
    msgs = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    stream = smollm2.chat_stream(msgs, max_new_tokens=200, temperature=0.0)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert all(p.type == "text" for p in pieces)
    again = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24,
                         temperature=0.0)
    assert "Paris" in again.text


def test_async_stream(smollm2):
    import asyncio

    async def collect():
        return [e async for e in smollm2.achat_stream([{"role": "user", "content": "Hi"}], max_new_tokens=4,
                                                     temperature=0.0)]

    events = asyncio.run(collect())
    assert events[-1].type == "done"
