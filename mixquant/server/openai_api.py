"""OpenAI-compatible endpoints: chat completions, responses, completions, models."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from mixquant.server.generation import APIError, Turn, content_text


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests ------------------------------------------------------------------------------------
class TextPart(_Open):
    type: Literal["text", "input_text", "output_text"]
    text: str


class FunctionCall(_Open):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    name: str | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedChoice(_Open):
    type: Literal["function"] = "function"
    function: FunctionCall | dict


class StreamOptions(_Open):
    include_usage: bool = False


class Sampling(_Open):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None


class ChatCompletionRequest(Sampling):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedChoice, None] = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1, le=1)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Union[str, list[str]]
    max_tokens: int | None = 16
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1, le=1)
    echo: bool = False


class ResponseInputItem(_Open):
    type: str | None = None  # message (default), function_call, function_call_output, reasoning
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: Union[str, list[TextPart], None] = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: Union[str, list[TextPart], None] = None


class ResponseTool(_Open):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ResponseNamedChoice(_Open):
    type: Literal["function"]
    name: str


class Reasoning(_Open):
    effort: str | None = None


class ResponsesRequest(Sampling):
    model: str | None = None
    input: Union[str, list[ResponseInputItem]]
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], ResponseNamedChoice, None] = None
    stream: bool = False
    max_output_tokens: int | None = None
    reasoning: Reasoning | None = None


# -- conversion to a Turn ------------------------------------------------------------------------
def _arguments(raw: str, where: str) -> dict:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        raise APIError(400, f"{where}: arguments are not valid JSON", where) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{where}: arguments must be a JSON object", where)
    return value


def _thinking(kwargs: dict | None, effort: str | None) -> bool | None:
    if kwargs and "enable_thinking" in kwargs:
        return bool(kwargs["enable_thinking"])
    if effort is not None:
        return effort not in ("none", "minimal")
    return None


def _choice(choice) -> tuple[str, str | None]:
    if choice is None or isinstance(choice, str):
        return choice or "auto", None
    name = choice.function.name if isinstance(choice.function, FunctionCall) else choice.function.get("name")
    if not name:
        raise APIError(400, "tool_choice: a named choice needs function.name", "tool_choice")
    return "function", name


def _sampling(req: Sampling) -> dict:
    return dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty)


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def chat_turn(req: ChatCompletionRequest, default_max: int) -> Turn:
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        out: dict = {"role": role, "content": content_text(m.content)}
        if m.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name,
                "arguments": _arguments(c.function.arguments, f"messages[{i}].tool_calls[{j}].function")}}
                for j, c in enumerate(m.tool_calls)]
        if m.reasoning_content:
            out["reasoning_content"] = m.reasoning_content
        if m.role == "tool" and m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
        messages.append(out)
    choice, name = _choice(req.tool_choice)
    tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} for t in req.tools or []]
    max_tokens = next((m for m in (req.max_completion_tokens, req.max_tokens) if m is not None), default_max)
    return Turn(messages=messages, max_tokens=max_tokens,
                tools=tools or None, tool_choice=choice, tool_name=name,
                enable_thinking=_thinking(req.chat_template_kwargs, req.reasoning_effort), stop=_stops(req.stop),
                **_sampling(req))


def responses_turn(req: ResponsesRequest, default_max: int) -> Turn:
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [ResponseInputItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        kind = item.type or "message"
        if kind == "message":
            if item.role is None:
                raise APIError(400, f"input[{i}]: a message needs a role", f"input[{i}].role")
            messages.append({"role": "system" if item.role == "developer" else item.role,
                             "content": content_text(item.content)})
        elif kind == "function_call":
            if not item.name:
                raise APIError(400, f"input[{i}]: a function_call needs a name", f"input[{i}].name")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": _arguments(item.arguments, f"input[{i}]")}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "content": content_text(item.output), "tool_call_id": item.call_id})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"input[{i}]: unsupported item type {kind!r}", f"input[{i}].type")
    if not messages:
        raise APIError(400, "input is empty", "input")
    if isinstance(req.tool_choice, ResponseNamedChoice):
        choice, name = "function", req.tool_choice.name
    else:
        choice, name = req.tool_choice or "auto", None
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                               "parameters": t.parameters}} for t in req.tools or []]
    effort = req.reasoning.effort if req.reasoning else None
    max_tokens = default_max if req.max_output_tokens is None else req.max_output_tokens
    return Turn(messages=messages, max_tokens=max_tokens, tools=tools or None,
                tool_choice=choice, tool_name=name, enable_thinking=_thinking(None, effort), **_sampling(req))


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def chat_completion(cid: str, model_id: str, result, usage) -> dict:
    message: dict = {"role": "assistant", "content": result.text or (None if result.tool_calls else "")}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    if result.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in result.tool_calls]
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": usage_dict(usage)}


def chat_chunk(cid: str, model_id: str, delta: dict, finish_reason=None, usage=None) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage_dict(usage)
    return chunk


def responses_usage(usage, reasoning_tokens: int = 0) -> dict:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def response_object(rid: str, model_id: str, created: int, output: list, status: str, usage=None,
                    max_output_tokens=None) -> dict:
    return {"id": rid, "object": "response", "created_at": created, "model": model_id, "status": status,
            "output": output, "usage": responses_usage(usage) if usage is not None else None,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": None, "max_output_tokens": max_output_tokens, "parallel_tool_calls": True,
            "temperature": None, "top_p": None, "tool_choice": "auto", "tools": [], "metadata": {},
            "text": {"format": {"type": "text"}}, "truncation": "disabled"}


def message_item(text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": new_id("msg_"), "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def call_item(call, status: str = "completed") -> dict:
    return {"type": "function_call", "id": new_id("fc_"), "call_id": call.id, "name": call.name,
            "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": status}


def reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": new_id("rs_"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}
