"""Token ids against the model's token embedding. MLX does not check the index of a lookup: an id
past the embedding's last row (a tokenizer that does not belong to the weights) reads outside the
array, so every place that feeds text to a model checks its ids here first."""

from __future__ import annotations

import numpy as np

from mixquant.arch import family_for_config
from mixquant.errors import MixquantError


def embedding_rows(config: dict, config_path) -> int:
    """The rows of the model's token embedding: its config's vocab_size."""
    family = family_for_config(config, config_path)
    text = family.text_config(config) if family.text_config is not None else config
    rows = text.get("vocab_size")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
        raise MixquantError(f"{config_path}: config lacks a positive integer 'vocab_size'")
    return rows


def check_tokenizer(tokenizer, rows: int, where: str) -> None:
    """Refuse a tokenizer that has any id past the embedding (its added tokens included): the check
    of a model that will encode text it has not seen yet (chat, serve, generate, bench)."""
    check_token_ids(np.fromiter(tokenizer.get_vocab().values(), dtype=np.int64), rows, where)


def check_token_ids(ids: np.ndarray, rows: int, where: str) -> None:
    top = int(ids.max()) if ids.size else -1
    if top >= rows:
        raise MixquantError(f"{where}: the tokenizer gives token id {top}, past the model's {rows}-row "
                            "embedding (tokenizer and weights do not belong together)")
