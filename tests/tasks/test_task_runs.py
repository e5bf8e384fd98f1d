"""Suites driven end to end: fake models side by side, an OpenAI-compatible endpoint's replies
parsed, the fixture through the chat runtime, and the command's one-line errors."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from mixquant.tasks import run as tasks
from mixquant.tasks.tools import Reply

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "qwen35-tiny"


class Fixed:
    """A fake model giving one reply to everything."""

    def __init__(self, reply, label):
        self.reply, self.label = reply, label

    def __call__(self, messages, tool_defs, max_tokens):
        return self.reply


def test_side_by_side_report_pairs_the_same_items(tmp_path):
    quiet = Fixed(Reply("Paris. Hi Ana, moved to Friday."), "quiet")
    caller = Fixed(Reply("", [("get_weather", {"city": "x"})], "tool_calls"), "caller")
    report = tasks.run(quiet, caller, suites=["tools"])
    entry = report["suites"]["tools"]
    assert entry["items"] == 15
    ids = [r["id"] for r in entry["candidate"]["rows"]]
    assert ids == [r["id"] for r in entry["reference"]["rows"]]
    by_id = {r["id"]: r["points"] for r in entry["candidate"]["rows"]}
    assert by_id["restraint-trivia"] == 2 and by_id["restraint-draft-only"] == 2 and by_id["selection-forecast"] == 0
    assert entry["reference"]["score"]["mean"] == 0.0  # a tool it was not given, every time
    assert entry["difference"]["diff"] == pytest.approx(entry["candidate"]["score"]["mean"])
    table = tasks.markdown(report)
    assert table.splitlines()[2].startswith("| tools | 15 | ")
    tasks.plot(report, tmp_path / "tasks.partial")
    assert (tmp_path / "tasks.partial").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfcl_limit_takes_each_category():
    items = tasks.items_of("bfcl", 8)
    assert [i["category"] for i in items] == ["simple"] * 2 + ["multiple"] * 2 + ["parallel"] * 2 + ["irrelevance"] * 2


class _Endpoint(BaseHTTPRequestHandler):
    replies: list = []
    bodies: list = []

    def do_POST(self):
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        data = json.dumps(self.replies.pop(0)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_server_replies_are_read_as_openai_gives_them():
    server = HTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _Endpoint.replies[:] = [
            {"choices": [{"message": {"content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "calculate_triangle_area", "arguments": "{\"base\": 10, \"height\": 5}"}}]},
                "finish_reason": "tool_calls"}], "usage": {"completion_tokens": 17}},
            {"choices": [{"message": {"content": "no", "tool_calls": [{"id": "c2", "type": "function", "function": {
                "name": "f", "arguments": "{oops"}}]}, "finish_reason": "tool_calls"}]},
            {"choices": [{"message": {"content": "Paris " * 10}, "finish_reason": "length"}]}]
        respond = tasks.ServerResponder(f"http://127.0.0.1:{server.server_port}")
        item = tasks.items_of("bfcl", 4)[0]
        row = tasks.score_item("bfcl", item, respond)
        assert row["score"] == 1.0 and row["tokens"] == 17
        sent = _Endpoint.bodies[0]
        assert "model" not in sent and sent["temperature"] == 0.0 and sent["max_tokens"] == tasks.MAX_TOKENS["bfcl"]
        assert sent["tools"][0]["function"]["name"] == "calculate_triangle_area"
        bad = respond([{"role": "user", "content": "x"}], None, 8)
        assert bad.malformed and bad.calls == [("f", {})]
        cut = respond([{"role": "user", "content": "x"}], None, 8)
        assert cut.finish == "length"
    finally:
        server.shutdown()


def test_a_template_without_tools_gets_them_in_a_system_message():
    tool_defs = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "tool_call_id": "a", "content": "{\"y\": 2}"}]
    out = tasks._plain_tool_messages(messages, tool_defs)
    assert out[0]["role"] == "system" and '{"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": '<tool_response>\n{"y": 2}\n</tool_response>'}


def test_the_fixture_plays_the_tools_suite_through_the_chat_runtime(tmp_path):
    out = tmp_path / "tasks.json"
    run = subprocess.run([sys.executable, "-m", "mixquant.cli", "tasks", str(FIXTURE), "--suite", "tools", "--limit", "3",
                          "--json", str(out), "--plot", str(tmp_path / "tasks.png")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    rows = report["suites"]["tools"]["candidate"]["rows"]
    assert [r["id"] for r in rows] == ["selection-forecast", "selection-currency", "selection-calendar"]
    assert all(r["points"] in (0, 1, 2) and r["tokens"] > 0 for r in rows)
    assert "| tools | 3 |" in run.stdout
    assert (tmp_path / "tasks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, message", [
    (["tasks", str(FIXTURE), "--suite", "mmlu"], "--suite: unknown suite(s) mmlu (known: tools, bfcl, humaneval)"),
    (["tasks", "--suite", "tools"], "tasks: give a MODEL folder or --server URL (one of them)"),
    (["tasks", str(FIXTURE), "--server", "http://127.0.0.1:9"], "tasks: give a MODEL folder or --server URL"),
    (["tasks", str(FIXTURE), "--limit", "0"], "--limit: must be at least 1, got 0"),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    run = subprocess.run([sys.executable, "-m", "mixquant.cli", *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


class ByItem:
    """A fake server answering each item by its first message, `parallel` items at a time; the
    first two calls wait for each other, so a sequential run would time out."""

    def __init__(self, parallel):
        self.parallel, self.label = parallel, "by-item"
        self.meet = threading.Barrier(2, timeout=10) if parallel > 1 else None
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, messages, tool_defs, max_tokens):
        with self.lock:
            self.calls += 1
            first = self.calls <= 2
        if first and self.meet:
            self.meet.wait()
        text = messages[-1]["content"]
        if len(text) % 2:
            return Reply("", [(tool_defs[0]["function"]["name"], {})], "tool_calls") if tool_defs else Reply("x")
        return Reply("Paris. Hi Ana, moved to Friday.")


def test_parallel_items_give_the_sequential_rows_in_item_order():
    sequential = tasks.score_model(ByItem(1), ["bfcl"], limit=8)
    parallel = tasks.score_model(ByItem(4), ["bfcl"], limit=8)
    assert parallel["bfcl"]["rows"] == sequential["bfcl"]["rows"]
    assert [r["id"] for r in parallel["bfcl"]["rows"]] == [i["id"] for i in tasks.items_of("bfcl", 8)]


def test_versus_pairs_two_scored_models_without_their_rows():
    quiet = tasks.score_model(Fixed(Reply("Paris. Hi Ana, moved to Friday."), "quiet"), ["tools"], limit=6)
    caller = tasks.score_model(Fixed(Reply("", [("get_weather", {"city": "x"})], "tool_calls"), "c"), ["tools"], limit=6)
    out = tasks.versus(quiet, caller)
    assert set(out["tools"]) == {"items", "score", "reference", "difference", "seconds"}
    assert out["tools"]["items"] == 6
    assert out["tools"]["difference"]["diff"] == pytest.approx(quiet["tools"]["score"]["mean"]
                                                               - caller["tools"]["score"]["mean"])


def test_compare_scores_tasks_beside_kld(tmp_path):
    out = tmp_path / "cmp"
    run = subprocess.run([sys.executable, "-m", "mixquant.cli", "compare", str(FIXTURE), str(FIXTURE), "--out", str(out),
                          "--chunks", "1", "--ctx", "64", "--tasks", "tools", "--tasks-limit", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    entry, = json.loads((out / "report.json").read_text())["entries"]
    t = entry["tasks"]["tools"]
    assert t["items"] == 2 and t["score"] == t["reference"]  # the same weights, greedy: the same replies
    assert t["difference"]["diff"] == 0.0 and t["difference"]["p"] == 1.0
    md = (out / "report.md").read_text()
    assert "| model | tools % | tools difference |" in md and "| qwen35-tiny | " in md.split("tools difference")[1]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "mmlu"], "--tasks: unknown suite(s) mmlu (known: tools, bfcl, humaneval)"),
    (["--tasks-limit", "3"], "--tasks-limit: only with --tasks"),
    (["--tasks", "tools", "--tasks-limit", "0"], "--tasks-limit: must be at least 1, got 0"),
])
def test_compare_task_arguments_are_one_line_errors(tmp_path, argv, message):
    run = subprocess.run([sys.executable, "-m", "mixquant.cli", "compare", str(FIXTURE), str(FIXTURE),
                          "--out", str(tmp_path / "o"), *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr


def test_compare_tasks_need_the_reference_model(tmp_path):
    saved = tmp_path / "ref.npz"
    saved.write_bytes(b"")
    run = subprocess.run([sys.executable, "-m", "mixquant.cli", "compare", str(saved), str(FIXTURE),
                          "--out", str(tmp_path / "o"), "--tasks", "tools"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--tasks needs the reference model (a folder or GGUF)" in run.stderr
