"""Anthropic-compatible endpoints: messages (and their stream events), count_tokens."""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from mixquant.server.generation import APIError, Turn, content_text


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]
    data: str = ""


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: bool | None = None


Block = Union[TextBlock, ThinkingBlock, RedactedThinkingBlock, ToolUseBlock, ToolResultBlock]


class Message(_Open):
    role: Literal["user", "assistant"]
    content: Union[str, list[Block]]


class Tool(_Open):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class Thinking(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


REFUSED = {  # fields of the API this server does not honour: a 400 names them when given
    "container": "containers are not supported", "mcp_servers": "MCP servers are not supported",
    "context_management": "context management is not supported",
}


class CountTokensRequest(_Open):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    system: Union[str, list[TextBlock], None] = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stream: bool | None = False
    metadata: dict[str, Any] | None = None  # accepted; it changes nothing here
    service_tier: str | None = None  # accepted; there is one tier
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None


def turn(req: CountTokensRequest, max_tokens: int = 1) -> Turn:
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": content_text(req.system)})
    for m in req.messages:
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "user":
            text = []
            for b in blocks:
                if isinstance(b, ToolResultBlock):
                    messages.append({"role": "tool", "content": content_text(b.content), "tool_call_id": b.tool_use_id})
                elif isinstance(b, TextBlock):
                    text.append(b.text)
            if text:
                messages.append({"role": "user", "content": "".join(text)})
        else:
            out: dict = {"role": "assistant", "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
            thinking = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
            if thinking:
                out["reasoning_content"] = thinking
            calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}}
                     for b in blocks if isinstance(b, ToolUseBlock)]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
    choice, name = "auto", None
    if req.tool_choice is not None:
        choice = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[req.tool_choice.type]
        name = req.tool_choice.name
        if choice == "function" and not name:
            raise APIError(400, "tool_choice: type tool needs a name", "tool_choice")
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.input_schema}} for t in req.tools or []]
    thinking = req.thinking is not None and req.thinking.type != "disabled"
    sampling = {}
    if isinstance(req, MessagesRequest):
        sampling = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                        stop=list(req.stop_sequences or []))
    return Turn(messages=messages, max_tokens=max_tokens, tools=tools or None, tool_choice=choice, tool_name=name,
                enable_thinking=thinking, **sampling)


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(result, stop_hit: str | None) -> str:
    return "stop_sequence" if stop_hit else STOP_REASONS[result.finish_reason]


def usage_dict(usage) -> dict:
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def tool_use_block(call) -> dict:
    return {"type": "tool_use", "id": call.id.replace("call_", "toolu_", 1), "name": call.name,
            "input": call.arguments}


def message_object(mid: str, model_id: str, content: list, reason: str | None, stop_seq: str | None, usage) -> dict:
    return {"id": mid, "type": "message", "role": "assistant", "model": model_id, "content": content,
            "stop_reason": reason, "stop_sequence": stop_seq, "usage": usage_dict(usage)}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
