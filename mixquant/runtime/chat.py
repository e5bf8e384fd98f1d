"""Chat on mlx-lm's model classes: sampling defaults from generation_config.json, thinking and
tool calls split out of the text, streaming, and a session that keeps the prompt cache (KV for
attention, recurrent state for Gated DeltaNet) between turns.

The decode loop is our own so that the cache holds exactly the tokens we say it holds: after a
turn it holds the prompt and every generated token but the last one. A later turn whose rendered
conversation extends the cached tokens prefills only the new ones; one that extends the previous
prompt (the template re-renders the assistant's reply its own way) restores the snapshot taken at
the end of that prompt; anything else (an edited history) starts from an empty cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.runtime.template import load_template, render
from mixquant.runtime.toolcalls import ToolCall, parse_tool_calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PREFILL_STEP = 512


@dataclass
class ChatResult:
    text: str
    thinking: str
    tool_calls: list[ToolCall]
    num_tokens: int
    finish_reason: str  # stop | length | tool_calls
    timings: dict = field(default_factory=dict)
    malformed_tool_calls: bool = False


@dataclass
class Event:
    type: str  # text | thinking | tool_call | done
    text: str = ""
    tool_call: ToolCall | None = None
    result: ChatResult | None = None


def create_tool_definition(name: str, description: str, properties: dict, required: list[str] | None = None) -> dict:
    """An OpenAI-style tool schema."""
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(required or [])}}}


def _snapshot(cache) -> list:
    """Copies of the cache contents: KV up to its offset, the recurrent-state arrays as they are now
    (mlx-lm writes KV buffers in place, so they are sliced into new arrays)."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache

    snap = []
    for c in cache:
        if isinstance(c, KVCache):
            kv = (None, None) if c.keys is None else (mx.contiguous(c.keys[..., : c.offset, :]),
                                                       mx.contiguous(c.values[..., : c.offset, :]))
            snap.append(("kv", kv, c.offset))
        elif isinstance(c, ArraysCache):
            snap.append(("arrays", list(c.cache), None))
        else:
            raise MixquantError(f"chat: cannot keep a {type(c).__name__} between turns")
    mx.eval([a for kind, v, _ in snap for a in (v if kind == "kv" else v) if a is not None])
    return snap


def _restore(model, snapshot) -> list:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for c, (kind, value, offset) in zip(cache, snapshot):
        if kind == "kv":
            c.keys, c.values = value
            c.offset = offset
        else:
            c.cache = list(value)
    return cache


class Model:
    def __init__(self, path: Path, model, tokenizer):
        self.path = Path(path)
        self.model = model
        self.tokenizer = tokenizer
        self.template, self.specials = load_template(self.path)
        gen = self.path / "generation_config.json"
        self.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
        eos = self.generation_config.get("eos_token_id", tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.eos_ids.add(tokenizer.eos_token_id)

    # -- prompt -------------------------------------------------------------------------------------
    def prompt(self, messages, tools=None, enable_thinking=None) -> str:
        return render(self.template, messages, tools=tools, add_generation_prompt=True, specials=self.specials,
                      enable_thinking=enable_thinking)

    def render_history(self, messages, tools=None, enable_thinking=None) -> str:
        return render(self.template, messages, tools=tools, add_generation_prompt=False, specials=self.specials,
                      enable_thinking=enable_thinking)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # -- generation ---------------------------------------------------------------------------------
    def _sampler(self, temperature, top_p, top_k, min_p):
        from mlx_lm.sample_utils import make_sampler

        g = self.generation_config
        temp = g.get("temperature", 0.0) if temperature is None else temperature
        if not g.get("do_sample", True) and temperature is None:
            temp = 0.0
        return make_sampler(temp=temp, top_p=g.get("top_p", 0.0) if top_p is None else top_p,
                            top_k=g.get("top_k", 0) if top_k is None else top_k,
                            min_p=g.get("min_p", 0.0) if min_p is None else min_p)

    def _processors(self, repetition_penalty, presence_penalty):
        from mlx_lm.sample_utils import make_logits_processors

        g = self.generation_config
        return make_logits_processors(
            repetition_penalty=g.get("repetition_penalty") if repetition_penalty is None else repetition_penalty,
            presence_penalty=presence_penalty)

    def forward(self, tokens: list[int], cache):
        """Feed tokens into the cache; logits of the last position (float32)."""
        import mlx.core as mx

        logits = None
        for i in range(0, len(tokens), PREFILL_STEP):
            logits = self.model(mx.array([tokens[i : i + PREFILL_STEP]]), cache=cache)
            mx.eval([c.state for c in cache])
        return logits[0, -1].astype(mx.float32)

    def chat(self, messages, **kwargs) -> ChatResult:
        result = None
        for event in self.chat_stream(messages, **kwargs):
            if event.type == "done":
                result = event.result
        return result

    async def achat_stream(self, messages, **kwargs):
        """chat_stream as an async generator (decoding runs between awaits)."""
        import asyncio

        for event in self.chat_stream(messages, **kwargs):
            yield event
            await asyncio.sleep(0)

    def chat_stream(self, messages, *, max_new_tokens: int = 2048, temperature=None, top_p=None, top_k=None,
                    min_p=None, repetition_penalty=None, presence_penalty=None, enable_thinking=None, tools=None,
                    stop=None, seed=None, session: "ChatSession | None" = None):
        """Events as tokens decode; stopping the iteration stops generation."""
        import mlx.core as mx

        if seed is not None:
            mx.random.seed(seed)
        prompt_text = self.prompt(messages, tools, enable_thinking)
        prompt = self.encode(prompt_text)
        history = self.encode(self.render_history(messages, tools, enable_thinking))
        boundary = len(history) if prompt[: len(history)] == history else None
        session = session or ChatSession(self)
        t0 = time.perf_counter()
        logits = session.prefill(prompt, boundary)
        t1 = time.perf_counter()
        sampler = self._sampler(temperature, top_p, top_k, min_p)
        processors = self._processors(repetition_penalty, presence_penalty)
        splitter = _StreamSplitter(thinking=prompt_text.rstrip().endswith(THINK_OPEN), tools=tools)
        detok = self.tokenizer.detokenizer
        detok.reset()
        generated: list[int] = []
        finish = "length"
        stops = list(stop or [])
        text_so_far = ""  # for stop strings
        for _ in range(max_new_tokens):
            lg = logits[None]
            context = mx.array(prompt + generated)
            for proc in processors:
                lg = proc(context, lg)
            token = int(sampler(lg).item())
            generated.append(token)
            if token in self.eos_ids:
                finish = "stop"
                break
            detok.add_token(token)
            delta = detok.last_segment
            text_so_far += delta
            yield from splitter.feed(delta)
            if stops and any(s in text_so_far for s in stops):
                finish = "stop"
                break
            logits = session.step(token)
        detok.finalize()
        yield from splitter.feed(detok.last_segment)
        yield from splitter.close()
        t2 = time.perf_counter()
        content, calls = splitter.text, splitter.calls
        if stops:
            for s in stops:
                if s in content:
                    content = content[: content.index(s)]
        n = len(generated)
        result = ChatResult(
            text=content,
            thinking=splitter.thinking_text.strip("\n"),
            tool_calls=calls, num_tokens=n, finish_reason="tool_calls" if calls else finish,
            timings={"prefill_tokens": session.last_prefill, "prefill_tok_s": session.last_prefill / max(t1 - t0, 1e-9),
                     "decode_tok_s": (n - 1) / max(t2 - t1, 1e-9) if n > 1 else 0.0},
            malformed_tool_calls=splitter.malformed,
        )
        yield Event("done", result=result)


class ChatSession:
    """Keeps one conversation's prompt cache between turns.

    Besides the live cache (the prompt and all generated tokens but the last), it keeps a snapshot
    at the end of the conversation before the generation prompt: Qwen3.5's template re-renders
    earlier assistant turns (their thinking dropped), so the next turn's prompt extends that point
    even when it does not extend the live cache.
    """

    def __init__(self, model: Model):
        self.model = model
        self.cache = None
        self.tokens: list[int] = []  # exactly the tokens in self.cache
        self.snapshot: tuple[list[int], list] | None = None
        self.last_prefill = 0

    def reset(self) -> None:
        self.cache, self.tokens, self.snapshot = None, [], None

    def prefill(self, prompt: list[int], boundary: int | None = None):
        """Bring the cache to `prompt`, feeding only what no kept state covers; logits of its last token.
        `boundary`: where the conversation ends and the generation prompt begins (snapshot point)."""
        from mlx_lm.models.cache import make_prompt_cache

        def extends(tokens):
            return tokens is not None and len(tokens) < len(prompt) and prompt[: len(tokens)] == tokens

        live = self.tokens if self.cache is not None else None
        snap_tokens = self.snapshot[0] if self.snapshot else None
        if extends(live) and (not extends(snap_tokens) or len(live) >= len(snap_tokens)):
            start = len(live)
        elif extends(snap_tokens):
            self.cache = _restore(self.model.model, self.snapshot[1])
            start = len(snap_tokens)
        else:
            self.cache = make_prompt_cache(self.model.model)
            start = 0
        m = self.model
        if boundary is not None and start < boundary < len(prompt):
            m.forward(prompt[start:boundary], self.cache)
            self.snapshot = (list(prompt[:boundary]), _snapshot(self.cache))
            logits = m.forward(prompt[boundary:], self.cache)
        else:
            logits = m.forward(prompt[start:], self.cache)
        self.last_prefill = len(prompt) - start
        self.tokens = list(prompt)
        return logits

    def step(self, token: int):
        logits = self.model.forward([token], self.cache)
        self.tokens.append(token)
        return logits

    def chat(self, messages, **kwargs) -> ChatResult:
        return self.model.chat(messages, session=self, **kwargs)

    def chat_stream(self, messages, **kwargs):
        return self.model.chat_stream(messages, session=self, **kwargs)


class _StreamSplitter:
    """Routes text deltas to thinking / text / tool-call events, holding back what may be the start
    of a marker until it is sure."""

    def __init__(self, thinking: bool, tools):
        self.in_thinking = thinking
        self.tools = tools
        self.pending = ""
        self.thinking_text = ""
        self.text = ""
        self.calls: list[ToolCall] = []
        self.malformed = False
        self.strip_newlines = False  # the template puts blank lines after </think>: not part of the answer
        self.in_call = False

    def _markers(self):
        return [THINK_CLOSE] if self.in_thinking else (["</tool_call>"] if self.in_call else ["<tool_call>", THINK_OPEN])

    def feed(self, delta: str):
        self.pending += delta
        while self.pending:
            hit = min(((self.pending.find(mk), mk) for mk in self._markers() if mk in self.pending), default=None)
            if hit is None:
                keep = max((len(mk) - 1 for mk in self._markers()), default=0)
                safe = len(self.pending)
                for k in range(min(keep, len(self.pending)), 0, -1):
                    if any(mk.startswith(self.pending[-k:]) for mk in self._markers()):
                        safe = len(self.pending) - k
                        break
                out, self.pending = self.pending[:safe], self.pending[safe:]
                yield from self._emit(out)
                return
            at, mk = hit
            yield from self._emit(self.pending[:at])
            self.pending = self.pending[at + len(mk):]
            if mk == THINK_CLOSE:
                self.in_thinking, self.strip_newlines = False, True
            elif mk == THINK_OPEN:
                self.in_thinking = True
            elif mk == "<tool_call>":
                self.in_call, self.call_buf = True, ""
            else:  # </tool_call>
                self.in_call = False
                content, calls = parse_tool_calls(f"<tool_call>{self.call_buf}</tool_call>", self.tools)
                if calls:
                    self.calls += calls
                    for c in calls:
                        yield Event("tool_call", tool_call=c)
                else:
                    self.malformed = True
                    self.text += content
                    yield Event("text", content)

    def _emit(self, out: str):
        if not out:
            return
        if self.in_thinking:
            self.thinking_text += out
            yield Event("thinking", out)
        elif self.in_call:
            self.call_buf += out
        else:
            if self.strip_newlines:
                out = out.lstrip("\n")
                if not out:
                    return
                self.strip_newlines = False
            self.text += out
            yield Event("text", out)

    def close(self):
        rest, self.pending = self.pending, ""
        if self.in_call:  # truncated call: back to text, flagged
            self.malformed = True
            rest = "<tool_call>" + self.call_buf + rest
            self.in_call = False
        yield from self._emit(rest)


def load(path) -> Model:
    """Our quants, plain mlx-lm quants, or unquantized folders (an HF checkpoint is converted to a
    temporary bf16 MLX folder first; the weights stay in memory)."""
    from mlx_lm import load as mlx_load

    from mixquant.eval.models import mlx_folder

    path = Path(path)
    with mlx_folder(path, "bfloat16") as folder:
        model, tokenizer = mlx_load(str(folder))
        return Model(folder, model, tokenizer)
