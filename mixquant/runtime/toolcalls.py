"""Tool calls in model output: Qwen3.5's XML form and Qwen3's JSON form, inside <tool_call> tags.

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Lisbon
    </parameter>
    </function>
    </tool_call>

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lisbon"}}
    </tool_call>

Values of the XML form are parsed as JSON when they are JSON and kept as strings otherwise, then
typed by the tool's JSON schema where it says (a "string" parameter stays a string even if it
looks like a number). Nothing here raises on model output, and the work is linear in its length:
tags are found with forward scans only. A malformed, nested, stray or truncated call stays in the
text and the result is flagged.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


class ParsedToolCalls(tuple):
    """(content, calls), with `.malformed` set when some tool-call markup could not be read."""

    malformed: bool

    def __new__(cls, content: str, calls: list[ToolCall], malformed: bool):
        obj = super().__new__(cls, (content, calls))
        obj.malformed = malformed
        return obj

    @property
    def content(self) -> str:
        return self[0]

    @property
    def calls(self) -> list[ToolCall]:
        return self[1]


def _schemas(tools) -> dict[str, dict]:
    out = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


def _json(text: str):
    """json.loads that reports failure (bad JSON, or nesting deeper than the parser's recursion limit)
    as None-or-text instead of raising."""
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        return False, None


def _typed(raw: str, schema):
    """A parameter value from the XML form, typed by its schema where that is possible."""
    text = raw.strip("\n")
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return text
    ok, value = _json(text)
    if not ok:
        value = text
    if kind == "integer" and isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return value
    if kind == "number" and isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    if kind == "boolean" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _tag_name(text: str, start: int, prefix: str) -> tuple[str, int] | None:
    """The name in `<prefix NAME>` at `start` and the index after its '>'; None if it is not one line."""
    end = text.find(">", start + len(prefix))
    if end < 0:
        return None
    name = text[start + len(prefix) : end]
    if "\n" in name or not name.strip():
        return None
    return name.strip(), end + 1


def _parse_xml(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    head = _tag_name(body, 0, FUNCTION_OPEN)
    close = body.rfind(FUNCTION_CLOSE)
    if head is None or close < head[1] or body[close + len(FUNCTION_CLOSE) :].strip():
        return None
    name, pos = head
    props = schemas.get(name, {})
    args = {}
    while True:
        p = body.find(PARAMETER_OPEN, pos, close)
        if p < 0:
            break
        if body[pos:p].strip():
            return None  # text between parameters
        param = _tag_name(body, p, PARAMETER_OPEN)
        if param is None:
            return None
        pname, value_start = param
        end = body.find(PARAMETER_CLOSE, value_start, close)
        if end < 0:
            return None
        args[pname] = _typed(body[value_start:end], props.get(pname))
        pos = end + len(PARAMETER_CLOSE)
    return ToolCall(name, args) if not body[pos:close].strip() else None


def _parse_json(body: str) -> ToolCall | None:
    ok, data = _json(body)
    if not ok or not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        ok, args = _json(args)
        if not ok:
            return None
    return ToolCall(data["name"], args) if isinstance(args, dict) else None


def _parse_one(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    body = body.strip()
    return _parse_xml(body, schemas) if body.startswith(FUNCTION_OPEN) else _parse_json(body)


def _tags(text: str) -> list[tuple[int, str]]:
    """Positions of every <tool_call> and </tool_call>, in order (the two tags cannot overlap)."""
    out = []
    for tag in (OPEN, CLOSE):
        at = text.find(tag)
        while at >= 0:
            out.append((at, tag))
            at = text.find(tag, at + len(tag))
    out.sort()
    return out


def parse_tool_calls(text: str, tools=None) -> ParsedToolCalls:
    """Split model output into its text and its tool calls (Qwen3.5 XML or Qwen3 JSON form).

    A call is an opening tag followed by a closing tag with no other opening tag between; any
    other tag (a second opening tag before the close, a close without an opening, an opening
    never closed) stays in the text and sets `malformed`."""
    schemas = _schemas(tools)
    calls: list[ToolCall] = []
    kept: list[str] = []
    malformed = False
    pos = 0  # text before `pos` is decided
    open_at = None
    for at, tag in _tags(text):
        if tag == OPEN:
            malformed |= open_at is not None  # the earlier opening tag is never closed
            open_at = at
            continue
        if open_at is None:
            malformed = True  # a closing tag with nothing open
            continue
        call = _parse_one(text[open_at + len(OPEN) : at], schemas)
        if call is None:
            malformed = True
        else:
            kept.append(text[pos:open_at])
            pos = at + len(CLOSE)
            calls.append(call)
        open_at = None
    malformed |= open_at is not None  # opened and never closed: truncated output
    kept.append(text[pos:])
    content = "".join(kept)
    if calls:
        content = content.strip()
    return ParsedToolCalls(content, calls, malformed)


def forced_call_prefix(template: str, name: str | None = None) -> str:
    """What to append to a prompt so the reply must be a tool call (of `name`, when given), in the
    form the chat template writes calls: Qwen3.5's XML, else Qwen3's JSON."""
    if FUNCTION_OPEN in template:
        return f"{OPEN}\n" + (f"{FUNCTION_OPEN}{name}>\n" if name else "")
    return f"{OPEN}\n" + (f'{{"name": {json.dumps(name)}, "arguments": ' if name else "")
