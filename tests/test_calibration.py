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


@pytest.fixture(scope="module")
def fixture_model(fixture_dir):
    import mixquant
    from mixquant.loading import load

    mixquant.enable_cpu_blas()
    return load(fixture_dir, dtype="float32", dequantize=True)


def test_seed_prompts_are_the_mix_with_and_without_the_chat_template(fixture_model):
    from mixquant.calib.data import CHAT_SEED_MAX, SEED_TOKENS, seed_prompts

    tok = fixture_model.tokenizer
    chat, plain = seed_prompts(tok)
    assert len(chat) == len({tuple(c) for c in chat}) and len(plain) == len({tuple(p) for p in plain})
    header = tok.encode("<|im_start|>assistant\n")
    assert chat and all(0 < len(c) <= CHAT_SEED_MAX for c in chat)
    assert all(any(c[i : i + len(header)] == header for i in range(len(c) - len(header) + 1)) for c in chat)
    assert plain and all(len(p) == SEED_TOKENS for p in plain)
    assert tok.decode(plain[0]) == tok.decode(tok.encode(tok.decode(plain[0])))  # whole tokens of a document
    assert not any(tok.convert_tokens_to_ids("<|im_start|>") in p for p in plain)


def test_default_calibration_is_the_mix_and_samples_deterministic_for_a_seed(fixture_model, fixture_dir):
    from mixquant.calib import data

    model, tok = fixture_model.model, fixture_model.tokenizer
    a = data.auto_windows(model, tok, 4096, 256, 8192, seed=0)
    b = data.auto_windows(model, tok, 4096, 256, 8192, seed=0)
    c = data.auto_windows(model, tok, 4096, 256, 8192, seed=1)
    assert a.shape == (16, 256) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    mix = data.calibration_windows(data.calibration_documents(data.MIX, tok), tok, 8 * 256, 256)
    is_mix = [any((w == m).all() for m in mix) for w in a]
    assert sum(is_mix) == 8 and is_mix[0::2] == [False] * 8  # interleaved: samples first, then the mix
    seeds = {tuple(s) for s in data.pick_seeds(*data.seed_prompts(tok), 8, 0)}
    sampled = [w for w, m in zip(a, is_mix) if not m]
    assert all(any(tuple(w[: len(s)]) == s for s in seeds) for w in sampled)


def test_sampled_calibration_is_shared_and_the_same_from_the_source(fixture_model, fixture_dir):
    from mixquant.calib import data

    model, tok = fixture_model.model, fixture_model.tokenizer
    data._SAMPLED.clear()
    given = data.calibration_set(data.AUTO, model, tok, 1024, 128, 8192, source=fixture_dir)
    assert data.calibration_set(data.AUTO, None, tok, 1024, 128, 8192, source=fixture_dir) is given
    data._SAMPLED.clear()
    loaded = data.calibration_set(data.AUTO, None, tok, 1024, 128, 8192, source=fixture_dir)
    np.testing.assert_array_equal(given, loaded)
