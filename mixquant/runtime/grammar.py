"""Constrained decoding: JSON that follows a JSON schema, by a token mask per step from llguidance
(a maintained grammar engine), applied as a logits processor."""

from __future__ import annotations

import json
import time

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
    return _checked(grammar, "the JSON schema")


def _checked(grammar: str, what: str) -> str:
    failed, messages = _engine().LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise MixquantError(f"{what} cannot be compiled: {' '.join(messages[0].split())}")
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

    def lark_text(self, text: str) -> str:
        """`text` in a grammar: the special token it is, when the tokenizer has one for it (a model
        writes that token, never the text's bytes), else the text as a literal."""
        ids = self.ll.tokenize_str(text)
        if len(ids) == 1 and self.ll.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return _literal(text)


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



XML_TEXT = r"/([^<]|<[^\/])*/"  # a string parameter of the XML form: anything but a closing tag
NL = "\n"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal: JSON's escapes


def _xml_value(schema) -> str:
    """A parameter's value in Qwen3.5's XML form: strings as they are (no closing tag inside; with a
    length bound, no '<' at all), enums of strings as their literals, anything else as JSON following
    its schema."""
    if not isinstance(schema, dict):
        return XML_TEXT
    if isinstance(schema.get("enum"), list) and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
        return "(" + " | ".join(_literal(v) for v in schema["enum"]) + ")"
    if schema.get("type") == "string":
        bounds = (int(schema.get("minLength", 0)), schema.get("maxLength"))
        if bounds == (0, None):
            return XML_TEXT
        return f"/[^<]{{{bounds[0]},{'' if bounds[1] is None else int(bounds[1])}}}/"  # no tag inside, counted
    return _json_rule(schema)


def _json_rule(schema: dict) -> str:
    """A JSON value following `schema` inside a Lark grammar, laid out as json.dumps does."""
    return "%json" + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def tool_call_grammar(tools: list[dict], xml: bool, named: bool, close: str) -> str:
    """The llguidance grammar (Lark) of one tool call after the prompt's forced opening (see
    mixquant.runtime.toolcalls.forced_call_prefix): a call of one of `tools` (OpenAI-style; with
    `named`, the one tool, whose name the opening already holds) whose arguments follow the tool's
    parameters schema, in the chat template's form (Qwen3.5's XML, else Qwen3's JSON). `close`: the
    closing tag as the grammar writes it (TokenTable.lark_text)."""
    rules = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if xml:
            required = set(params.get("required") or [])
            parts = []
            for j, (key, schema) in enumerate((params.get("properties") or {}).items()):
                rules.append(f"p{i}_{j}: {_literal(f'<parameter={key}>{NL}')} {_xml_value(schema)} "
                             f"{_literal(f'{NL}</parameter>{NL}')}")
                parts.append(f"p{i}_{j}" + ("" if key in required else "?"))
            opener = "" if named else _literal(f"<function={fn['name']}>{NL}") + " "
            body = " ".join(parts + [_literal(f"</function>{NL}"), close])
        else:
            opener = "" if named else _literal(f'{{"name": {json.dumps(fn["name"])}, "arguments": ') + " "
            body = _json_rule(params) + " " + _literal(f"}}{NL}") + " " + close
        rules.append(f"fn{i}: {opener}{body}")
    grammar = NL.join(["start: " + " | ".join(f"fn{i}" for i in range(len(tools)))] + rules)
    return _checked(_engine().LLMatcher.grammar_from_lark(grammar), "the tool's parameters")
