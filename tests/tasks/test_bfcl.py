"""BFCL's data read from the bfcl-eval wheel (fetched once, cached) and our grader on hand-written
right, partly right and wrong calls for each of the four categories."""

import pytest

from mixquant.runtime.toolcalls import parse_tool_calls
from mixquant.tasks import bfcl


@pytest.fixture(scope="module")
def items():
    return {c: {i["id"]: i for i in bfcl.load(c)} for c in bfcl.CATEGORIES}


def test_the_four_categories_load_with_their_answers(items):
    assert {c: len(v) for c, v in items.items()} == {"simple": 400, "multiple": 200, "parallel": 200,
                                                      "irrelevance": 240}
    item = items["multiple"]["multiple_0"]
    assert [t["function"]["name"] for t in item["tools"]][0] == "triangle_properties_get"
    assert item["names"]["triangle_properties_get"] == "triangle_properties.get"
    params = item["tools"][0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["side1"]["type"] == "integer"
    assert items["parallel"]["parallel_2"]["tools"][0]["function"]["parameters"]["properties"]["area"]["type"] == "number"
    assert all(not i["answer"] for i in items["irrelevance"].values())


def test_simple(items):
    item = items["simple"]["simple_python_0"]
    call = "calculate_triangle_area"
    assert bfcl.grade(item, [(call, {"base": 10, "height": 5})]) == 1.0
    assert bfcl.grade(item, [(call, {"base": 10, "height": 5, "unit": "Units"})]) == 1.0  # case-insensitive
    assert bfcl.grade(item, [(call, {"base": 10.0, "height": 5})]) == 1.0  # by value
    assert bfcl.grade(item, [(call, {"base": 10, "height": 6})]) == 0.0  # partly right is wrong
    assert bfcl.grade(item, [(call, {"base": 10})]) == 0.0  # a required parameter missing
    assert bfcl.grade(item, [(call, {"base": 10, "height": 5, "colour": "red"})]) == 0.0  # not declared
    assert bfcl.grade(item, [(call, {"base": 10, "height": 5, "unit": "cm"})]) == 0.0
    assert bfcl.grade(item, [("triangle_area", {"base": 10, "height": 5})]) == 0.0
    assert bfcl.grade(item, [(call, {"base": "10", "height": 5})]) == 0.0  # a string is not a number
    assert bfcl.grade(item, []) == 0.0
    assert bfcl.grade(item, [(call, {"base": 10, "height": 5})] * 2) == 0.0


def test_multiple_maps_the_sent_names_back(items):
    item = items["multiple"]["multiple_0"]
    args = {"side1": 5, "side2": 4, "side3": 3}
    assert bfcl.grade(item, [("triangle_properties_get", args)]) == 1.0
    assert bfcl.grade(item, [("triangle_properties_get", dict(args, get_area=True))]) == 1.0
    assert bfcl.grade(item, [("triangle_properties_get", dict(args, get_area=False))]) == 0.0
    assert bfcl.grade(item, [("triangle_properties_get", dict(args, get_area="true"))]) == 0.0
    other = item["tools"][1]["function"]["name"]
    assert bfcl.grade(item, [(other, args)]) == 0.0


def test_parallel_needs_every_call_in_any_order(items):
    item = items["parallel"]["parallel_0"]
    a = ("spotify_play", {"artist": "Taylor Swift", "duration": 20})
    b = ("spotify_play", {"artist": "Maroon 5", "duration": 15})
    assert bfcl.grade(item, [a, b]) == 1.0
    assert bfcl.grade(item, [b, a]) == 1.0
    assert bfcl.grade(item, [a]) == 0.0  # half of it
    assert bfcl.grade(item, [a, a]) == 0.0  # one answer cannot be matched twice
    assert bfcl.grade(item, [a, ("spotify_play", {"artist": "Maroon 5", "duration": 20})]) == 0.0
    # nested possible answers: lists element by element
    item = items["parallel"]["parallel_2"]
    r = "calculate_resistance"
    assert bfcl.grade(item, [(r, {"length": 5, "area": 0.01, "resistivity": "aluminum"}),
                             (r, {"length": 5, "area": 0.01})]) == 1.0


def test_irrelevance_passes_only_without_a_call(items):
    item = items["irrelevance"]["irrelevance_0"]
    assert bfcl.grade(item, []) == 1.0
    assert bfcl.grade(item, [("determine_body_mass_index", {"weight": 70, "height": 1.8})]) == 0.0
    assert bfcl.grade(item, [], malformed=True) == 0.0  # an attempted call that could not be read


def test_malformed_markup_gives_no_call_and_fails(items):
    item = items["simple"]["simple_python_0"]
    for text in ('<tool_call>\n{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}\n',
                 '<tool_call>{"name": "calculate_triangle_area", "arguments": {"base": 10,, }}</tool_call>',
                 '</tool_call>calculate_triangle_area(base=10, height=5)'):
        parsed = parse_tool_calls(text, item["tools"])
        assert parsed.malformed and not parsed.calls
        assert bfcl.grade(item, [(c.name, c.arguments) for c in parsed.calls], parsed.malformed) == 0.0
    good = parse_tool_calls('<tool_call>\n{"name": "calculate_triangle_area", "arguments": {"base": 10, "height": 5}}\n'
                            '</tool_call>', item["tools"])
    assert bfcl.grade(item, [(c.name, c.arguments) for c in good.calls]) == 1.0


def test_value_matching():
    assert bfcl.value_matches("New York, NY", "new york ny")
    assert not bfcl.value_matches(True, 1) and not bfcl.value_matches(1, True)
    assert bfcl.value_matches([1, 2.0], [1.0, 2])
    assert not bfcl.value_matches([1, 2], [2, 1])
    assert bfcl.value_matches({"a": 1}, {"a": [1], "b": ["", 2]})
    assert not bfcl.value_matches({"a": 1, "c": 3}, {"a": [1]})
