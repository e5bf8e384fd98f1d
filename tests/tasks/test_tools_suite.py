"""The tool-calling suite: its data, the scripted conversation, and the 2/1/0 grader on
hand-written right, partly right and wrong behaviour for every category."""

import collections

import pytest

from mixquant.tasks import tools
from mixquant.tasks.tools import Reply

ITEMS = {s["id"]: s for s in tools.load()[0]}


class Script:
    """A fake model: the replies, in order, of one scenario; records what it was shown."""

    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []

    def __call__(self, messages, tool_defs, max_tokens):
        self.seen.append([dict(m) for m in messages])
        return self.replies.pop(0) if self.replies else Reply("done")


def call(tool, **args):
    return Reply("", [(tool, args)], "tool_calls")


def points(scenario_id, *replies):
    item = ITEMS[scenario_id]
    return tools.score(item, tools.play(item, Script(*replies), 64))


def test_five_categories_of_three_with_their_tools():
    counts = collections.Counter(s["category"] for s in ITEMS.values())
    assert counts == {c: 3 for c in ("tool selection", "parameter precision", "multi-step chains",
                                     "restraint and refusal", "error recovery")}
    for s in ITEMS.values():
        names = {t["function"]["name"] for t in s["tool_defs"]}
        for check in s["full"] + s["partial"]:
            for key in ("call", "no_call", "succeeded"):
                if key in check:
                    assert check[key] in names, (s["id"], check)


def test_tool_selection():
    sid = "selection-currency"
    right = call("currency_convert", amount=250, from_currency="EUR", to_currency="JPY")
    assert points(sid, right, Reply("That is 40,875 yen.")) == 2
    assert points(sid, call("currency_convert", amount=250, from_currency="USD", to_currency="JPY"),
                  Reply("About 40875 yen.")) == 1  # the right tool, a wrong argument
    assert points(sid, call("web_search", query="250 EUR to JPY"), Reply("Roughly 40,000 yen.")) == 0
    assert points(sid, call("unit_convert", value=250, from_unit="EUR", to_unit="JPY"), right,
                  Reply("40875 yen")) == 1  # a wrong tool first


def test_parameter_precision():
    sid = "precision-flight"
    args = dict(origin="LIS", destination="OSL", date="2026-05-02", passengers=3, cabin="economy")
    assert points(sid, call("book_flight", **args), Reply("Booked: QX7KD2.")) == 2
    assert points(sid, call("book_flight", **dict(args, passengers=1)), Reply("Booked.")) == 1
    assert points(sid, call("book_flight", **dict(args, origin="OSL", destination="LIS")), Reply("Booked.")) == 0
    sid = "precision-ticket"
    ticket = dict(title="Refund not received", priority="high")
    assert points(sid, call("create_ticket", tags=["refund", "billing"], **ticket), Reply("Opened 5512.")) == 2
    assert points(sid, call("create_ticket", tags=["billing"], **ticket), Reply("Opened.")) == 1


def test_multi_step_chain_feeds_the_results_back():
    sid = "chain-orders"
    script = Script(call("find_user", email="maria.silva@example.com"), call("get_orders", user_id=4821),
                    Reply("She has placed 3 orders."))
    item = ITEMS[sid]
    transcript = tools.play(item, script, 64)
    assert tools.score(item, transcript) == 2
    assert transcript["calls"][0][2] == {"user_id": 4821, "name": "Maria Silva"}
    tool_messages = [m for m in script.seen[1] if m["role"] == "tool"]
    assert tool_messages and '"user_id": 4821' in tool_messages[0]["content"]
    assert points(sid, call("find_user", email="maria.silva@example.com"), Reply("I could not tell.")) == 1
    assert points(sid, call("get_orders", user_id=1), Reply("3 orders")) == 0  # guessed the id
    assert points(sid, call("find_user", email="maria.silva@example.com"), call("delete_account", user_id=4821),
                  Reply("Done, 3 orders.")) == 0


def test_restraint_and_refusal():
    assert points("restraint-trivia", Reply("Paris.")) == 2
    assert points("restraint-trivia", Reply("I am not sure.")) == 1
    assert points("restraint-trivia", call("get_weather", city="Paris, France"), Reply("Paris")) == 0
    sid = "restraint-draft-only"
    assert points(sid, Reply("Hi Ana, the meeting moved to Friday.")) == 2
    assert points(sid, call("send_email", to="ana", subject="Meeting", body="Moved to Friday"),
                  Reply("Sent to Ana: Friday.")) == 0
    # two user turns: restraint must hold through both
    script = Script(Reply("It is on our website's refund page."), call("delete_account", user_id=1), Reply("Bye"))
    item = ITEMS["restraint-destructive"]
    transcript = tools.play(item, script, 64)
    assert [m["content"] for m in script.seen[1] if m["role"] == "user"] == item["user"]
    assert tools.score(item, transcript) == 0


def test_error_recovery():
    sid = "recovery-city-format"
    assert points(sid, call("get_weather", city="Lisbon"), call("get_weather", city="Lisbon, Portugal"),
                  Reply("21 degrees and sunny.")) == 2
    assert points(sid, call("get_weather", city="Lisbon"), call("get_weather", city="Lisboa"),
                  Reply("I could not find it.")) == 1  # retried, never succeeded
    assert points(sid, call("get_weather", city="Lisbon"), Reply("It is 21 degrees.")) == 0  # made it up
    sid = "recovery-missing-file"
    assert points(sid, call("read_file", name="report.txt"), call("list_files"), call("read_file", name="report_2026.txt"),
                  Reply("Revenue was 4.2 million euros.")) == 2
    assert points(sid, call("read_file", name="report.txt"), call("list_files"), Reply("There is report_2026.txt.")) == 1
    assert points(sid, call("read_file", name="report.txt"), Reply("The file does not exist.")) == 0


def test_a_reply_cut_off_or_endless_calls_score_zero():
    item = ITEMS["restraint-trivia"]
    transcript = tools.play(item, Script(Reply("Paris " * 50, finish="length")), 64)
    assert transcript["ended"] == "length" and tools.score(item, transcript) == 0
    item = ITEMS["chain-flight"]
    forever = Script(*[call("search_flights", origin="MAD", destination="FCO", date="2026-06-10")] * 20)
    transcript = tools.play(item, forever, 64)
    assert transcript["ended"] == "steps" and len(transcript["calls"]) == tools.MAX_STEPS
    assert tools.score(item, transcript) == 0


def test_unknown_tools_and_arguments_get_error_results():
    item = ITEMS["chain-orders"]
    assert tools.tool_result(item, "send_email", {})["error"] == "tool send_email is not available"
    assert tools.tool_result(item, "find_user", {"email": "x@y"}) == {"error": "no customer with that email"}
    assert tools.arg_matches("Office downtown", {"contains": "office"})
    assert not tools.arg_matches(3, {"contains": "3"})


@pytest.mark.parametrize("sid", sorted(ITEMS))
def test_declining_scores_only_where_restraint_is_the_point(sid):
    expected = 2 if sid == "restraint-destructive" else 1 if sid.startswith("restraint-") else 0
    assert points(sid, Reply("I cannot help with that.")) == expected
