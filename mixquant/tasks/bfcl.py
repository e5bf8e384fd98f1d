"""The Berkeley Function Calling Leaderboard's single-turn categories, read from the data files of
the `bfcl-eval` wheel, graded by a match of our own against its possible answers.

simple, multiple and parallel: the reply must call exactly the expected functions (parallel: all of
them, in any order), each with every required parameter, no parameter the function does not
declare, and every value among that parameter's possible answers; a parameter whose possible
answers include "" may be left out. irrelevance: none of the functions fits the question, and the
reply passes when it calls none. Values compare after normalisation: numbers by value (an integer
where a float is expected counts), strings case-insensitively with spaces and the punctuation
,./-_*^ removed (as BFCL's own checker does), lists element by element, objects key by key.

Function names are sent with "." replaced by "_" (the OpenAI API's name rule) and mapped back.
"""

from __future__ import annotations

import re

from mixquant.tasks.packages import BFCL_EVAL, json_lines, read

CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel",
              "irrelevance": "irrelevance"}
_TYPES = {"dict": "object", "float": "number", "tuple": "array", "integer": "integer", "string": "string",
          "boolean": "boolean", "array": "array", "number": "number", "object": "object"}
_STRIP = re.compile(r"[ ,./\-_*^]")


def load(category: str) -> list[dict]:
    """The category's items: {"id", "category", "messages", "tools" (OpenAI form), "names" (sent
    name -> BFCL name), "answer" (list of {name: {param: [possible values]}}, empty for
    irrelevance)}."""
    stem = CATEGORIES[category]
    questions = json_lines(read(BFCL_EVAL, f"bfcl_eval/data/BFCL_v4_{stem}.json"), f"{BFCL_EVAL} {stem}")
    answers = {}
    if category != "irrelevance":
        rows = json_lines(read(BFCL_EVAL, f"bfcl_eval/data/possible_answer/BFCL_v4_{stem}.json"),
                          f"{BFCL_EVAL} possible_answer/{stem}")
        answers = {r["id"]: r["ground_truth"] for r in rows}
    items = []
    for q in questions:
        tools = [tool(f) for f in q["function"]]
        items.append({"id": q["id"], "category": category, "messages": q["question"][0], "tools": tools,
                      "names": {t["function"]["name"]: f["name"] for t, f in zip(tools, q["function"])},
                      "functions": q["function"], "answer": answers.get(q["id"], [])})
    return items


def sent_name(name: str) -> str:
    return name.replace(".", "_")


def _schema(p):
    if isinstance(p, dict):
        out = {k: _schema(v) for k, v in p.items()}
        if isinstance(p.get("type"), str):
            t = _TYPES.get(p["type"])
            if t is None:
                del out["type"]  # "any"
            else:
                out["type"] = t
        return out
    if isinstance(p, list):
        return [_schema(v) for v in p]
    return p


def tool(function: dict) -> dict:
    """A BFCL function as an OpenAI tool (JSON Schema types)."""
    return {"type": "function", "function": {"name": sent_name(function["name"]),
                                             "description": function.get("description", ""),
                                             "parameters": _schema(function.get("parameters", {}))}}


def _norm_str(s: str) -> str:
    return _STRIP.sub("", s).lower()


def value_matches(value, option) -> bool:
    """`value` (from the model) equals one possible answer `option`."""
    if isinstance(option, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(option, bool) and value == option
    if isinstance(option, (int, float)):
        return isinstance(value, (int, float)) and float(value) == float(option)
    if isinstance(option, str):
        return isinstance(value, str) and _norm_str(value) == _norm_str(option)
    if isinstance(option, list):
        return (isinstance(value, (list, tuple)) and len(value) == len(option)
                and all(value_matches(v, o) for v, o in zip(value, option)))
    if isinstance(option, dict):  # nested: each key's possible answers
        if not isinstance(value, dict):
            return False
        for key, options in option.items():
            if key not in value:
                if "" not in options:
                    return False
            elif not any(value_matches(value[key], o) for o in options):
                return False
        return all(k in option for k in value)
    return value == option


def call_matches(call: tuple[str, dict], expected: dict, functions: dict[str, dict]) -> bool:
    """call (BFCL name, arguments) against one expected {name: {param: [possible values]}}."""
    (name, params), = expected.items()
    got_name, args = call
    if got_name != name or not isinstance(args, dict):
        return False
    declared = functions.get(name, {}).get("parameters", {}).get("properties", {})
    required = functions.get(name, {}).get("parameters", {}).get("required", [])
    if any(k not in declared for k in args) or any(k not in args for k in required):
        return False
    for key, options in params.items():
        if key not in args:
            if "" not in options:
                return False
        elif not any(value_matches(args[key], o) for o in options if o != "" or isinstance(args[key], str)):
            return False
    return True


def _assign(calls, expected, functions, used=()) -> bool:
    """Each expected call matched by a different call (backtracking; parallel items have a few)."""
    if not expected:
        return True
    for i, call in enumerate(calls):
        if i not in used and call_matches(call, expected[0], functions):
            if _assign(calls, expected[1:], functions, (*used, i)):
                return True
    return False


def grade(item: dict, calls: list[tuple[str, dict]], malformed: bool = False) -> float:
    """1.0 or 0.0 for the reply's tool calls [(sent name, arguments)]; `malformed`: the reply also
    holds tool-call markup that could not be read (an attempted call: irrelevance fails)."""
    names = item["names"]
    mapped = [(names.get(n, n), a) for n, a in calls]
    if item["category"] == "irrelevance":
        return float(not mapped and not malformed)
    expected = item["answer"]
    if len(mapped) != len(expected):
        return 0.0
    functions = {f["name"]: f for f in item["functions"]}
    return float(_assign(mapped, expected, functions))

