"""How the next token is picked: temperature, top-p, min-p and top-k, as mlx-lm's `make_sampler`
applies them (same functions, same order), plus the distribution that sampler draws from, which
speculative decoding needs to accept or reject a draft."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mixquant.errors import MixquantError

MAX_TEMPERATURE = 2.0  # OpenAI's bound, which the server's schema applies too


def check_sampling(where: str = "", temperature=None, top_p=None, top_k=None, min_p=None) -> None:
    """One check of the sampling settings for the CLI, the library and the server: each given one a
    finite number in its range."""
    prefix = f"{where}: " if where else ""
    for name, value, lo, hi in (("temperature", temperature, 0.0, MAX_TEMPERATURE), ("top_p", top_p, 0.0, 1.0),
                                ("min_p", min_p, 0.0, 1.0), ("top_k", top_k, 0, 1 << 31)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not lo <= value <= hi or (name == "top_k" and not float(value).is_integer()):
            raise MixquantError(f"{prefix}{name} must be a {'whole ' if name == 'top_k' else ''}number within "
                                f"{lo:g}..{hi:g}, got {value!r}")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler(self, seed: int | None = None):
        """mlx-lm's sampler for these settings (it takes log-probabilities); with `seed`, one that
        draws from its own random key, split at every step, so that a seeded request gives the same
        tokens run to run and whatever else is sampled meanwhile."""
        import mlx.core as mx
        from mlx_lm.sample_utils import make_sampler

        if seed is None:
            return make_sampler(temp=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p)
        if self.greedy:
            return lambda logprobs: mx.argmax(logprobs, axis=-1)
        key = mx.random.key(seed)

        def sample(logprobs):
            nonlocal key
            key, sub = mx.random.split(key)
            return mx.random.categorical(self._kept(logprobs) * (1 / self.temperature), key=sub)

        return sample

    def _kept(self, logprobs):
        """Log-probabilities with what top-p, min-p and top-k drop set to -inf, in mlx-lm's order."""
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs

    def probs(self, logits):
        """The distribution the sampler draws from, for logits [..., V]."""
        import mlx.core as mx

        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.softmax(self._kept(logprobs) * (1 / self.temperature), axis=-1)


GREEDY = Sampling()


def logit_bias(bias: dict[int, float]):
    """A logits processor (mlx-lm's form) adding `bias` {token id: value} to the logits."""
    import mlx.core as mx

    ids = mx.array(list(bias), dtype=mx.int32)
    values = mx.array(list(bias.values()), dtype=mx.float32)

    def apply(tokens, logits):
        return logits.at[..., ids].add(values.astype(logits.dtype))

    return apply
