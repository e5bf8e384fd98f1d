"""Calibration text: the bundled mix or the user's file, as token windows.

The bundled mix (`mixquant/data/calibration.jsonl`, written for this project) holds multi-turn
chats, tool-calling transcripts, code in several languages, long prose and Chinese text. Chats
are rendered with the model's own chat template, so the special tokens and layout the model sees
in use are part of the statistics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from mixquant.bundled import CALIBRATION_MIX
from mixquant.errors import MixquantError
from mixquant.io.output import file_stats
from mixquant.io.textfile import parse_json, read_text
from mixquant.vocab import check_token_ids

log = logging.getLogger(__name__)


def calibration_documents(spec: str, tokenizer) -> list[str]:
    """'mix', a .jsonl file in the mix's format, or a plain .txt file -> rendered documents."""
    path = CALIBRATION_MIX if spec == MIX else Path(spec)
    if not path.exists():
        raise MixquantError(f"{path}: calibration file not found")
    if path.suffix != ".jsonl":
        return [read_text(path)]
    return [_render_chat(tokenizer, item, where) if "messages" in item else item["text"]
            for where, item in jsonl_items(path)]


def jsonl_items(path: Path) -> list[tuple[str, dict]]:
    """(where, item) for each line of a calibration .jsonl file, each checked to be an object with
    'messages' (a list of objects) or 'text' (a string)."""
    items = []
    for i, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        where = f"{path}: line {i + 1}"
        item = parse_json(line, where)
        if not isinstance(item, dict):
            raise MixquantError(f"{path}: line {i + 1} is not a JSON object")
        if "messages" in item:
            if not isinstance(item["messages"], list) or not all(isinstance(m, dict) for m in item["messages"]):
                raise MixquantError(f"{where}: 'messages' must be a list of objects")
        elif "text" in item:
            if not isinstance(item["text"], str):
                raise MixquantError(f"{where}: 'text' must be a string, got {type(item['text']).__name__}")
        else:
            raise MixquantError(f"{path}: line {i + 1} has neither 'messages' nor 'text'")
        items.append((where, item))
    return items


def _render_chat(tokenizer, item: dict, where: str, generation_prompt: bool = False) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:  # a model without a template still sees the words
        return "\n\n".join(str(m.get("content", "")) for m in item["messages"])
    try:
        return tokenizer.apply_chat_template(item["messages"], tools=item.get("tools"), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # template errors come as jinja2/ValueError/TypeError
        raise MixquantError(f"{where}: the chat template cannot render it ({e})") from None


READ_FACTOR = 32  # a large calibration text is read up to this many times the tokens asked for
MAX_CHARS_PER_TOKEN = 16


def calibration_windows(docs: list[str], tokenizer, tokens: int | None, ctx: int) -> np.ndarray:
    """Documents concatenated (separated by EOS) and cut into windows of `ctx` tokens. When the text
    holds more windows than `tokens` asks for, they are taken evenly across it (its first
    READ_FACTOR x `tokens` tokens), not from its start: a file's first pages are one topic, and
    error-compensating methods fit what they are shown."""
    eos = tokenizer.eos_token_id
    limit = None if tokens is None else READ_FACTOR * tokens
    ids: list[int] = []
    for d in docs:
        if limit is not None:
            d = d[: (limit - len(ids)) * MAX_CHARS_PER_TOKEN]
        ids += list(tokenizer.encode(d))
        if eos is not None:
            ids.append(int(eos))
        if limit is not None and len(ids) >= limit:
            break
    available = len(ids) // ctx
    if available == 0:
        if len(ids) < 2:
            raise MixquantError("calibration text is empty")
        ids = ids[:tokens] if tokens is not None else ids
        return np.asarray(ids, dtype=np.int32)[None]  # shorter than one window: use it whole
    n = available if tokens is None else min(available, max(1, tokens // ctx))
    picks = spread(available, n)
    return np.stack([np.asarray(ids[i * ctx : (i + 1) * ctx], dtype=np.int32) for i in picks])


def spread(available: int, n: int) -> np.ndarray:
    """At most n indices of 0..available-1 taken evenly across them, first and last included."""
    return np.unique(np.linspace(0, available - 1, min(n, available)).round().astype(int))


SELF = "self"
MIX = "mix"
AUTO = "auto"
BUILTIN_CALIB = (AUTO, MIX, SELF)  # calibration specs that are not files
DEFAULT_CALIB = AUTO
SELF_WINDOWS = 8  # windows sampled for --calib self when --tokens does not say
AUTO_TOKENS = 16384  # the default calibration's budget when --calib-tokens does not say
SEED_TOKENS = 32  # a plain-text seed prompt: this many tokens of a document of the mix
CHAT_SEED_MAX = 128  # a chat seed prompt: at most its last this many tokens
SAMPLE_BATCH = 32
SAMPLE_SEED = 0


def seed_prompts(tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(chat seeds, plain seeds) from the bundled mix, each deduplicated: every chat up to each of its
    user turns, rendered with the model's chat template and the generation prompt (what the model
    answers in use; none without a template); and every document as plain text (a chat's turns
    joined) cut into pieces of SEED_TOKENS tokens."""
    chat, plain = [], []
    template = getattr(tokenizer, "chat_template", None)
    for where, item in jsonl_items(CALIBRATION_MIX):
        if "messages" in item:
            msgs = item["messages"]
            text = "\n\n".join(str(m.get("content", "")) for m in msgs)
            for k, m in enumerate(msgs):
                if template and m.get("role") == "user":
                    turn = {"messages": msgs[: k + 1], "tools": item.get("tools")}
                    rendered = _render_chat(tokenizer, turn, where, True)
                    chat.append(list(tokenizer.encode(rendered, add_special_tokens=False))[-CHAT_SEED_MAX:])
        else:
            text = item["text"]
        ids = list(tokenizer.encode(text))
        plain += [ids[i : i + SEED_TOKENS] for i in range(0, len(ids) - SEED_TOKENS + 1, SEED_TOKENS)]
    return _unique(chat), _unique(plain)


def _unique(seqs: list[list[int]]) -> list[list[int]]:
    return [list(s) for s in dict.fromkeys(tuple(s) for s in seqs)]


def pick_seeds(chat: list[list[int]], plain: list[list[int]], n: int, seed: int) -> list[list[int]]:
    """n seed prompts, alternately from the chat and the plain pool (each in a seeded order, reused
    in turn when n exceeds it); the plain pool alone when there is no chat seed."""
    rng = np.random.default_rng(seed)
    pools = [[p[i] for i in rng.permutation(len(p))] for p in (chat, plain) if p]
    if not pools:
        raise MixquantError("calibration: the bundled mix gives no seed prompt for this tokenizer")
    return [pools[i % len(pools)][(i // len(pools)) % len(pools[i % len(pools)])] for i in range(n)]


def sample_windows(model, prompts: list[list[int]], ctx: int, seed: int) -> np.ndarray:
    """[len(prompts), ctx] windows: each prompt (its last ctx/2 tokens at most) continued by the model
    at temperature 1 to ctx tokens (end-of-text tokens do not stop it), batched on mlx-lm's
    BatchGenerator."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    prompts = [list(p[-(ctx // 2) :]) for p in prompts]

    key = mx.random.key(seed)

    def sampler(logprobs):
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs, key=sub)

    gen = BatchGenerator(model, sampler=sampler, completion_batch_size=SAMPLE_BATCH,
                         prefill_batch_size=min(SAMPLE_BATCH, 8))
    try:
        uids = gen.insert(prompts, [ctx - len(p) for p in prompts])
        out = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return np.asarray([p + out[u] for p, u in zip(prompts, uids)], dtype=np.int32)


def self_windows(model, tokenizer, n: int, ctx: int, seed: int = 0) -> np.ndarray:
    """n windows of ctx tokens sampled from the model itself at temperature 1, each started from the
    tokenizer's document-start token: calibration text with no domain mismatch."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise MixquantError("calibration: --calib self needs a tokenizer with a BOS or EOS token")
    return sample_windows(model, [[int(start)]] * n, ctx, seed)


def auto_windows(model, tokenizer, tokens: int, ctx: int, rows: int, seed: int = 0) -> np.ndarray:
    """The default calibration: the bundled mix (at most half of `tokens`) and, for the rest, the
    model's own continuations of seed prompts drawn from it, with and without the chat template;
    the two kinds interleaved, so that any evenly spread subset holds both."""
    n = max(1, tokens // ctx)
    mix = np.zeros((0, ctx), dtype=np.int32)
    if n >= 2:
        mix = calibration_set(MIX, None, tokenizer, (n // 2) * ctx, ctx, rows)
        mix = mix[: n // 2] if mix.shape[1] == ctx else mix[:0].reshape(0, ctx)
    seeds = pick_seeds(*seed_prompts(tokenizer), n - len(mix), seed)
    check_token_ids(np.concatenate([np.asarray(s, dtype=np.int32) for s in seeds]), rows, str(CALIBRATION_MIX))
    sampled = sample_windows(model, seeds, ctx, seed)
    order = np.argsort(np.concatenate([np.linspace(0, 1, len(mix), endpoint=False) + 0.5 / max(len(mix), 1),
                                       np.linspace(0, 1, len(sampled), endpoint=False)]), kind="stable")
    return np.concatenate([mix, sampled])[order]


def describe(spec: str) -> str:
    """A calibration spec in words, for model cards."""
    return {AUTO: f"the default (`auto`): the bundled mix and the model's own continuations of seed prompts from it "
                  f"({AUTO_TOKENS} tokens unless --calib-tokens says)",
            MIX: "the bundled mix", SELF: "text sampled from the model"}.get(spec, f"`{Path(spec).name}`")


def needs_model(spec: str) -> bool:
    """Whether the calibration `spec` samples from the model."""
    return spec in (SELF, AUTO)


def calibration_set(spec: str, model, tokenizer, tokens: int | None, ctx: int, rows: int,
                    seed: int = SAMPLE_SEED, source: Path | None = None, config_dir: Path | None = None) -> np.ndarray:
    """[n, ctx] token windows: the default (AUTO: the mix and the model's continuations of it), the
    bundled mix, a user file, or (SELF) sampled from the model, whose token embedding has `rows`
    rows. A spec that samples uses `model`, or (None) loads the float model at `source` for it;
    sampled sets are kept per source and request, so the steps of one conversion share one."""
    if not needs_model(spec):
        windows = calibration_windows(calibration_documents(spec, tokenizer), tokenizer, tokens, ctx)
        check_token_ids(windows, rows, str(CALIBRATION_MIX if spec == MIX else spec))
        return windows
    inputs = [source] + ([config_dir] if config_dir else [])
    key = None if source is None else (tuple(file_stats(inputs)), spec, tokens, ctx, rows, seed)
    if key in _SAMPLED:
        return _SAMPLED[key]
    if model is None:
        model = _sampler(source, config_dir)
        if model is None:
            return calibration_set(MIX, None, tokenizer, tokens or AUTO_TOKENS, ctx, rows)
    t0 = time.perf_counter()
    if spec == SELF:
        windows = self_windows(model, tokenizer, max(1, tokens // ctx) if tokens else SELF_WINDOWS, ctx, seed)
    else:
        windows = auto_windows(model, tokenizer, tokens or AUTO_TOKENS, ctx, rows, seed)
    log.info("calibration (%s): %d windows of %d tokens; sampling took %.1f s", spec, len(windows), ctx,
             time.perf_counter() - t0)
    check_token_ids(windows, rows, f"calibration ({spec})")
    if key is not None:
        if len(_SAMPLED) >= SAMPLED_KEPT:
            _SAMPLED.pop(next(iter(_SAMPLED)))
        _SAMPLED[key] = windows
    return windows


_SAMPLED: dict = {}  # (source fingerprint, request) -> windows: one sampling per model and request
SAMPLED_KEPT = 8
SAMPLER_SHARE = 0.8  # the sampler is loaded only when its weights fit in this share of memory


def _sampler(source: Path, config_dir: Path | None):
    """The model at `source` to sample calibration text from: in float32 where that fits in half of
    memory, else in bfloat16 where that fits in SAMPLER_SHARE of it; else None, with a warning that
    calibration falls back to the bundled mix."""
    from mixquant.loading import load, memory_bytes, text_weight_bytes

    stored = text_weight_bytes(Path(source))
    built = 4 * stored if Path(source).is_file() else stored  # a GGUF's blocks are built in bfloat16
    if 2 * built <= memory_bytes() // 2:
        return load(Path(source), dtype="float32", dequantize=True, config_dir=config_dir).model
    if built <= SAMPLER_SHARE * memory_bytes():
        return load(Path(source), config_dir=config_dir).model
    log.warning("calibration: %s (%.0f GB) does not fit in this machine's memory to sample from; calibrating on "
                "the bundled mix alone (--calib FILE gives text of your domain)", source, stored / 1e9)
    return None
