"""Task suites run against a model (through the chat runtime) or an OpenAI-compatible server, and
a candidate scored side by side with its reference on the same items.

Every reply is greedy (temperature 0) and capped at its suite's token budget; thinking is off.
A chat template that does not render tools (SmolLM2's, say) gets them in a system message that
asks for Qwen3's JSON form inside <tool_call> tags, and sees earlier calls and results written in
that form, so that every model is asked the same way and parsed by the same code.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.eval.metrics import percent_difference, percent_interval
from mixquant.tasks import bfcl, humaneval, stats, tools

SUITES = ("tools", "bfcl", "humaneval")
MAX_TOKENS = {"tools": 384, "bfcl": 384, "humaneval": 512}
TOOL_SYSTEM = ("You can call these tools. To call one, reply with <tool_call>{{\"name\": NAME, \"arguments\": "
               "{{...}}}}</tool_call>, one block per call; the results come back as <tool_response> blocks. Answer "
               "normally when no tool is needed.\n\nTools:\n{tools}")


def _plain_tool_messages(messages: list[dict], tool_defs: list[dict]) -> list[dict]:
    """The conversation for a template without tool support: the tools in a system message, calls
    and results as text."""
    out = [{"role": "system", "content": TOOL_SYSTEM.format(
        tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tool_defs))}]
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': json.loads(c['function']['arguments'])})}\n</tool_call>"
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m.get("content") or "") + calls})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


class LocalResponder:
    """Replies of a model folder (or GGUF file) loaded by the chat runtime."""

    def __init__(self, path: Path, kv=None):
        from mixquant.runtime.chat import load_model

        self.model = load_model(path, kv=kv)
        self.tools_in_template = "tools" in (self.model.template or "")
        self.label = str(path)

    def __call__(self, messages, tool_defs, max_tokens) -> tools.Reply:
        if tool_defs and not self.tools_in_template:
            messages, tool_defs = _plain_tool_messages(messages, tool_defs), None
        r = self.model.chat(messages, tools=tool_defs, max_new_tokens=max_tokens, temperature=0.0,
                            enable_thinking=False)
        return tools.Reply(r.text, [(c.name, c.arguments) for c in r.tool_calls], r.finish_reason, r.num_tokens,
                           r.malformed_tool_calls)


class ServerResponder:
    """Replies of an OpenAI-compatible server's /v1/chat/completions."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0, parallel: int = 1):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model, self.timeout, self.label, self.parallel = model, timeout, url, parallel

    def __call__(self, messages, tool_defs, max_tokens) -> tools.Reply:
        body = {"messages": messages, "temperature": 0.0, "max_tokens": max_tokens,
                "chat_template_kwargs": {"enable_thinking": False}}
        if self.model:  # without one, the server's own model (mlx_lm.server would look a "default" up on the Hub)
            body["model"] = self.model
        if tool_defs:
            body["tools"] = tool_defs
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                out = json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise MixquantError(f"{self.url}: {e}") from None
        choice = out["choices"][0]
        message = choice.get("message") or {}
        calls, malformed = [], False
        for c in message.get("tool_calls") or []:
            try:
                args = json.loads(c["function"].get("arguments") or "{}")
            except json.JSONDecodeError:
                args, malformed = {}, True
            calls.append((c["function"]["name"], args))
        finish = choice.get("finish_reason") or "stop"
        return tools.Reply(message.get("content") or "", calls, finish,
                           int((out.get("usage") or {}).get("completion_tokens", 0)), malformed)


def items_of(suite: str, limit: int | None) -> list[dict]:
    if suite == "tools":
        items = tools.load()[0]
    elif suite == "bfcl":
        per = None if limit is None else max(1, limit // len(bfcl.CATEGORIES))
        items = [i for c in bfcl.CATEGORIES for i in bfcl.load(c)[:per]]
        return items
    elif suite == "humaneval":
        items = humaneval.load()
    else:
        raise MixquantError(f"--suite: unknown suite {suite!r} (known: {', '.join(SUITES)})")
    return items[:limit] if limit else items


def score_item(suite: str, item: dict, respond) -> dict:
    """{"id", "score" in [0, 1], "detail"} of one item."""
    budget = MAX_TOKENS[suite]
    if suite == "tools":
        transcript = tools.play(item, respond, budget)
        points = tools.score(item, transcript)
        return {"id": item["id"], "category": item["category"], "score": points / 2, "points": points,
                "detail": {"calls": [[n, a] for n, a, _ in transcript["calls"]], "answer": transcript["answer"][:300],
                           "ended": transcript["ended"]}, "tokens": transcript["tokens"]}
    if suite == "bfcl":
        reply = respond(item["messages"], item["tools"], budget)
        ok = 0.0 if reply.finish == "length" else bfcl.grade(item, reply.calls, reply.malformed)
        return {"id": item["id"], "category": item["category"], "score": ok,
                "detail": {"calls": [[n, a] for n, a in reply.calls], "finish": reply.finish}, "tokens": reply.tokens}
    reply = respond(humaneval.messages(item), None, budget)
    ok, why = humaneval.grade(item, reply.content)
    return {"id": item["id"], "score": ok, "detail": {"result": why, "finish": reply.finish}, "tokens": reply.tokens}


def compare_rows(candidate: list[dict], reference: list[dict]) -> dict:
    """The paired difference over the items both were scored on."""
    by_id = {r["id"]: r["score"] for r in reference}
    ids = [r["id"] for r in candidate if r["id"] in by_id]
    cand = {r["id"]: r["score"] for r in candidate}
    return stats.paired([cand[i] for i in ids], [by_id[i] for i in ids])


def score_suite(suite: str, items: list[dict], respond, progress=None) -> list[dict]:
    """Every item's row, in item order; a responder with `parallel` > 1 gets that many items in
    flight at once (a server that batches requests)."""
    parallel = getattr(respond, "parallel", 1)
    if parallel <= 1:
        out = []
        for i, item in enumerate(items):
            out.append(score_item(suite, item, respond))
            if progress:
                progress(i + 1, len(items))
        return out
    from concurrent.futures import ThreadPoolExecutor, as_completed

    rows: list = [None] * len(items)
    with ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(score_item, suite, item, respond): k for k, item in enumerate(items)}
        for done, f in enumerate(as_completed(futures), 1):
            rows[futures[f]] = f.result()
            if progress:
                progress(done, len(items))
    return rows


def score_model(responder, suites=SUITES, limit: int | None = None, progress=None) -> dict:
    """{suite: {"items", "score" (interval), "seconds", "tokens", "rows"}} of one model;
    `progress(suite, i, n)`."""
    out = {}
    for suite in suites:
        items = items_of(suite, limit)
        t0 = time.perf_counter()
        rows = score_suite(suite, items, responder, progress and (lambda i, n, s=suite: progress(s, i, n)))
        out[suite] = {"items": len(items), "score": stats.interval([r["score"] for r in rows]),
                      "seconds": time.perf_counter() - t0, "tokens": sum(r["tokens"] for r in rows), "rows": rows}
    return out


def versus(candidate: dict, reference: dict) -> dict:
    """Per suite of two `score_model` results: each score and the paired difference, without rows."""
    return {suite: {"items": c["items"], "score": c["score"], "reference": reference[suite]["score"],
                    "difference": compare_rows(c["rows"], reference[suite]["rows"]), "seconds": c["seconds"]}
            for suite, c in candidate.items()}


def run(candidate, reference=None, suites=SUITES, limit: int | None = None, progress=None) -> dict:
    """The report: per suite, each model's per-item rows and score interval, and with a reference
    the paired difference. `candidate` and `reference` are responders; `progress(suite, role, i, n)`."""
    report = {"candidate": candidate.label, "reference": getattr(reference, "label", None), "suites": {}}
    scored = {}
    for role, responder in (("candidate", candidate), ("reference", reference)):
        if responder is not None:
            scored[role] = score_model(responder, suites, limit, progress and (
                lambda s, i, n, r=role: progress(s, r, i, n)))
    for suite in suites:
        entry = {"items": scored["candidate"][suite]["items"]}
        for role, by_suite in scored.items():
            entry[role] = {k: v for k, v in by_suite[suite].items() if k != "items"}
        if reference is not None:
            entry["difference"] = compare_rows(entry["candidate"]["rows"], entry["reference"]["rows"])
        report["suites"][suite] = entry
    return report


def markdown(report: dict) -> str:
    lines = ["| suite | items | candidate % (95% CI) | reference % (95% CI) | difference (95% CI) | p |",
             "|---|---:|---|---|---|---:|"]
    for suite, e in report["suites"].items():
        c = e["candidate"]["score"]
        row = f"| {suite} | {e['items']} | {percent_interval(c)} |"
        if "reference" in e:
            r, d = e["reference"]["score"], e["difference"]
            row += f" {percent_interval(r)} | {percent_difference(d)} | {d['p']:.3f} ({d['test']}) |"
        else:
            row += " - | - | - |"
        lines.append(row)
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Each suite's score, candidate beside reference, with 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(report["suites"])
    roles = [r for r in ("candidate", "reference") if report.get(r)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(suites), 4.2))
    width = 0.8 / len(roles)
    for k, role in enumerate(roles):
        scores = [report["suites"][s][role]["score"] for s in suites]
        xs = [i + (k - (len(roles) - 1) / 2) * width for i in range(len(suites))]
        means = [100 * s["mean"] for s in scores]
        errs = [[100 * (s["mean"] - s["low"]) for s in scores], [100 * (s["high"] - s["mean"]) for s in scores]]
        ax.bar(xs, means, width, yerr=errs, capsize=4, label=f"{role}: {Path(str(report[role])).name}")
    ax.set_xticks(range(len(suites)), suites)
    ax.set_ylabel("score % (95% interval)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
