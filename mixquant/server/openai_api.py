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


MAX_N = 16  # choices per prompt (n, best_of): each is a stream in the batch
MAX_CHOICES = 64  # choices per request over all its prompts
MAX_TOP_LOGPROBS = 20  # the spec's bound
REFUSED = {  # fields of the spec this server does not honour: a 400 names them when given
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "functions": "use tools (functions is the deprecated form)",
    "function_call": "use tool_choice (function_call is the deprecated form)",
    "verbosity": "verbosity is not supported",
}


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
    strict: bool | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(_Open):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedChoice(_Open):
    type: Literal["function"] = "function"
    function: FunctionCall | dict


class StreamOptions(_Open):
    include_usage: bool = False


class JSONSchemaFormat(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Sampling(_Open):
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted; it changes nothing here


class NoEffect(_Open):
    """Fields both OpenAI request kinds accept that change nothing on this server."""

    store: bool | None = None  # nothing is stored either way
    metadata: dict[str, str] | None = None
    service_tier: str | None = None  # there is one tier
    prompt_cache_key: str | None = None  # the prefix cache matches prompts by their tokens
    safety_identifier: str | None = None


class ChatCompletionRequest(Sampling, NoEffect):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedChoice, None] = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None


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
    strict: bool | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ResponseNamedChoice(_Open):
    type: Literal["function"]
    name: str


class Reasoning(_Open):
    effort: str | None = None


class ResponsesRequest(Sampling, NoEffect):
    model: str | None = None
    input: Union[str, list[ResponseInputItem]]
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Union[Literal["auto", "none", "required"], ResponseNamedChoice, None] = None
    stream: bool | None = False
    max_output_tokens: int | None = None
    reasoning: Reasoning | None = None
    parallel_tool_calls: bool | None = None
    include: list[str] | None = None  # accepted: reasoning text is always in the output
    truncation: Literal["disabled"] | None = None  # "auto" would drop input; a prompt over the limit is a 400


RESPONSES_REFUSED = {
    "previous_response_id": "this server keeps no responses: send the whole input",
    "conversation": "this server keeps no conversations: send the whole input",
    "background": "background responses are not supported", "prompt": "stored prompts are not supported",
    "text": "text formats are not supported here (chat completions' response_format is)",
    "top_logprobs": "logprobs are not supported here (chat completions' are)",
    "max_tool_calls": "max_tool_calls is not supported",
}


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
    """The sampling fields of a request; top_p 0 keeps only the most likely token: greedy."""
    greedy = req.top_p == 0
    return dict(temperature=0.0 if greedy else req.temperature, top_p=None if greedy else req.top_p,
                top_k=req.top_k, min_p=req.min_p, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty, seed=req.seed,
                logit_bias=req.logit_bias)


def _response_format(fmt: ResponseFormat | None) -> dict:
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"structured": True}
    if fmt.json_schema is None:
        raise APIError(400, "response_format: json_schema needs its json_schema object", "response_format")
    return {"structured": True, "schema": fmt.json_schema.schema_ or {}}


def _top_logprobs(logprobs: bool | None, top: int | None) -> int | None:
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
    return (top or 0) if logprobs else None


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
                top_logprobs=_top_logprobs(req.logprobs, req.top_logprobs), **_response_format(req.response_format),
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
                                               "parameters": t.parameters, "strict": bool(t.strict)}}
             for t in req.tools or []]
    effort = req.reasoning.effort if req.reasoning else None
    max_tokens = default_max if req.max_output_tokens is None else req.max_output_tokens
    return Turn(messages=messages, max_tokens=max_tokens, tools=tools or None,
                tool_choice=choice, tool_name=name, enable_thinking=_thinking(None, effort), **_sampling(req))


def completion_prompts(prompt, rows: int) -> list[list[int] | str]:
    """A completions prompt as a list of prompts, each text or token ids (checked to be this model's)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    for i, p in enumerate(prompt):
        if not p:
            raise APIError(400, f"prompt[{i}] is empty", "prompt")
        if not isinstance(p, str):
            bad = next((t for t in p if not 0 <= t < rows), None)
            if bad is not None:
                raise APIError(400, f"prompt[{i}]: {bad} is not a token id of this model (0..{rows - 1})", "prompt")
    return list(prompt)


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """A seed per choice: the request's for the first, distinct ones derived from it for the rest."""
    if seed is None:
        return [None] * n
    return [(seed + i * 0x9E3779B97F4A7C15) % (1 << 64) for i in range(n)]


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def usage_dict(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def total_usage(usages: list):
    """One request's usage over its choices: the prompt counted once, every choice's tokens."""
    from mixquant.server.generation import Usage

    return Usage(prompt_tokens=usages[0].prompt_tokens, cached_tokens=usages[0].cached_tokens,
                 completion_tokens=sum(u.completion_tokens for u in usages))


def _token(table, token: int, logprob: float) -> dict:
    raw = table.token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(table, steps) -> dict | None:
    """The spec's choice logprobs for these Steps (None when none were asked for)."""
    if steps is None:
        return None
    return {"content": [{**_token(table, s.token, s.logprob), "top_logprobs": [_token(table, t, lp) for t, lp in s.top]}
                        for s in steps], "refusal": None}


def completion_logprobs(table, steps, echoed: list[int] | None = None, offset: int = 0) -> dict:
    """The completions form: tokens, their logprobs, top alternatives and text offsets; `echoed`
    prompt tokens first (their Steps are in `steps`, the first token's logprob is null)."""
    tokens, logprobs, tops, offsets = [], [], [], []
    entries = ([(echoed[0], None)] if echoed else []) + [(s.token, s) for s in steps]
    for token, s in entries:
        text = table.token_bytes(token).decode("utf-8", errors="replace")
        tokens.append(text)
        logprobs.append(None if s is None else s.logprob)
        tops.append(None if s is None else {table.token_bytes(t).decode("utf-8", errors="replace"): lp
                                            for t, lp in s.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_message(result) -> dict:
    message: dict = {"role": "assistant", "content": result.text or (None if result.tool_calls else ""),
                     "refusal": None}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    if result.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in result.tool_calls]
    return message


def chat_completion(cid: str, model_id: str, choices: list[tuple], usage) -> dict:
    """choices: (result, logprobs dict or None) per choice."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": i, "message": chat_message(result), "finish_reason": result.finish_reason,
                         "logprobs": logprobs} for i, (result, logprobs) in enumerate(choices)],
            "usage": usage_dict(usage)}


def chat_chunk(cid: str, model_id: str, delta: dict, finish_reason=None, usage=None, index: int = 0,
               logprobs=None) -> dict:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
             "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]}
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
