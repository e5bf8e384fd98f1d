"""mixquant's own tool-calling suite (mixquant/tasks/data/tools.json): five categories of three
scenarios, played against a model with scripted tool results and scored 2/1/0 by deterministic
checks of what it called and answered.

A scenario's conversation: its first user message; each reply's tool calls get their scripted
results as tool messages and the model goes on; a reply without calls ends the user's turn and the
next user message (if any) follows. A reply cut off by the token limit, or more than MAX_STEPS
replies in one turn, ends the scenario with 0: a model that loops cannot score.

Checks (every one of "full" holds: 2; else every one of "partial": 1; else 0):
  call {name, args?}: some call of `name` whose arguments match `args` (see `arg_matches`)
  only [names]: no tool outside `names` was called      no_call name / no_calls: never called
  order [a, b, ...]: the first calls of these tools came in this order
  calls_at_most n / calls_at_least {name: n}            succeeded name: a call got a result without "error"
  answer [texts]: the final reply contains one of them (case-insensitive)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from mixquant.tasks.bfcl import value_matches

MAX_STEPS = 6


@dataclass
class Reply:
    content: str
    calls: list[tuple[str, dict]] = field(default_factory=list)
    finish: str = "stop"  # stop | length | tool_calls
    tokens: int = 0
    malformed: bool = False


def load() -> tuple[list[dict], dict]:
    data = json.loads(resources.files("mixquant.tasks").joinpath("data/tools.json").read_text())
    tools = {name: {"type": "function", "function": {"name": name, **spec}} for name, spec in data["tools"].items()}
    items = [dict(s, tool_defs=[tools[t] for t in s["tools"]]) for s in data["scenarios"]]
    return items, tools


def arg_matches(value, spec) -> bool:
    """spec: {"contains": text} (a string containing it, case-insensitively), a list of possible
    values (BFCL's comparison), or one value."""
    if isinstance(spec, dict) and set(spec) == {"contains"}:
        return isinstance(value, str) and spec["contains"].lower() in value.lower()
    if isinstance(spec, list):
        return any(value_matches(value, o) for o in spec)
    return value_matches(value, spec)


def _args_match(args: dict, wanted: dict) -> bool:
    return isinstance(args, dict) and all(k in args and arg_matches(args[k], v) for k, v in wanted.items())


def tool_result(scenario: dict, name: str, args: dict):
    script = scenario["results"].get(name)
    if script is None:
        return {"error": f"tool {name} is not available"}
    for rule in script.get("rules", []):
        if _args_match(args, rule["when"]):
            return rule["result"]
    return script.get("otherwise", {"error": "unexpected arguments"})


def play(scenario: dict, respond, max_tokens: int) -> dict:
    """The scenario's transcript: {"calls": [(name, args, result)], "answer": final text, "ended":
    "done" | "length" | "steps", "tokens"}. `respond(messages, tools, max_tokens)` gives a Reply."""
    messages: list[dict] = []
    calls: list[tuple[str, dict, object]] = []
    tokens, answer, ended = 0, "", "done"
    for user in scenario["user"]:
        messages.append({"role": "user", "content": user})
        for step in range(MAX_STEPS + 1):
            if step == MAX_STEPS:
                ended = "steps"
                break
            reply = respond(messages, scenario["tool_defs"], max_tokens)
            tokens += reply.tokens
            if reply.finish == "length":
                ended = "length"
                break
            if not reply.calls:
                answer = reply.content
                messages.append({"role": "assistant", "content": reply.content})
                break
            ids = [f"call_{len(calls) + i}" for i in range(len(reply.calls))]
            messages.append({"role": "assistant", "content": reply.content, "tool_calls": [
                {"id": i, "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                for i, (n, a) in zip(ids, reply.calls)]})
            for i, (name, args) in zip(ids, reply.calls):
                result = tool_result(scenario, name, args)
                calls.append((name, args, result))
                messages.append({"role": "tool", "tool_call_id": i, "name": name, "content": json.dumps(result)})
        if ended != "done":
            break
    return {"calls": calls, "answer": answer, "ended": ended, "tokens": tokens}


def holds(check: dict, transcript: dict) -> bool:
    """One check of a scenario (a "call" check carries its "args" beside it)."""
    calls = transcript["calls"]
    if "call" in check:
        name, wanted = check["call"], check.get("args", {})
        return any(n == name and _args_match(a, wanted) for n, a, _ in calls)
    names = [c[0] for c in calls]
    (kind, arg), = ((k, v) for k, v in check.items())
    if kind == "only":
        return all(n in arg for n in names)
    if kind == "no_call":
        return arg not in names
    if kind == "no_calls":
        return not names
    if kind == "order":
        firsts = [names.index(n) if n in names else None for n in arg]
        return None not in firsts and firsts == sorted(firsts)
    if kind == "calls_at_most":
        return len(names) <= arg
    if kind == "calls_at_least":
        return all(names.count(n) >= k for n, k in arg.items())
    if kind == "succeeded":
        return any(n == arg and not (isinstance(r, dict) and "error" in r) for n, _, r in calls)
    if kind == "answer":
        return any(t.lower() in transcript["answer"].lower() for t in arg)
    raise ValueError(f"unknown check {kind!r}")


def score(scenario: dict, transcript: dict) -> int:
    if transcript["ended"] != "done":
        return 0
    if all(holds(c, transcript) for c in scenario["full"]):
        return 2
    if all(holds(c, transcript) for c in scenario["partial"]):
        return 1
    return 0
