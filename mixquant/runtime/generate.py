"""Plain text generation on mlx-lm's model classes (the chat runtime builds on this)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mixquant.errors import MixquantError


def load_model(path: Path):
    from mlx_lm import load

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MixquantError(f"{path}: not a model folder (no config.json)")
    return load(str(path))


def generate_text(path: Path, prompt: str, max_tokens: int = 64) -> Iterator[str]:
    """Greedy continuation of `prompt`, yielded piece by piece as it decodes."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load_model(path)
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0)):
        yield response.text
