"""Calibration windows from a text file: spread across it, within the token budget."""

import numpy as np
import pytest

from mixquant.calib.data import MAX_CHARS_PER_TOKEN, READ_FACTOR, calibration_windows
from mixquant.errors import MixquantError


class ByteTokenizer:
    eos_token_id = 0

    def encode(self, text):
        return [b + 1 for b in text.encode()]


def test_windows_are_spread_across_a_long_text():
    text = "".join(chr(ord("a") + i) * 100 for i in range(26))  # 26 blocks of 100 tokens
    w = calibration_windows([text], ByteTokenizer(), 400, 100)
    assert w.shape == (4, 100)
    firsts = [chr(row[0] - 1) for row in w]
    assert firsts == ["a", "i", "r", "z"]  # evenly over all 26 windows, not the first four
    assert all(len(set(row.tolist())) == 1 for row in w)  # each is one whole window of the grid


def test_all_windows_without_a_budget_and_short_text_whole():
    w = calibration_windows(["ab" * 150], ByteTokenizer(), None, 100)
    assert w.shape == (3, 100)
    np.testing.assert_array_equal(w.reshape(-1), np.array(ByteTokenizer().encode("ab" * 150)))
    short = calibration_windows(["hello"], ByteTokenizer(), 1000, 100)
    assert short.tolist() == [ByteTokenizer().encode("hello") + [0]]


def test_a_huge_text_is_read_only_up_to_the_limit():
    seen = []

    class Recording(ByteTokenizer):
        def encode(self, text):
            seen.append(len(text))
            return super().encode(text)

    w = calibration_windows(["x" * 10_000_000], Recording(), 200, 100)
    assert w.shape == (2, 100)
    assert seen == [READ_FACTOR * 200 * MAX_CHARS_PER_TOKEN]


def test_empty_text_is_an_error():
    with pytest.raises(MixquantError, match="calibration text is empty"):
        calibration_windows([""], type("T", (), {"eos_token_id": None, "encode": lambda self, t: []})(), 100, 10)
