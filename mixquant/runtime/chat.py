"""Chat on mlx-lm's model classes and generation engine: sampling defaults from
generation_config.json, thinking and tool calls split out of the text, stop strings, streaming, and
a session that keeps the prompt cache (KV for attention, recurrent state for Gated DeltaNet)
between turns.

Tokens are decoded by mlx-lm's `generate_step` on the session's cache; what we add around it is
per token and constant-time. A token `generate_step` yields has already been fed to the cache, so
after a turn the cache holds the prompt and every generated token. A later turn whose rendered
conversation extends the cached tokens prefills only the new ones; one that extends the previous
conversation (the template re-renders the assistant's reply its own way) restores the snapshot
taken at the end of that conversation; anything else (an edited history) starts from an empty cache.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.runtime.mtp import DEFAULT_DEPTH, check_depth
from mixquant.runtime.sampling import GREEDY, Sampling, check_sampling
from mixquant.runtime.template import render
from mixquant.runtime.toolcalls import ToolCall, parse_tool_calls
from mixquant.vocab import check_tokenizer, embedding_rows

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
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
    stop_string: str | None = None  # the stop string that ended the reply, if one did


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


def snapshot_cache(cache) -> list:
    """Copies of the cache contents: KV up to its offset (quantized KV as its packed values, scales
    and biases), the recurrent-state arrays as they are now (mlx-lm writes KV buffers in place, so
    they are sliced into new arrays)."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

    from mixquant.runtime.kvcache import MixedKVCache

    snap = []
    for c in cache:
        if isinstance(c, MixedKVCache):
            snap.append(("mixed", c.contents(), (c.offset, c.spec, c.start, c.quantized)))
        elif isinstance(c, QuantizedKVCache):
            parts = tuple(tuple(mx.contiguous(x[..., : c.offset, :]) for x in kv) for kv in (c.keys, c.values))
            snap.append(("qkv", parts, (c.offset, c.group_size, c.bits)))
        elif isinstance(c, KVCache):
            kv = (None, None) if c.keys is None else (mx.contiguous(c.keys[..., : c.offset, :]),
                                                       mx.contiguous(c.values[..., : c.offset, :]))
            snap.append(("kv", kv, c.offset))
        elif isinstance(c, ArraysCache):
            snap.append(("arrays", list(c.cache), None))
        else:
            raise MixquantError(f"chat: cannot keep a {type(c).__name__} between turns")
    mx.eval([a for _, v, _ in snap for a in _arrays(v)])
    return snap


def snapshot_nbytes(snap) -> int:
    return sum(a.nbytes for _, v, _ in snap for a in _arrays(v))


def _arrays(value):
    for a in value:
        if isinstance(a, tuple):
            yield from a
        elif a is not None:
            yield a


def restore_cache(model, snapshot) -> list:
    """A cache holding what `snapshot` holds (KV buffers exactly as long as their content, so the
    next token appends to a new buffer and the snapshot can be restored again)."""
    from mlx_lm.models.cache import QuantizedKVCache

    from mixquant.kernels import recording_cache
    from mixquant.runtime.kvcache import MixedKVCache

    cache = recording_cache(model)
    for i, (kind, value, offset) in enumerate(snapshot):
        c = cache[i]
        if kind == "mixed":
            n, spec, start, quantized = offset
            cache[i] = MixedKVCache.restored(spec, start, quantized, *value, n)
        elif kind == "qkv":
            cache[i] = q = QuantizedKVCache(group_size=offset[1], bits=offset[2])
            q.keys, q.values = (list(kv) for kv in value)
            q.offset = offset[0]
        elif kind == "kv":
            c.keys, c.values = value
            c.offset = offset
        else:
            c.cache = list(value)
    return cache


class Model:
    """A loaded model ready to chat: mlx-lm's model and tokenizer with the model's own template."""

    def __init__(self, loaded, kv=None):
        """kv: a mixquant.runtime.kv.KVQuant to keep the attention layers' cache quantized, or None."""
        self.loaded = loaded
        self.kv = kv
        self.path = Path(loaded.path)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.template, self.specials = loaded.template, loaded.specials
        self.generation_config = loaded.generation_config
        eos = self.generation_config.get("eos_token_id", self.tokenizer.eos_token_id)
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.eos_ids.add(self.tokenizer.eos_token_id)
        self.mtp = loaded.mtp  # the MTP head's parts, when loaded with mtp=True
        self._mtp_choosers: dict = {}  # draft depth -> mixquant.runtime.mtp.Adaptive
        self.vocab_rows = embedding_rows(loaded.config, self.path)  # the token ids the model takes and gives
        check_tokenizer(self.tokenizer, self.vocab_rows, str(self.path))

    # -- prompt -------------------------------------------------------------------------------------
    def _template(self) -> str:
        if not self.template:
            raise MixquantError(f"{self.path}: the model has no chat template")
        return self.template

    def prompt(self, messages, tools=None, enable_thinking=None) -> str:
        return render(self._template(), messages, tools=tools, add_generation_prompt=True, specials=self.specials,
                      enable_thinking=enable_thinking)

    def render_history(self, messages, tools=None, enable_thinking=None) -> str:
        return render(self._template(), messages, tools=tools, add_generation_prompt=False, specials=self.specials,
                      enable_thinking=enable_thinking)

    def rendered(self, messages, tools=None, enable_thinking=None) -> tuple[str, list[int], int | None]:
        """The prompt's text and tokens, and where the conversation before the generation prompt ends
        in them (None when the template renders it differently there)."""
        prompt_text = self.prompt(messages, tools, enable_thinking)
        prompt = self.encode(prompt_text)
        history = self.encode(self.render_history(messages, tools, enable_thinking))
        return prompt_text, prompt, len(history) if prompt[: len(history)] == history else None

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def mtp_chooser(self, depth: int):
        """The MTP depth chooser for drafting up to `depth`, kept for the model's lifetime."""
        from mixquant.runtime.mtp import Adaptive

        return self._mtp_choosers.setdefault(depth, Adaptive({0, 1, depth}))

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token's length in characters: a text of N characters is at least
        N / max_token_chars tokens, which bounds a prompt before it is rendered."""
        return max(1, max((len(t) for t in self.tokenizer.get_vocab()), default=1))

    @functools.cached_property
    def _detokenizer(self):
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

        proto = self.tokenizer.detokenizer
        return _eager_bpe_class()(self.tokenizer) if type(proto) is BPEStreamingDetokenizer else proto

    def detokenizer(self):
        """A streaming detokenizer of its own for one reply (mlx-lm's, releasing a space at once)."""
        detok = copy.copy(self._detokenizer)
        detok.reset()
        return detok

    @functools.cached_property
    def token_table(self):
        """The tokenizer as the grammar engine sees it (mixquant.runtime.grammar), built on first use."""
        from mixquant.runtime.grammar import TokenTable

        return TokenTable(self.tokenizer, self.eos_ids)

    # -- generation ---------------------------------------------------------------------------------
    def sampling(self, temperature=None, top_p=None, top_k=None, min_p=None) -> Sampling:
        """The settings given, the rest from generation_config.json."""
        check_sampling("", temperature, top_p, top_k, min_p)
        g = self.generation_config
        temp = g.get("temperature", 0.0) if temperature is None else temperature
        if not g.get("do_sample", True) and temperature is None:
            temp = 0.0
        return Sampling(temperature=temp, top_p=g.get("top_p", 0.0) if top_p is None else top_p,
                        top_k=g.get("top_k", 0) if top_k is None else top_k,
                        min_p=g.get("min_p", 0.0) if min_p is None else min_p)

    def processors(self, repetition_penalty=None, presence_penalty=None, frequency_penalty=None) -> list:
        from mlx_lm.sample_utils import make_logits_processors

        g = self.generation_config
        return make_logits_processors(
            repetition_penalty=g.get("repetition_penalty") if repetition_penalty is None else repetition_penalty,
            presence_penalty=presence_penalty or None, frequency_penalty=frequency_penalty or None)

    def stream(self, prompt: list[int], session: "ChatSession", *, max_new_tokens: int, sampling: Sampling = GREEDY,
               processors=None, boundary: int | None = None, mtp: int = 0, stats=None, mtp_fixed: bool = False):
        """Token ids as mlx-lm's generate_step decodes them on the session's cache, after prefilling
        what of `prompt` the cache does not hold; with `mtp` (a draft depth), speculatively with the
        MTP head (stats: a mixquant.runtime.mtp.Stats to count drafts in), drafting up to `mtp` tokens a
        round as measured fastest (`mtp_fixed`: always `mtp`). The path every chat,
        stream and benchmark takes."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        if max_new_tokens < 1:
            raise MixquantError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
        if mtp and self.mtp is None:
            raise MixquantError(f"{self.path}: loaded without its MTP head (load it with mtp=True / --mtp)")
        fresh = session.prepare(prompt, boundary)
        history = mx.array(prompt[: len(prompt) - len(fresh)])  # for penalties: they see the whole context
        processors = [_with_history(p, history) for p in processors or []]
        if mtp:
            from mixquant.runtime.mtp import speculative_steps

            yield from speculative_steps(self.mtp, session, fresh, max_new_tokens=max_new_tokens, sampling=sampling,
                                         processors=processors, depth=mtp, stats=stats, prefill_step=PREFILL_STEP,
                                         chooser=None if mtp_fixed else self.mtp_chooser(mtp), kv=self.kv)
            return
        steps = generate_step(mx.array(fresh), self.model, max_tokens=max_new_tokens, sampler=sampling.sampler(),
                              logits_processors=processors or None, prompt_cache=session.cache,
                              prefill_step_size=PREFILL_STEP, **(self.kv.args() if self.kv else {}))
        for token, _ in steps:
            if fresh:  # generate_step has fed the rest of the prompt by its first token
                session.tokens += fresh
                fresh = []
            session.tokens.append(token)
            yield token

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
                    stop=None, seed=None, session: "ChatSession | None" = None, mtp: bool | int = False):
        """Events as tokens decode; stopping the iteration stops generation. The text events join to
        the result's text, stop strings included (they end both where the stop string begins).
        mtp: speculative decoding with the model's MTP head (True: the default depth; or a depth)."""
        import mlx.core as mx

        depth = 0 if mtp is False else DEFAULT_DEPTH if mtp is True else check_depth(mtp)
        if seed is not None:
            mx.random.seed(seed)
        prompt_text, prompt, boundary = self.rendered(messages, tools, enable_thinking)
        session = session or ChatSession(self)
        decoder = Decoder(self, prompt_text, tools, stop)
        t0 = time.perf_counter()
        t1 = None
        tokens = self.stream(prompt, session, max_new_tokens=max_new_tokens,
                             sampling=self.sampling(temperature, top_p, top_k, min_p),
                             processors=self.processors(repetition_penalty, presence_penalty), boundary=boundary,
                             mtp=depth)
        for token in tokens:
            if t1 is None:
                t1 = time.perf_counter()
            yield from decoder.feed(token)
            if decoder.finished:
                break
        tokens.close()
        t2 = time.perf_counter()
        t1 = t1 or t2
        n = decoder.num_tokens
        yield from decoder.close({"prefill_tokens": session.last_prefill,
                                  "prefill_tok_s": session.last_prefill / max(t1 - t0, 1e-9),
                                  "decode_tok_s": (n - 1) / max(t2 - t1, 1e-9) if n > 1 else 0.0})


class Decoder:
    """Generated token ids in, events out: detokenizing, the end-of-sequence tokens, stop strings,
    and the thinking / tool-call split. `finished` once an end-of-sequence token or a stop string
    ends the reply; `close` flushes what is held back and gives the result."""

    def __init__(self, model: Model, prompt_text: str, tools=None, stop=None, forced: str = ""):
        """forced: text the prompt ends with that belongs to the reply (a tool call it must make)."""
        self.model = model
        self.splitter = _StreamSplitter(thinking=prompt_text.rstrip().endswith(THINK_OPEN), tools=tools)
        for _ in self.splitter.feed(forced):  # a tool call's opening: it emits nothing yet
            pass
        self.stops = _StopFilter(stop or [])
        self.detok = model.detokenizer()
        self.num_tokens = 0
        self.finished = False
        self.finish = "length"

    def feed(self, token: int):
        self.num_tokens += 1
        if token in self.model.eos_ids:
            self.finished, self.finish = True, "stop"
            return
        self.detok.add_token(token)
        yield from self.splitter.feed(self.stops.feed(self.detok.last_segment))
        if self.stops.hit:
            self.finished, self.finish = True, "stop"

    def close(self, timings: dict | None = None):
        if not self.stops.hit:
            self.detok.finalize()
            yield from self.splitter.feed(self.stops.feed(self.detok.last_segment))
            yield from self.splitter.feed(self.stops.flush())
        yield from self.splitter.close()
        calls = self.splitter.calls
        yield Event("done", result=ChatResult(
            text=self.splitter.text, thinking=self.splitter.thinking_text.strip("\n"), tool_calls=calls,
            num_tokens=self.num_tokens, finish_reason="tool_calls" if calls else self.finish,
            timings=timings or {}, malformed_tool_calls=self.splitter.malformed, stop_string=self.stops.matched))


@functools.cache
def _eager_bpe_class():
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    class EagerBPEDetokenizer(BPEStreamingDetokenizer):
        """mlx-lm's BPE detokenizer holds a lone space token back until the next token, so that it can
        trim the reply's leading space. Once text has begun there is nothing to trim: the space is
        released with its own token (the same text, each token's share arriving as it is decoded)."""

        def add_token(self, token):
            super().add_token(token)
            if self.text and self._unflushed:
                text = self._decode_bytes(self._unflushed)
                if not text.endswith("\ufffd"):
                    self.text += text
                    self._unflushed = ""

    return EagerBPEDetokenizer


def _with_history(processor, history):
    """A logits processor that also sees the tokens before this call's prompt (kept in the cache)."""
    import mlx.core as mx

    if history.size == 0:
        return processor
    return lambda tokens, logits: processor(mx.concatenate([history, tokens]), logits)


class ChatSession:
    """Keeps one conversation's prompt cache between turns.

    Besides the live cache (the prompt and all generated tokens), it keeps a snapshot at the end of
    the conversation before the generation prompt: Qwen3.5's template re-renders earlier assistant
    turns (their thinking dropped), so the next turn's prompt extends that point even when it does
    not extend the live cache.
    """

    def __init__(self, model: Model):
        self.model = model
        self.cache = None
        self.tokens: list[int] = []  # exactly the tokens in self.cache
        self.snapshot: tuple[list[int], list] | None = None
        self.last_prefill = 0
        self.drafter = None  # the MTP head's state (mixquant.runtime.mtp.Drafter), when the model has one
        if model.mtp is not None:
            from mixquant.runtime.mtp import Drafter

            self.drafter = Drafter(model.mtp)

    def reset(self) -> None:
        self.cache, self.tokens, self.snapshot = None, [], None
        if self.drafter is not None:
            self.drafter.reset()

    def prepare(self, prompt: list[int], boundary: int | None = None) -> list[int]:
        """Bring the cache as close to `prompt` as kept state allows, snapshotting at `boundary` (where
        the conversation ends and the generation prompt begins); the tokens still to feed (never
        none: the last prompt token is always fed by the generator)."""
        from mixquant.kernels import recording_cache

        def extends(tokens):
            return tokens is not None and len(tokens) < len(prompt) and prompt[: len(tokens)] == tokens

        live = self.tokens if self.cache is not None else None
        snap_tokens = self.snapshot[0] if self.snapshot else None
        if extends(live) and (not extends(snap_tokens) or len(live) >= len(snap_tokens)):
            start = len(live)
        elif extends(snap_tokens):
            self.cache = restore_cache(self.model.model, self.snapshot[1])
            start = len(snap_tokens)
        else:
            self.cache = recording_cache(self.model.model)
            if self.model.kv is not None:
                self.model.kv.adopt(self.cache)
            start = 0
        if self.drafter is not None and start != len(live or ()):  # the head's cache follows the live one
            self.drafter.reset()
        self.last_prefill = len(prompt) - start  # what kept state does not cover
        if boundary is not None and start < boundary < len(prompt):
            self.feed(prompt[start:boundary])
            self.snapshot = (list(prompt[:boundary]), snapshot_cache(self.cache))
            start = boundary
        self.tokens = list(prompt[:start])
        return list(prompt[start:])

    def feed(self, tokens: list[int]) -> None:
        """Run tokens through the model into the cache (prefill), in chunks."""
        import mlx.core as mx

        for i in range(0, len(tokens), PREFILL_STEP):
            self.model.model(mx.array([tokens[i : i + PREFILL_STEP]]), cache=self.cache)
            if self.model.kv is not None:  # as mlx-lm's generate_step does after each prefill chunk
                self.model.kv.apply(self.cache)
            mx.eval([c.state for c in self.cache])

    def chat(self, messages, **kwargs) -> ChatResult:
        return self.model.chat(messages, session=self, **kwargs)

    def chat_stream(self, messages, **kwargs):
        return self.model.chat_stream(messages, session=self, **kwargs)


class _StopFilter:
    """Passes text on, holding back what may be the start of a stop string; at the first stop
    string it passes what came before it and sets `hit`. Constant work per character."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""
        self.hit = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, delta: str) -> str:
        if not self.stops or self.hit:
            return "" if self.hit else delta
        self.pending += delta
        found = sorted((i, s) for s in self.stops if (i := self.pending.find(s)) >= 0)
        if found:
            at, self.matched = found[0]
            out, self.pending, self.hit = self.pending[:at], "", True
            return out
        keep = next((k for k in range(min(self.longest - 1, len(self.pending)), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


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
        self.call_buf = ""
        self.held = ""  # trailing whitespace of the answer, with tools offered: dropped if a tool call follows it
        self.thinking_held = ""  # trailing newlines of the thinking: dropped if it ends there
        self.before_call = ""

    def _markers(self):
        return [THINK_CLOSE] if self.in_thinking else ([CALL_CLOSE] if self.in_call else [CALL_OPEN, THINK_OPEN])

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
                self.in_thinking, self.strip_newlines, self.thinking_held = False, True, ""
            elif mk == THINK_OPEN:
                self.in_thinking = True
            elif mk == CALL_OPEN:
                self.in_call, self.call_buf, self.before_call, self.held = True, "", self.held, ""
            else:
                self.in_call = False
                content, calls = parse_tool_calls(f"{CALL_OPEN}{self.call_buf}{CALL_CLOSE}", self.tools)
                if calls:
                    self.calls += calls
                    for c in calls:
                        yield Event("tool_call", tool_call=c)
                else:
                    self.malformed = True
                    yield from self._emit(self.before_call + content)

    def _emit(self, out: str):
        if not out:
            return
        if self.in_thinking:  # newlines at either end of the thinking are the template's, not the model's
            if not self.thinking_text:
                out = out.lstrip("\n")
            body = out.rstrip("\n")
            out, self.thinking_held = (self.thinking_held + body, out[len(body):]) if body else \
                ("", self.thinking_held + out)
            if out:
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
            body = out.rstrip() if self.tools else out
            out, self.held = (self.held + body, out[len(body):]) if body else ("", self.held + out)
            if out:
                self.text += out
                yield Event("text", out)

    def close(self):
        rest, self.pending = self.pending, ""
        if self.in_call:  # truncated call: back to text, flagged
            self.malformed = True
            rest = self.before_call + CALL_OPEN + self.call_buf + rest
            self.in_call = False
        yield from self._emit(rest)
        if self.held:
            self.text += self.held
            yield Event("text", self.held)
            self.held = ""


def load(path, mtp: bool = False, native: bool = False, kv_bits: int | str | None = None,
         kv_group_size: int | None = None, kv_start: int | None = None) -> Model:
    """Our quants, plain mlx-lm quants, an unquantized Hugging Face folder or a GGUF file (built in
    memory in bfloat16), ready to chat, in the compute path that is fastest on this backend
    (mixquant.loading.load_for_running; `native`: mlx-lm's quantized kernels); with `mtp`, its MTP
    head too; with `kv_bits` (4 or 8), the attention layers' cache quantized as mlx-lm's
    QuantizedKVCache stores it, once it holds `kv_start` tokens; 'auto': at the widths per layer
    that the folder's config.json holds, measured when it was converted (mixquant.runtime.kv)."""
    from mixquant.runtime.kv import kv_settings

    return load_model(path, mtp, native, kv_settings(kv_bits, kv_group_size, kv_start, path))


def load_model(path, mtp: bool = False, native: bool = False, kv=None, shard=None) -> Model:
    """load, with the KV cache settings as a mixquant.runtime.kv.KVQuant (or None); shard: a
    mixquant.distributed.Shard, the model split over processes."""
    from mixquant.loading import load_for_running, say_compute_path

    loaded = load_for_running(Path(path), native=native, mtp=mtp, shard=shard)
    model = Model(loaded, kv)
    say_compute_path(loaded)
    return model
