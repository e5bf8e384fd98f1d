"""What both HTTP APIs reduce a request to (a Turn), and running one on the engine as a stream of
chat events with its token counts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mixquant.runtime.chat import Decoder
from mixquant.runtime.toolcalls import forced_call_prefix
from mixquant.server.engine import END, Job


class APIError(Exception):
    """A client error: HTTP status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def content_text(content) -> str:
    """A message's content as text: a string, or the concatenated text of its text parts / blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


@dataclass
class Turn:
    messages: list[dict]  # in the chat template's form (OpenAI-style, tool-call arguments as dicts)
    max_tokens: int
    tools: list[dict] | None = None  # OpenAI-style function schemas
    tool_choice: str = "auto"  # auto | none | required | function (then tool_name)
    tool_name: str | None = None
    enable_thinking: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Limits:
    max_prompt_tokens: int = 32768
    max_tokens: int = 4096


@dataclass
class Prepared:
    """A turn rendered and tokenized, ready to run."""

    prompt_text: str
    prompt: list[int]
    boundary: int | None
    tools: list[dict] | None
    forced: str


def _chars(value) -> int:
    """Characters of text in a message's fields (strings within lists and objects included)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def check_prompt_length(tokens: int, limit: int, param: str, at_least: bool = False) -> None:
    """A prompt of `tokens` tokens (`at_least`: a lower bound) over `limit` is a 400 naming `param`."""
    if tokens > limit:
        raise APIError(400, f"the prompt has {'at least ' if at_least else ''}{tokens} tokens, over this server's "
                       f"limit of {limit}", param)


def check_prompt_bound(model, turn: Turn, limits: Limits) -> None:
    """Refuse a prompt that cannot fit before rendering it: every message takes at least one token,
    and no token covers more than the model's longest token's characters."""
    bound = max(len(turn.messages), _chars(turn.messages) // model.max_token_chars)
    check_prompt_length(bound, limits.max_prompt_tokens, "messages", at_least=True)


def prepare(model, turn: Turn, limits: Limits) -> Prepared:
    check_prompt_bound(model, turn, limits)
    if turn.max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {turn.max_tokens}", "max_tokens")
    if turn.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {turn.max_tokens} is over this server's limit of {limits.max_tokens}",
                       "max_tokens")
    names = [t["function"]["name"] for t in turn.tools or []]
    if turn.tool_choice in ("required", "function") and not names:
        raise APIError(400, "tool_choice requires a tool call but no tools were given", "tool_choice")
    if turn.tool_choice == "function" and turn.tool_name not in names:
        raise APIError(400, f"tool_choice names {turn.tool_name!r}, which is not among the tools", "tool_choice")
    tools = None if turn.tool_choice == "none" else turn.tools or None
    forcing = turn.tool_choice in ("required", "function")
    thinking = False if forcing else turn.enable_thinking
    try:
        prompt_text, prompt, boundary = model.rendered(turn.messages, tools, thinking)
    except Exception as e:  # noqa: BLE001 - the template refused these messages
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    forced = forced_call_prefix(model.template, turn.tool_name if turn.tool_choice == "function" else None) \
        if forcing else ""
    if forced:
        prompt_text += forced
        prompt = prompt + model.encode(forced)
    check_prompt_length(len(prompt), limits.max_prompt_tokens, "messages")
    return Prepared(prompt_text, prompt, boundary, tools, forced)


async def run(engine, turn: Turn, prepared: Prepared, usage: Usage):
    """Chat events (mixquant.runtime.chat.Event) as the engine decodes; `usage` is filled in as it
    goes. Leaving the iteration early (a client gone) cancels the job."""
    model = engine.model
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    job = Job(prepared.prompt, prepared.boundary, turn.max_tokens,
              model.sampling(turn.temperature, turn.top_p, turn.top_k, turn.min_p),
              model.processors(turn.repetition_penalty, turn.presence_penalty, turn.frequency_penalty),
              deliver=lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    decoder = Decoder(model, prepared.prompt_text, prepared.tools, turn.stop, forced=prepared.forced)
    usage.prompt_tokens = len(prepared.prompt)
    engine.submit(job)
    done = False
    try:
        while True:
            item = await items.get()
            if item is END:
                break
            if isinstance(item, Exception):
                raise item
            usage.cached_tokens = max(job.cached_tokens, 0)
            for event in decoder.feed(item):
                yield event
            usage.completion_tokens = decoder.num_tokens
            if decoder.finished:
                break
        done = True
    finally:
        if not done or decoder.finished:
            engine.cancel(job)
    usage.completion_tokens = decoder.num_tokens
    for event in decoder.close():
        yield event
