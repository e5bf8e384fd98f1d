"""Token ids against the embedding's rows: the rows come from the language model's own config, and an
id past them is refused with the file named."""

import numpy as np
import pytest

from mixquant.errors import MixquantError
from mixquant.vocab import check_token_ids, embedding_rows


def test_embedding_rows_are_the_language_models_vocab_size():
    wrapped = {"model_type": "qwen3_5", "vocab_size": 7, "text_config": {"model_type": "qwen3_5_text",
                                                                       "vocab_size": 248320}}
    assert embedding_rows(wrapped, "vlm/config.json") == 248320
    assert embedding_rows({"model_type": "qwen3_5_text", "vocab_size": 8192}, "text/config.json") == 8192
    assert embedding_rows({"model_type": "llama", "vocab_size": 49152}, "llama/config.json") == 49152


@pytest.mark.parametrize("vocab, message", [
    (None, "config lacks a positive integer 'vocab_size'"),
    (0, "'vocab_size' must be positive, got 0"),
    (True, "'vocab_size' must be an integer within 0..4194304, got True"),
    ("512", "'vocab_size' must be an integer within 0..4194304, got '512'"),
])
def test_a_config_without_a_usable_vocab_size_is_named(vocab, message):
    config = {"model_type": "qwen3"} if vocab is None else {"model_type": "qwen3", "vocab_size": vocab}
    with pytest.raises(MixquantError) as e:
        embedding_rows(config, "m/config.json")
    assert str(e.value) == f"m/config.json: {message}"


def test_ids_up_to_the_last_row_pass_and_one_past_it_is_refused():
    check_token_ids(np.array([[0, 511], [3, 4]]), 512, "text.txt")
    check_token_ids(np.array([], dtype=np.int64), 512, "text.txt")
    with pytest.raises(MixquantError, match=r"^text.txt: the tokenizer gives token id 512, past the model's "
                                            r"512-row embedding \(tokenizer and weights do not belong together\)$"):
        check_token_ids(np.array([[0, 511], [512, 4]]), 512, "text.txt")


def test_a_chat_model_whose_tokenizer_reaches_past_the_embedding_is_refused(tiny_models, tmp_path):
    from conftest import run_cli

    from mixquant.loading import load
    from mixquant.runtime.chat import Model

    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", tmp_path / "q", "--drop-mtp") == 0
    loaded = load(tmp_path / "q")
    top = max(loaded.tokenizer.get_vocab().values())
    assert top >= 512
    with pytest.raises(MixquantError, match=f"q: the tokenizer gives token id {top}, past the model's 512-row"):
        Model(loaded)
