"""Tool-call parsing on real-looking Qwen3.5 (XML) and Qwen3 (JSON) outputs, whole and broken."""

import pytest

from mixquant.runtime.toolcalls import parse_tool_calls

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {
        "time": {"type": "string"}, "repeat": {"type": "boolean"}, "volume": {"type": "number"},
        "labels": {"type": "array"}, "zip": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": ["integer", "null"]}}}}},
]


def xml(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# (output, expected content, expected [(name, arguments)])
XML_CASES = [
    (xml("get_weather", city="Lisbon"), "", [("get_weather", {"city": "Lisbon"})]),
    (xml("get_weather", city="Lisbon", unit="celsius"), "", [("get_weather", {"city": "Lisbon", "unit": "celsius"})]),
    (xml("get_weather", city="Oslo", days="3"), "", [("get_weather", {"city": "Oslo", "days": 3})]),
    ("Let me check.\n\n" + xml("get_weather", city="Paris"), "Let me check.",
     [("get_weather", {"city": "Paris"})]),
    (xml("get_weather", city="Oslo") + "\n" + xml("get_weather", city="Madrid"), "",
     [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Madrid"})]),
    (xml("set_alarm", time="07:30", repeat="true"), "", [("set_alarm", {"time": "07:30", "repeat": True})]),
    (xml("set_alarm", time="07:30", repeat="false", volume="0.5"), "",
     [("set_alarm", {"time": "07:30", "repeat": False, "volume": 0.5})]),
    (xml("set_alarm", time="6", labels='["work", "gym"]'), "", [("set_alarm", {"time": "6", "labels": ["work", "gym"]})]),
    (xml("set_alarm", zip="02134"), "", [("set_alarm", {"zip": "02134"})]),  # schema: string stays string
    (xml("run_sql", query="SELECT *\nFROM users\nWHERE id = 3"), "",
     [("run_sql", {"query": "SELECT *\nFROM users\nWHERE id = 3"})]),
    (xml("run_sql", query="SELECT 1", limit="10"), "", [("run_sql", {"query": "SELECT 1", "limit": 10})]),
    (xml("unknown_tool", a="1", b='{"x": [1, 2]}', c="hello"), "",
     [("unknown_tool", {"a": 1, "b": {"x": [1, 2]}, "c": "hello"})]),
    (xml("get_weather"), "", [("get_weather", {})]),
    (xml("get_weather", city="São Paulo"), "", [("get_weather", {"city": "São Paulo"})]),
    (xml("get_weather", city="北京"), "", [("get_weather", {"city": "北京"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>\n",
     "", [("get_weather", {"city": "Rome"})]),
    ("<tool_call><function=get_weather><parameter=city>Bern</parameter></function></tool_call>", "",
     [("get_weather", {"city": "Bern"})]),
    (xml("set_alarm", time="  08:00  "), "", [("set_alarm", {"time": "  08:00  "})]),
    (xml("set_alarm", volume="loud"), "", [("set_alarm", {"volume": "loud"})]),  # untypable: kept as text
    (xml("set_alarm", repeat="maybe"), "", [("set_alarm", {"repeat": "maybe"})]),
    ("I'll look both up.\n" + xml("get_weather", city="A") + "\n" + xml("get_weather", city="B") +
     "\n" + xml("set_alarm", time="9"), "I'll look both up.",
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"}), ("set_alarm", {"time": "9"})]),
    ("No tools needed: it is 4.", "No tools needed: it is 4.", []),
]

JSON_CASES = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}\n</tool_call>', "",
     [("get_weather", {"city": "Lisbon"})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}</tool_call>', "",
     [("get_weather", {"city": "Oslo", "days": 2})]),
    ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Checking.",
     [("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n'
     '</tool_call>', "", [("a", {}), ("b", {"x": 1})]),
    ('<tool_call>\n{"name": "run_sql", "arguments": "{\\"query\\": \\"SELECT 1\\"}"}\n</tool_call>', "",
     [("run_sql", {"query": "SELECT 1"})]),
    ('<tool_call>\n{"name": "run_sql", "parameters": {"query": "SELECT 2"}}\n</tool_call>', "",
     [("run_sql", {"query": "SELECT 2"})]),
    ('<tool_call>\n{"name": "set_alarm", "arguments": {"time": "07:00", "repeat": true, "labels": ["a"]}}\n</tool_call>',
     "", [("set_alarm", {"time": "07:00", "repeat": True, "labels": ["a"]})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>', "",
     [("get_weather", {"city": "Zürich"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京"}}\n</tool_call>', "",
     [("get_weather", {"city": "東京"})]),
    ('<tool_call>\n  {"name": "noop"}  \n</tool_call>', "", [("noop", {})]),
    ('<tool_call>\n{"name": "nested", "arguments": {"a": {"b": {"c": [1, {"d": null}]}}}}\n</tool_call>', "",
     [("nested", {"a": {"b": {"c": [1, {"d": None}]}}})]),
    ('<tool_call>\n{"name": "q", "arguments": {"text": "line1\\nline2 </tool> <x>"}}\n</tool_call>', "",
     [("q", {"text": "line1\nline2 </tool> <x>"})]),
    ('Sure!\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n\n', "Sure!",
     [("get_weather", {"city": "Lima"})]),
    ('<tool_call>\n{"name": "f", "arguments": {"n": 1.5e3}}\n</tool_call>', "", [("f", {"n": 1500.0})]),
    ('<tool_call>\n{"name": "f", "arguments": {"flag": false}}\n</tool_call>', "", [("f", {"flag": False})]),
    ('<tool_call>\n{"name": "f", "arguments": {"list": []}}\n</tool_call>', "", [("f", {"list": []})]),
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "reordered"}\n</tool_call>', "", [("reordered", {"x": 1})]),
    ('<tool_call>\n{"name": "a", "arguments": {"k": "v"}}\n</tool_call>\n' + xml("b", k="w"), "",
     [("a", {"k": "v"}), ("b", {"k": "w"})]),
    ('<tool_call>\n{"name": "emoji", "arguments": {"s": "🙂"}}\n</tool_call>', "", [("emoji", {"s": "🙂"})]),
    ('<tool_call>\n{"name": "quote", "arguments": {"s": "say \\"hi\\""}}\n</tool_call>', "",
     [("quote", {"s": 'say "hi"'})]),
    ("The answer is 42.", "The answer is 42.", []),
]

# (output, expected content) for outputs that must not raise and must come back flagged as text
BROKEN = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lis', '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lis'),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nLis", "<tool_call>\n<function=get_weather>\n<parameter=city>\nLis"),
    ("<tool_call>\nnot json at all\n</tool_call>", "<tool_call>\nnot json at all\n</tool_call>"),
    ('<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>', '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>'),
    ('<tool_call>\n["a", "b"]\n</tool_call>', '<tool_call>\n["a", "b"]\n</tool_call>'),
    ('<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
     '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'),
    ("<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\ngarbage\n</function>\n</tool_call>",
     "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\ngarbage\n</function>\n</tool_call>"),
    ("<tool_call>", "<tool_call>"),
]


def _check(output, content, calls):
    got_content, got_calls = parse_tool_calls(output, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("output, content, calls", XML_CASES)
def test_qwen35_xml_form(output, content, calls):
    _check(output, content, calls)
    assert not parse_tool_calls(output, TOOLS).malformed


@pytest.mark.parametrize("output, content, calls", JSON_CASES)
def test_qwen3_json_form(output, content, calls):
    _check(output, content, calls)
    assert not parse_tool_calls(output, TOOLS).malformed


@pytest.mark.parametrize("output, content", BROKEN)
def test_broken_output_is_text_and_flagged(output, content):
    result = parse_tool_calls(output, TOOLS)
    assert result.content == content and result.calls == [] and result.malformed


def test_one_good_one_broken():
    good = xml("get_weather", city="Oslo")
    result = parse_tool_calls(good + "\n<tool_call>\n{oops}\n</tool_call>", TOOLS)
    assert [c.name for c in result.calls] == ["get_weather"]
    assert result.malformed and "{oops}" in result.content


def test_without_tools_values_are_json_or_text():
    _, calls = parse_tool_calls(xml("f", zip="02134", n="7", s="hi"))
    assert calls[0].arguments == {"zip": "02134", "n": 7, "s": "hi"}  # "02134" is not JSON


def test_openai_shape():
    (_, [call]) = parse_tool_calls(xml("get_weather", city="Oslo"), TOOLS)
    d = call.to_openai()
    assert d["type"] == "function" and d["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


# --- hostile output: never an exception, always linear time ------------------------------------

PIECES = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "{", "}", "[",
          "]", '"name"', '"arguments"', ":", ",", '"', "\n", ">", "f", "x", "1", " ", "<", "/", "null", "\\"]


def _fuzz_cases(n, seed=7):
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.integers(1, 3000))
        yield "".join(PIECES[i] for i in rng.integers(len(PIECES), size=k))


def _bounded(text):
    import time

    t0 = time.perf_counter()
    result = parse_tool_calls(text, TOOLS)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.05 + 2e-6 * len(text), (len(text), elapsed)
    assert isinstance(result.content, str) and isinstance(result.malformed, bool)
    assert all(isinstance(c.arguments, dict) for c in result.calls)
    return result


def test_fuzz_never_raises_and_stays_linear():
    for text in _fuzz_cases(300):
        _bounded(text)


@pytest.mark.parametrize("unit, n", [
    ("<tool_call>", 100_000),
    ("</tool_call>", 100_000),
    ("<tool_call><function=f><parameter=x>", 30_000),
    ("<tool_call>\n{\"name\": \"f\", \"arguments\": " + "[" * 3000, 1),
    ("<tool_call><function=f><parameter=x>\n" + "[" * 3000 + "\n</parameter></function></tool_call>", 1),
])
def test_pathological_outputs(unit, n):
    result = _bounded(unit * n)
    assert result.malformed or result.calls


def test_deeply_nested_json_arguments_are_text_not_an_error():
    deep = '<tool_call>\n{"name": "f", "arguments": ' + "[" * 2000 + "]" * 2000 + "}\n</tool_call>"
    result = parse_tool_calls(deep)
    assert result.malformed and result.calls == [] and result.content == deep


def test_nested_tool_call_tags_are_flagged():
    inner = xml("get_weather", city="Oslo")
    result = parse_tool_calls("<tool_call>" + inner + "</tool_call>", TOOLS)
    assert [c.name for c in result.calls] == ["get_weather"]
    assert result.malformed and result.content == "<tool_call></tool_call>"
    stray = parse_tool_calls("done </tool_call>", TOOLS)
    assert stray.malformed and stray.content == "done </tool_call>"
