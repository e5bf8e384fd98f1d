"""Calibration text: the bundled mix or the user's file, as token windows.

The bundled mix (`mixquant/data/calibration.jsonl`, written for this project) holds multi-turn
chats, tool-calling transcripts, code in several languages, long prose and Chinese text. Chats
are rendered with the model's own chat template, so the special tokens and layout the model sees
in use are part of the statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixquant.bundled import CALIBRATION_MIX
from mixquant.errors import MixquantError
from mixquant.io.textfile import parse_json, read_text
from mixquant.vocab import check_token_ids



def calibration_documents(spec: str, tokenizer) -> list[str]:
    """'mix', a .jsonl file in the mix's format, or a plain .txt file -> rendered documents."""
    path = CALIBRATION_MIX if spec == MIX else Path(spec)
    if not path.exists():
        raise MixquantError(f"{path}: calibration file not found")
    text = read_text(path)
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        item = parse_json(line, f"{path}: line {i + 1}")
        if not isinstance(item, dict):
            raise MixquantError(f"{path}: line {i + 1} is not a JSON object")
        if "messages" in item:
            if not isinstance(item["messages"], list) or not all(isinstance(m, dict) for m in item["messages"]):
                raise MixquantError(f"{path}: line {i + 1}: 'messages' must be a list of objects")
            docs.append(_render_chat(tokenizer, item, f"{path}: line {i + 1}"))
        elif "text" in item:
            if not isinstance(item["text"], str):
                raise MixquantError(f"{path}: line {i + 1}: 'text' must be a string, got "
                                    f"{type(item['text']).__name__}")
            docs.append(item["text"])
        else:
            raise MixquantError(f"{path}: line {i + 1} has neither 'messages' nor 'text'")
    return docs


def _render_chat(tokenizer, item: dict, where: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:  # a model without a template still sees the words
        return "\n\n".join(str(m.get("content", "")) for m in item["messages"])
    try:
        return tokenizer.apply_chat_template(item["messages"], tools=item.get("tools"), tokenize=False)
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
    picks = np.unique(np.linspace(0, available - 1, n).round().astype(int))
    return np.stack([np.asarray(ids[i * ctx : (i + 1) * ctx], dtype=np.int32) for i in picks])


SELF = "self"
MIX = "mix"
BUILTIN_CALIB = (MIX, SELF)  # calibration specs that are not files
SELF_WINDOWS = 8  # windows sampled for --calib self when --tokens does not say


def self_windows(model, tokenizer, n: int, ctx: int, seed: int = 0) -> np.ndarray:
    """n windows of ctx tokens sampled from the model itself at temperature 1, each started from the
    tokenizer's document-start token: calibration text with no domain mismatch."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise MixquantError("calibration: --calib self needs a tokenizer with a BOS or EOS token")
    y = mx.full((n, 1), int(start), dtype=mx.int32)
    cache = make_prompt_cache(model)
    key = mx.random.key(seed)
    out = [y]
    for _ in range(ctx - 1):
        logits = model(y, cache=cache)[:, -1, :].astype(mx.float32)
        key, sub = mx.random.split(key)
        y = mx.random.categorical(logits, key=sub)[:, None].astype(mx.int32)
        mx.eval(y)
        out.append(y)
    return np.array(mx.concatenate(out, axis=1))


def calibration_set(spec: str, model, tokenizer, tokens: int | None, ctx: int, rows: int,
                    seed: int = 0) -> np.ndarray:
    """[n, ctx] token windows: the bundled mix, a user file, or (SELF) sampled from the model, whose
    token embedding has `rows` rows."""
    if spec == SELF:
        n = max(1, tokens // ctx) if tokens else SELF_WINDOWS
        return self_windows(model, tokenizer, n, ctx, seed)
    windows = calibration_windows(calibration_documents(spec, tokenizer), tokenizer, tokens, ctx)
    check_token_ids(windows, rows, str(CALIBRATION_MIX if spec == MIX else spec))
    return windows
