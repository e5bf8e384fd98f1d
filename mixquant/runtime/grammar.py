"""Constrained decoding: JSON that follows a JSON schema, by a token mask per step from llguidance
(a maintained grammar engine), applied as a logits processor."""

from __future__ import annotations

import numpy as np

from mixquant.errors import MixquantError

JSON_STYLE = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}  # json.dumps' layout
ANY_OBJECT = {"type": "object"}  # response_format json_object


def _engine():
    try:
        import llguidance
    except ImportError:
        raise MixquantError("constrained decoding needs llguidance: pip install 'mixquant[serve]'") from None
    return llguidance


def json_grammar(schema: dict | None) -> str:
    """The llguidance grammar for JSON following `schema` (None: any JSON object); a schema the
    engine cannot compile is a one-line error naming the construct."""
    LLMatcher = _engine().LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(ANY_OBJECT if schema is None else schema, overrides=JSON_STYLE)
    except (ValueError, TypeError) as e:
        raise MixquantError(f"the JSON schema cannot be compiled: {e}") from None
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise MixquantError(f"the JSON schema cannot be compiled: {' '.join(messages[0].split())}")
    return grammar


class TokenTable:
    """The tokenizer as llguidance sees it, built once per model (about a second for a large vocabulary)."""

    def __init__(self, tokenizer, eos_ids):
        _engine()
        from llguidance.hf import from_tokenizer

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        try:
            self.ll = from_tokenizer(hf, eos_token=sorted(eos_ids))
        except ValueError as e:
            raise MixquantError(f"constrained decoding needs a fast tokenizer: {e}") from None

    def token_bytes(self, token: int) -> bytes:
        return self.ll.decode_bytes([token])


class SchemaMask:
    """A logits processor (mlx-lm's form: tokens so far, logits) that keeps only the tokens the
    grammar allows next. It is stateful: one per reply. The first call sees the prompt's last token;
    each later call's last token is the one sampled after the previous call."""

    def __init__(self, table: TokenTable, grammar: str):
        from llguidance import LLMatcher

        self.table = table
        self.matcher = LLMatcher(table.ll, grammar, log_level=0)
        self.started = False
        self.seconds = 0.0  # time spent in the engine, for the cost per token
        self.steps = 0

    def __call__(self, tokens, logits):
        import time

        import mlx.core as mx

        t0 = time.perf_counter()
        if self.started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        if self.matcher.is_error():
            raise MixquantError(f"constrained decoding: {self.matcher.get_error()}")
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(logits.shape[-1], dtype=bool)
        n = min(len(bits), len(allowed))
        allowed[:n] = bits[:n].astype(bool)
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return mx.where(mx.array(allowed), logits, mx.array(-np.inf, dtype=logits.dtype))

