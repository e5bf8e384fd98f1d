"""What both HTTP APIs reduce a request to (a Turn), and running one on the engine as a stream of
chat events with its token counts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mixquant.runtime.chat import Decoder
from mixquant.runtime.toolcalls import forced_call_prefix
from mixquant.server.engine import END, job_of


class APIError(Exception):
    """A client error: HTTP status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def check_fields(req, refused: dict[str, str]) -> None:
    """Every field of a request (a pydantic model that keeps extra fields) is one this server
    honours or accepts as having no effect here: one in `refused` (name -> why) that is given, or one
    no schema names, is a 400 naming it."""
    for name, value in (req.model_extra or {}).items():
        if name not in refused:
            raise APIError(400, f"{name}: unknown field", name)
        if value is not None:
            raise APIError(400, f"{name}: {refused[name]}", name)


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
    seed: int | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; else alternatives per token (0-20)
    logit_bias: dict[int, float] | None = None
    structured: bool = False  # the reply is JSON: following `schema`, or (None) any JSON object
    schema: dict | None = None


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
    grammar: str | None = None  # the llguidance grammar the reply follows


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


def check_logit_bias(model, bias: dict | None) -> dict[int, float] | None:
    """logit_bias as {token id: bias}: keys that are token ids of this model, values in -100..100."""
    if not bias:
        return None
    rows = model.vocab_rows
    out = {}
    for key, value in bias.items():
        if not str(key).isdigit() or int(key) >= rows:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0..{rows - 1})", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias: the bias of {key} must be within -100..100, got {value}", "logit_bias")
        out[int(key)] = float(value)
    return out


def compile_grammar(model, turn: Turn, tools: list[dict] | None) -> str | None:
    """The grammar the reply follows, if any: a JSON schema's (response_format), or a forced tool
    call's when the tools it may call are all `strict`; None for free text. What the engine cannot
    compile is a 400 naming the construct."""
    from mixquant.errors import MixquantError
    from mixquant.runtime.grammar import json_grammar, tool_call_grammar
    from mixquant.runtime.toolcalls import CLOSE, FUNCTION_OPEN

    candidates = [t for t in tools or [] if turn.tool_choice == "required" or
                  (turn.tool_choice == "function" and t["function"]["name"] == turn.tool_name)]
    strict = bool(candidates) and all(t["function"].get("strict") for t in candidates)
    try:
        if turn.structured:
            return json_grammar(turn.schema)
        if strict:
            return tool_call_grammar(candidates, FUNCTION_OPEN in model.template, turn.tool_choice == "function",
                                     model.token_table.lark_text(CLOSE))
    except MixquantError as e:
        param = "response_format" if turn.structured else "tools"
        raise APIError(400, f"{param}: {e}", param) from None
    return None


def prepare(model, turn: Turn, limits: Limits) -> Prepared:
    check_prompt_bound(model, turn, limits)
    turn.logit_bias = check_logit_bias(model, turn.logit_bias)
    if turn.max_tokens < 0:
        raise APIError(400, f"max_tokens must be at least 0, got {turn.max_tokens}", "max_tokens")
    if turn.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens {turn.max_tokens} is over this server's limit of {limits.max_tokens}",
                       "max_tokens")
    names = [t["function"]["name"] for t in turn.tools or []]
    if turn.tool_choice in ("required", "function") and not names:
        raise APIError(400, "tool_choice requires a tool call but no tools were given", "tool_choice")
    if turn.tool_choice == "function" and turn.tool_name not in names:
        raise APIError(400, f"tool_choice names {turn.tool_name!r}, which is not among the tools", "tool_choice")
    tools = None if turn.tool_choice == "none" else turn.tools or None
    if turn.structured and tools:
        raise APIError(400, "response_format: a JSON reply cannot also call tools (set tool_choice to none)",
                       "response_format")
    grammar = compile_grammar(model, turn, tools)
    forcing = turn.tool_choice in ("required", "function")
    thinking = False if forcing or turn.structured else turn.enable_thinking
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
    return Prepared(prompt_text, prompt, boundary, tools, forced, grammar)


def check_engine_supports(engine, turn: Turn, prepared: Prepared | None = None) -> None:
    """The sequential (MTP) engine decodes tokens without their log-probabilities or logits processors
    beyond the penalties: a request that needs them is a 400 there."""
    if not engine.mtp:
        return
    strict_call = prepared is not None and prepared.grammar is not None and not turn.structured
    for name, given in (("logprobs", turn.top_logprobs is not None), ("logit_bias", bool(turn.logit_bias)),
                        ("response_format", turn.structured), ("tools", strict_call)):
        if given:
            raise APIError(400, f"{name}: not available on a server started with --mtp", name)


def job_spec(turn: Turn, prepared: Prepared, seed=None) -> dict:
    """What a Job is built from, as plain JSON values (so that under --shard rank 0 can hand the
    same request to every rank)."""
    return {"prompt": list(prepared.prompt), "boundary": prepared.boundary, "max_tokens": turn.max_tokens,
            "sampling": [turn.temperature, turn.top_p, turn.top_k, turn.min_p],
            "penalties": [turn.repetition_penalty, turn.presence_penalty, turn.frequency_penalty],
            "logit_bias": sorted((turn.logit_bias or {}).items()), "grammar": prepared.grammar,
            "seed": turn.seed if seed is None else seed, "top_logprobs": turn.top_logprobs}


async def run(engine, turn: Turn, prepared: Prepared, usage: Usage, steps: list | None = None, seed=None):
    """Chat events (mixquant.runtime.chat.Event) as the engine decodes; `usage` is filled in as it
    goes, and `steps` (when given) gets the reply's tokens as mixquant.server.engine.Steps (an
    end-of-sequence token left out). `seed` replaces the turn's (one per choice). Leaving the
    iteration early (a client gone) cancels the job."""
    model = engine.model
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    job = job_of(model, job_spec(turn, prepared, seed),
                 deliver=lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    decoder = Decoder(model, prepared.prompt_text, prepared.tools, turn.stop, forced=prepared.forced)
    usage.prompt_tokens = len(prepared.prompt)
    if turn.max_tokens > 0:
        engine.submit(job)
    done = turn.max_tokens == 0
    try:
        while not done:
            item = await items.get()
            if item is END:
                break
            if isinstance(item, Exception):
                raise item
            usage.cached_tokens = max(job.cached_tokens, 0)
            if steps is not None and item.token not in model.eos_ids:
                steps.append(item)
            for event in decoder.feed(item.token):
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
