"""JSON Schemas of the response objects of OpenAI's published OpenAPI spec (openai/openai-openapi,
components CreateChatCompletionResponse, CreateChatCompletionStreamResponse, CreateCompletionResponse,
ChatCompletionTokenLogprob, CompletionUsage and the ones they name): their required fields, types and
enums, transcribed, for the tests to validate the server's responses with `jsonschema`.

Two places allow null where the spec's schema says a value and OpenAI's own service sends null:
the first echoed prompt token's logprob on /v1/completions (no token comes before it), and a streamed
completion chunk's finish_reason before the last chunk."""

NULL_STRING = {"type": ["string", "null"]}

USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}},
    },
}

_TOP = {
    "type": "object",
    "required": ["token", "logprob", "bytes"],
    "properties": {"token": {"type": "string"}, "logprob": {"type": "number"},
                   "bytes": {"type": ["array", "null"], "items": {"type": "integer"}}},
}

TOKEN_LOGPROB = {
    "type": "object",
    "required": ["token", "logprob", "bytes", "top_logprobs"],
    "properties": {**_TOP["properties"], "top_logprobs": {"type": "array", "items": _TOP}},
}

CHOICE_LOGPROBS = {
    "type": ["object", "null"],
    "required": ["content", "refusal"],
    "properties": {"content": {"type": ["array", "null"], "items": TOKEN_LOGPROB},
                   "refusal": {"type": ["array", "null"], "items": TOKEN_LOGPROB}},
}

TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {"id": {"type": "string"}, "type": {"enum": ["function"]},
                   "function": {"type": "object", "required": ["name", "arguments"],
                                "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}}},
}

CHAT_FINISH = ["stop", "length", "tool_calls", "content_filter", "function_call"]

CHAT_COMPLETION = {
    "type": "object",
    "required": ["choices", "created", "id", "model", "object"],
    "properties": {
        "id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
        "object": {"enum": ["chat.completion"]}, "usage": USAGE,
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["finish_reason", "index", "message", "logprobs"],
            "properties": {
                "finish_reason": {"enum": CHAT_FINISH}, "index": {"type": "integer"}, "logprobs": CHOICE_LOGPROBS,
                "message": {"type": "object", "required": ["role", "content", "refusal"], "properties": {
                    "role": {"enum": ["assistant"]}, "content": NULL_STRING, "refusal": NULL_STRING,
                    "tool_calls": {"type": "array", "items": TOOL_CALL}}},
            }}},
    },
}

CHAT_CHUNK = {
    "type": "object",
    "required": ["choices", "created", "id", "model", "object"],
    "properties": {
        "id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
        "object": {"enum": ["chat.completion.chunk"]},
        "usage": {"anyOf": [USAGE, {"type": "null"}]},
        "choices": {"type": "array", "items": {
            "type": "object",
            "required": ["delta", "finish_reason", "index"],
            "properties": {
                "index": {"type": "integer"}, "logprobs": CHOICE_LOGPROBS,
                "finish_reason": {"enum": CHAT_FINISH + [None]},
                "delta": {"type": "object", "properties": {
                    "content": NULL_STRING, "refusal": NULL_STRING,
                    "role": {"enum": ["developer", "system", "user", "assistant", "tool"]},
                    "tool_calls": {"type": "array", "items": {
                        "type": "object", "required": ["index"],
                        "properties": {"index": {"type": "integer"}, "id": {"type": "string"},
                                       "type": {"enum": ["function"]},
                                       "function": {"type": "object", "properties": {
                                           "name": {"type": "string"}, "arguments": {"type": "string"}}}}}}}},
            }}},
    },
}


def completion(streamed: bool) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"}, "created": {"type": "integer"}, "model": {"type": "string"},
            "object": {"enum": ["text_completion"]}, "usage": USAGE,
            "choices": {"type": "array", "items": {
                "type": "object",
                "required": ["finish_reason", "index", "logprobs", "text"],
                "properties": {
                    "finish_reason": {"enum": ["stop", "length", "content_filter"] + ([None] if streamed else [])},
                    "index": {"type": "integer"}, "text": {"type": "string"},
                    "logprobs": {"type": ["object", "null"], "properties": {
                        "text_offset": {"type": "array", "items": {"type": "integer"}},
                        "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                        "tokens": {"type": "array", "items": {"type": "string"}},
                        "top_logprobs": {"type": "array", "items": {
                            "type": ["object", "null"], "additionalProperties": {"type": "number"}}}}},
                }}},
        },
    }
