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
looks like a number). Nothing here raises on model output: a malformed or truncated call stays in
the text and the result is flagged.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


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
        if isinstance(fn, dict) and "name" in fn:
            out[fn["name"]] = (fn.get("parameters") or {}).get("properties") or {}
    return out


def _typed(raw: str, schema: dict | None):
    """A parameter value from the XML form, typed by its schema where that is possible."""
    text = raw.strip("\n")
    kind = (schema or {}).get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return text
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
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


def _parse_one(body: str, schemas: dict[str, dict]) -> ToolCall | None:
    body = body.strip()
    m = FUNCTION.search(body)
    if m:
        name = m.group(1).strip()
        props = schemas.get(name, {})
        args = {p.group(1).strip(): _typed(p.group(2), props.get(p.group(1).strip()))
                for p in PARAMETER.finditer(m.group(2))}
        leftover = PARAMETER.sub("", m.group(2)).strip()
        return ToolCall(name, args) if name and not leftover else None
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args)
        except (json.JSONDecodeError, ValueError):
            return None
    return ToolCall(data["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str, tools=None) -> ParsedToolCalls:
    """Split model output into its text and its tool calls (Qwen3.5 XML or Qwen3 JSON form)."""
    schemas = _schemas(tools)
    calls: list[ToolCall] = []
    kept: list[str] = []
    malformed = False
    pos = 0
    for m in TOOL_CALL.finditer(text):
        kept.append(text[pos : m.start()])
        call = _parse_one(m.group(1), schemas)
        if call is None:
            malformed = True
            kept.append(m.group(0))
        else:
            calls.append(call)
        pos = m.end()
    rest = text[pos:]
    if "<tool_call>" in rest:  # opened and never closed: truncated output
        malformed = True
    kept.append(rest)
    content = "".join(kept)
    if calls:
        content = content.strip()
    return ParsedToolCalls(content, calls, malformed)
