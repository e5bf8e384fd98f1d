"""`mixquant serve`: the OpenAI- and Anthropic-compatible HTTP server (FastAPI on uvicorn).

Every endpoint but /health needs the API key when one is set (`Authorization: Bearer KEY` or
`x-api-key: KEY`). Errors are JSON in the style of the API the path belongs to; a malformed body is
a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mixquant.server import anthropic_api as anth
from mixquant.server import openai_api as oai
from mixquant.server.generation import (APIError, Limits, Prepared, Turn, Usage, check_engine_supports,
                                        check_fields, check_logit_bias, check_prompt_length, prepare, run)

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY = 8 << 20


@dataclass
class ServerConfig:
    model_id: str
    api_key: str | None = None
    limits: Limits = None
    max_body_bytes: int = DEFAULT_MAX_BODY

    def __post_init__(self):
        self.limits = self.limits or Limits()


def _anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    if _anthropic_path(path):
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(status, kind)
        return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


class BodyLimit:
    """Refuses request bodies over `limit` bytes (413), by Content-Length or, for a chunked body, once
    what arrived passes the limit: the body is read whole before the app sees the request. With
    `max_messages`, a JSON body whose `messages` list is longer (every message costs a prompt token)
    is refused with a 400 after a parse off the event loop, before it is validated on it."""

    def __init__(self, app, limit: int, max_messages: int | None = None):
        self.app, self.limit, self.max_messages = app, limit, max_messages

    async def _too_many_messages(self, scope, body: bytes):
        if self.max_messages is None or scope.get("method") != "POST" or len(body) < 2 * self.max_messages:
            return None

        def count():
            try:
                data = json.loads(body)
            except (ValueError, RecursionError):
                return 0
            messages = data.get("messages") if isinstance(data, dict) else None
            return len(messages) if isinstance(messages, list) else 0

        try:
            check_prompt_length(await asyncio.to_thread(count), self.max_messages, "messages", at_least=True)
        except APIError as e:
            return error_response(scope["path"], e.status, e.message, e.kind, e.param)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(scope["path"], 413, f"request body over {self.limit} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False
        refused = await self._too_many_messages(scope, body)
        if refused is not None:
            return await refused(scope, receive, send)

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def merged(streams: list):
    """The items of several async generators as they come (one: as is); leaving early closes them all."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(finished)
        except Exception as e:  # noqa: BLE001 - raised again in the consumer
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is finished:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


def create_app(engine, config: ServerConfig) -> FastAPI:
    model = engine.model

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="mixquant", version="1", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(request.url.path, e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(request.url.path, 400, "the body is not valid JSON")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(request.url.path, 400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                              param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = "the body is not valid JSON" if e.status_code == 400 else str(e.detail)
        response = error_response(request.url.path, e.status_code, message,
                                  "not_found_error" if e.status_code == 404 else "invalid_request_error")
        response.headers.update(e.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("request failed")
        return error_response(request.url.path, 500, "internal error", "server_error")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if config.api_key and request.url.path not in ("/health",):
            given = request.headers.get("x-api-key")
            bearer = request.headers.get("authorization", "")
            if given is None and bearer.lower().startswith("bearer "):
                given = bearer[7:].strip()
            if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
                return error_response(request.url.path, 401, "invalid or missing API key", "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_id, "active_requests": len(engine.active)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": 0,
                                            "owned_by": "mixquant"}]}

    async def collect(request: Request, turn, prepared, usage, steps=None, seed=None):
        """The events of a non-streamed reply; a client that leaves stops it."""
        events = []

        async def consume():
            async for event in run(engine, turn, prepared, usage, steps, seed):
                events.append(event)

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        await task
        return events

    async def choices(request: Request, turn, prepared, n: int):
        """n replies to one prompt, decoded together: (result, Steps or None, Usage) each."""
        seeds = oai.choice_seeds(turn.seed, n)
        usages = [Usage() for _ in range(n)]
        steps = [[] if turn.top_logprobs is not None else None for _ in range(n)]
        done = await asyncio.gather(*(collect(request, turn, prepared, usages[i], steps[i], seeds[i])
                                      for i in range(n)))
        return [(events[-1].result, steps[i], usages[i]) for i, events in enumerate(done)]

    def sse_stream(gen):
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def data(chunk) -> str:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    # -- OpenAI: chat completions ---------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: oai.ChatCompletionRequest, request: Request):
        check_fields(body, oai.REFUSED)
        turn = oai.chat_turn(body, min(config.limits.max_tokens, 4096))
        check_engine_supports(engine, turn)
        prepared = await asyncio.to_thread(prepare, model, turn, config.limits)
        check_engine_supports(engine, turn, prepared)
        table = await asyncio.to_thread(lambda: model.token_table) if turn.top_logprobs is not None else None
        n, cid = body.n or 1, oai.new_id("chatcmpl-")
        if not body.stream:
            done = await choices(request, turn, prepared, n)
            return oai.chat_completion(cid, config.model_id,
                                       [(result, oai.chat_logprobs(table, steps)) for result, steps, _ in done],
                                       oai.total_usage([u for _, _, u in done]))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usages = [Usage() for _ in range(n)]

        async def one(index: int, seed):
            steps = [] if table is not None else None
            sent = 0

            def chunk(delta, finish=None):
                nonlocal sent
                logprobs = None
                if steps is not None and (len(steps) > sent or finish is None):
                    logprobs, sent = oai.chat_logprobs(table, steps[sent:]), len(steps)
                return data(oai.chat_chunk(cid, config.model_id, delta, finish, index=index, logprobs=logprobs))

            yield data(oai.chat_chunk(cid, config.model_id, {"role": "assistant", "content": ""}, index=index))
            calls = 0
            async for event in run(engine, turn, prepared, usages[index], steps, seed):
                if event.type == "text" and event.text:
                    yield chunk({"content": event.text})
                elif event.type == "thinking" and event.text:
                    yield chunk({"reasoning_content": event.text})
                elif event.type == "tool_call":
                    call = event.tool_call.to_openai()
                    yield chunk({"tool_calls": [{"index": calls, **call}]})
                    calls += 1
                elif event.type == "done":
                    yield chunk({}, event.result.finish_reason)

        async def stream():
            async for line in merged([one(i, seed) for i, seed in enumerate(oai.choice_seeds(turn.seed, n))]):
                yield line
            if include_usage:
                yield data(oai.chat_chunk(cid, config.model_id, {}, usage=oai.total_usage(usages)))
            yield "data: [DONE]\n\n"

        return sse_stream(stream())

    # -- OpenAI: completions --------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest, request: Request):
        check_fields(body, oai.REFUSED)
        limits = config.limits
        prompts = oai.completion_prompts(body.prompt, model.vocab_rows)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        scoring = max_tokens == 0
        if scoring and not (body.echo and body.logprobs is not None):
            raise APIError(400, "max_tokens 0 scores the prompt: it needs echo and logprobs", "max_tokens")
        if max_tokens > limits.max_tokens:
            raise APIError(400, f"max_tokens must be 0..{limits.max_tokens}, got {max_tokens}", "max_tokens")
        if body.suffix:
            raise APIError(400, "suffix: not supported (no fill-in-the-middle prompt for this model)", "suffix")
        n = body.n or 1
        best_of = body.best_of or n
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", "best_of")
        if body.stream and best_of > n:
            raise APIError(400, "best_of: cannot be streamed", "best_of")
        if len(prompts) * best_of > oai.MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x {best_of} choices: over this server's limit of "
                           f"{oai.MAX_CHOICES} per request", "prompt")
        turn = Turn(messages=[], max_tokens=max_tokens, stop=oai._stops(body.stop),
                    top_logprobs=body.logprobs if body.logprobs is not None else (0 if best_of > n else None),
                    **oai._sampling(body))
        turn.logit_bias = check_logit_bias(model, turn.logit_bias)
        check_engine_supports(engine, turn)
        table = await asyncio.to_thread(lambda: model.token_table) if turn.top_logprobs is not None else None

        def tokenized(prompt):
            if isinstance(prompt, str):
                check_prompt_length(len(prompt) // model.max_token_chars, limits.max_prompt_tokens, "prompt",
                                    at_least=True)
                ids = model.encode(prompt)
                text = prompt
            else:
                ids, text = list(prompt), model.tokenizer.decode(list(prompt))
            check_prompt_length(len(ids), limits.max_prompt_tokens, "prompt")
            if not ids:
                raise APIError(400, "prompt is empty", "prompt")
            return Prepared(text, ids, None, None, "")

        prepared = [await asyncio.to_thread(tokenized, p) for p in prompts]
        echoed = body.echo and body.logprobs is not None  # best_of alone needs no prompt logprobs
        echo_steps = [await score(p.prompt, turn.top_logprobs) if echoed else None for p in prepared]
        cid, created = oai.new_id("cmpl-"), int(time.time())

        def choice(index, text, finish, logprobs=None):
            return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

        def obj(choice_list, usage=None):
            out = {"id": cid, "object": "text_completion", "created": created, "model": config.model_id,
                   "choices": choice_list}
            if usage is not None:
                out["usage"] = oai.usage_dict(usage)
            return out

        def logprobs_of(p, k, steps):
            if body.logprobs is None:
                return None
            if body.echo:
                echoed = oai.completion_logprobs(table, echo_steps[k], p.prompt)
                tail = oai.completion_logprobs(table, steps, offset=len(p.prompt_text))
                return {key: echoed[key] + tail[key] for key in echoed}
            return oai.completion_logprobs(table, steps)

        if not body.stream:
            out, cached, generated = [], 0, 0
            for k, p in enumerate(prepared):
                done = await choices(request, turn, p, best_of)
                cached += done[0][2].cached_tokens
                generated += sum(u.completion_tokens for _, _, u in done)
                if best_of > n:  # the n with the highest log-probability per token
                    done = sorted(done, key=lambda d: -sum(s.logprob for s in d[1]) / max(len(d[1]), 1))[:n]
                for j, (result, steps, _) in enumerate(done):
                    text = (p.prompt_text if body.echo else "") + result.text
                    out.append(choice(k * n + j, text, result.finish_reason,
                                      logprobs_of(p, k, steps if steps is not None else [])))
            usage = Usage(prompt_tokens=sum(len(p.prompt) for p in prepared), cached_tokens=cached,
                          completion_tokens=generated)
            return obj(out, usage)

        usages = [[Usage() for _ in range(n)] for _ in prepared]

        async def one(k, j, seed):
            p, index = prepared[k], k * n + j
            steps = [] if table is not None else None
            sent = 0

            def part(text, finish=None):
                nonlocal sent
                logprobs = None
                if steps is not None:
                    logprobs = oai.completion_logprobs(table, steps[sent:])
                    sent = len(steps)
                return data(obj([choice(index, text, finish, logprobs)]))

            if body.echo:
                yield data(obj([choice(index, p.prompt_text, None, logprobs_of(p, k, []))]))
            async for event in run(engine, turn, p, usages[k][j], steps, seed):
                if event.type == "text" and event.text:
                    yield part(event.text)
                elif event.type == "done":
                    yield part("", event.result.finish_reason)

        async def stream():
            streams = [one(k, j, seed) for k in range(len(prepared))
                       for j, seed in enumerate(oai.choice_seeds(turn.seed, n))]
            async for line in merged(streams):
                yield line
            if body.stream_options and body.stream_options.include_usage:
                flat = [u for row in usages for u in row]
                yield data(obj([], Usage(prompt_tokens=sum(len(p.prompt) for p in prepared),
                                         cached_tokens=sum(u.cached_tokens for u in flat),
                                         completion_tokens=sum(u.completion_tokens for u in flat))))
            yield "data: [DONE]\n\n"

        return sse_stream(stream())

    async def score(tokens: list[int], top: int):
        """The Steps of tokens[1:] under the model (the engine runs it between decoding steps)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        engine.score(tokens, top, lambda result: loop.call_soon_threadsafe(future.set_result, result))
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    # -- OpenAI: responses ----------------------------------------------------------------------
    @app.post("/v1/responses")
    async def responses(body: oai.ResponsesRequest, request: Request):
        check_fields(body, oai.RESPONSES_REFUSED)
        turn = oai.responses_turn(body, min(config.limits.max_tokens, 4096))
        prepared = await asyncio.to_thread(prepare, model, turn, config.limits)
        check_engine_supports(engine, turn, prepared)
        usage, rid, created = Usage(), oai.new_id("resp_"), int(time.time())

        def final_output(result):
            output = [oai.reasoning_item(result.thinking)] if result.thinking else []
            if result.text or not result.tool_calls:
                output.append(oai.message_item(result.text))
            output += [oai.call_item(c) for c in result.tool_calls]
            return output

        def status(result):
            return "incomplete" if result.finish_reason == "length" else "completed"

        if not body.stream:
            events = await collect(request, turn, prepared, usage)
            result = events[-1].result
            return oai.response_object(rid, config.model_id, created, final_output(result), status(result), usage,
                                       body.max_output_tokens)

        async def stream():
            seq = 0
            output: list[dict] = []
            open_item: dict | None = None
            text_parts: list[str] = []

            def ev(kind, **fields):
                nonlocal seq
                seq += 1
                return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq, **fields})}\n\n"

            def close_item():
                nonlocal open_item
                item, open_item = open_item, None
                if item is None:
                    return []
                index = len(output)
                text = "".join(text_parts)
                text_parts.clear()
                out = []
                if item["type"] == "message":
                    item["content"] = [{"type": "output_text", "text": text, "annotations": []}]
                    out.append(ev("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text))
                    out.append(ev("response.content_part.done", item_id=item["id"], output_index=index,
                                  content_index=0, part=item["content"][0]))
                else:
                    item["content"] = [{"type": "reasoning_text", "text": text}]
                    out.append(ev("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text))
                item["status"] = "completed"
                out.append(ev("response.output_item.done", output_index=index, item=item))
                output.append(item)
                return out

            def open_(kind):
                nonlocal open_item
                index = len(output)
                if kind == "message":
                    open_item = {**oai.message_item("", "in_progress"), "content": []}
                    yield ev("response.output_item.added", output_index=index, item=open_item)
                    yield ev("response.content_part.added", item_id=open_item["id"], output_index=index,
                             content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                else:
                    open_item = {**oai.reasoning_item(""), "content": [], "status": "in_progress"}
                    yield ev("response.output_item.added", output_index=index, item=open_item)

            yield ev("response.created", response=oai.response_object(rid, config.model_id, created, [],
                                                                      "in_progress"))
            yield ev("response.in_progress", response=oai.response_object(rid, config.model_id, created, [],
                                                                          "in_progress"))
            result = None
            async for event in run(engine, turn, prepared, usage):
                if event.type in ("text", "thinking") and event.text:
                    kind = "message" if event.type == "text" else "reasoning"
                    if open_item is None or open_item["type"] != kind:
                        for line in close_item():
                            yield line
                        for line in open_(kind):
                            yield line
                    text_parts.append(event.text)
                    delta_kind = "response.output_text.delta" if kind == "message" else \
                        "response.reasoning_text.delta"
                    yield ev(delta_kind, item_id=open_item["id"], output_index=len(output), content_index=0,
                             delta=event.text)
                elif event.type == "tool_call":
                    for line in close_item():
                        yield line
                    item = oai.call_item(event.tool_call, "in_progress")
                    index = len(output)
                    yield ev("response.output_item.added", output_index=index, item={**item, "arguments": ""})
                    yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                             delta=item["arguments"])
                    yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             arguments=item["arguments"])
                    item["status"] = "completed"
                    yield ev("response.output_item.done", output_index=index, item=item)
                    output.append(item)
                elif event.type == "done":
                    result = event.result
            for line in close_item():
                yield line
            if not output:
                for line in open_("message"):
                    yield line
                for line in close_item():
                    yield line
            final = oai.response_object(rid, config.model_id, created, output, status(result), usage,
                                        body.max_output_tokens)
            yield ev("response.completed" if final["status"] == "completed" else "response.incomplete",
                     response=final)

        return sse_stream(stream())

    # -- Anthropic: messages --------------------------------------------------------------------
    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: anth.CountTokensRequest):
        check_fields(body, anth.REFUSED)
        prepared = await asyncio.to_thread(prepare, model, anth.turn(body), config.limits)
        return {"input_tokens": len(prepared.prompt)}

    @app.post("/v1/messages")
    async def messages(body: anth.MessagesRequest, request: Request):
        check_fields(body, anth.REFUSED)
        turn = anth.turn(body, body.max_tokens)
        prepared = await asyncio.to_thread(prepare, model, turn, config.limits)
        check_engine_supports(engine, turn, prepared)
        usage, mid = Usage(), anth.new_id("msg_")
        if not body.stream:
            events = await collect(request, turn, prepared, usage)
            result = events[-1].result
            content = []
            if result.thinking:
                content.append({"type": "thinking", "thinking": result.thinking, "signature": ""})
            if result.text or not result.tool_calls:
                content.append({"type": "text", "text": result.text})
            content += [anth.tool_use_block(c) for c in result.tool_calls]
            stop = result.stop_string
            return anth.message_object(mid, config.model_id, content, anth.stop_reason(result, stop), stop, usage)

        async def stream():
            start = anth.message_object(mid, config.model_id, [], None, None, usage)
            start["usage"]["input_tokens"] = len(prepared.prompt)
            yield anth.sse("message_start", {"type": "message_start", "message": start})
            index, open_kind = -1, None

            def stop_block():
                extra = []
                if open_kind == "thinking":
                    extra.append(anth.sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                  "delta": {"type": "signature_delta",
                                                                            "signature": ""}}))
                return extra + [anth.sse("content_block_stop", {"type": "content_block_stop", "index": index})]

            result = None
            async for event in run(engine, turn, prepared, usage):
                if event.type in ("text", "thinking") and event.text:
                    if open_kind != event.type:
                        if open_kind is not None:
                            for line in stop_block():
                                yield line
                        index, open_kind = index + 1, event.type
                        block = {"type": "text", "text": ""} if event.type == "text" else \
                            {"type": "thinking", "thinking": "", "signature": ""}
                        yield anth.sse("content_block_start", {"type": "content_block_start", "index": index,
                                                               "content_block": block})
                    delta = {"type": "text_delta", "text": event.text} if event.type == "text" else \
                        {"type": "thinking_delta", "thinking": event.text}
                    yield anth.sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                           "delta": delta})
                elif event.type == "tool_call":
                    if open_kind is not None:
                        for line in stop_block():
                            yield line
                    index, open_kind = index + 1, None
                    block = anth.tool_use_block(event.tool_call)
                    yield anth.sse("content_block_start", {"type": "content_block_start", "index": index,
                                                           "content_block": {**block, "input": {}}})
                    yield anth.sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}})
                    yield anth.sse("content_block_stop", {"type": "content_block_stop", "index": index})
                elif event.type == "done":
                    result = event.result
            if open_kind is not None:
                for line in stop_block():
                    yield line
            stop = result.stop_string
            yield anth.sse("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": anth.stop_reason(result, stop), "stop_sequence": stop},
                "usage": {"output_tokens": usage.completion_tokens}})
            yield anth.sse("message_stop", {"type": "message_stop"})

        return sse_stream(stream())

    return app


def listen(host: str, port: int):
    """The listening socket, bound before anything else runs: a port in use or an unknown host is
    a one-line error, not uvicorn's exit 3 after the model has loaded."""
    import socket

    from mixquant.errors import MixquantError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise MixquantError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MixquantError(f"{host}:{port}: cannot listen there ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(model_path, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_concurrency: int = 16, max_prompt_tokens: int = 32768, max_tokens: int = 4096, mtp: int = 0,
          native: bool = False, max_connections: int | None = None, kv=None, shard=None) -> int:
    """shard: a mixquant.distributed.Shard; rank 0 listens and answers, the others decode with it."""
    import uvicorn

    from mixquant.distributed import is_main
    from mixquant.loading import load_for_running, say_compute_path
    from mixquant.runtime.chat import Model
    from mixquant.server.engine import Engine
    from mixquant.server.transport import GuardedH11Protocol, connection_cap

    group = shard.group if shard is not None else None
    sock = listen(host, port) if is_main(group) else None
    loaded = load_for_running(model_path, native=native, mtp=bool(mtp), shard=shard)
    model = Model(loaded, kv)
    say_compute_path(loaded)
    engine = Engine(model, max_concurrency=max_concurrency, mtp=mtp, group=group)
    if not is_main(group):
        engine.follow()
        return 0
    config = ServerConfig(model_id=str(model_path).rstrip("/").split("/")[-1], api_key=api_key,
                          limits=Limits(max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens))
    app = BodyLimit(create_app(engine, config), config.max_body_bytes, max_prompt_tokens)
    GuardedH11Protocol.cap = connection_cap(max_connections)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.to_thread(engine.close)  # streams in flight end with their finish chunk
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, http=GuardedH11Protocol, log_level="warning", timeout_graceful_shutdown=5,
                                   lifespan="on"))
    server.run(sockets=[sock])
    return 0
