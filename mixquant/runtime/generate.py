"""Plain greedy text continuation on mlx-lm's model classes (`mixquant generate`, the demo)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def generate_text(path: Path, prompt: str, max_tokens: int = 64, native: bool = False,
                  kv=None, shard=None) -> Iterator[str]:
    """Greedy continuation of `prompt`, yielded piece by piece as it decodes (kv: a
    mixquant.runtime.kv.KVQuant, or None; shard: a mixquant.distributed.Shard, the model split
    over processes: every rank decodes the same tokens)."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mixquant.loading import load_for_running, say_compute_path
    from mixquant.vocab import check_tokenizer, embedding_rows

    loaded = load_for_running(path, native=native, shard=shard)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_tokenizer(tokenizer, embedding_rows(loaded.config, path), str(path))
    say_compute_path(loaded)
    from mlx_lm.models.cache import make_prompt_cache

    extra = {} if kv is None else kv.args() if kv.uniform else {"prompt_cache": kv.adopt(make_prompt_cache(model))}
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0),
                                    **extra):
        yield response.text
