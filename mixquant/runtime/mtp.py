"""Speculative decoding with the checkpoint's own multi-token-prediction head.

Each round the head drafts `depth` tokens after the last one picked; the main model then runs the
last token and the drafts in one pass, which gives its own choice at every position. Drafts are
kept while they agree with it (greedy: equal to its argmax; sampling: the speculative acceptance
rule, so the output distribution is the main model's), and the first position that disagrees
contributes the main model's token instead; if all agree, the pass's last position adds one more.

Rejected positions are rolled back exactly: attention layers trim their KV cache, Gated DeltaNet
layers return to the states they recorded after each position of the pass (the pass runs their
recurrence token by token, as plain decoding does; see mixquant.kernels). Taking those states costs
nothing extra; the other way, keeping the states from before the pass and running the accepted
tokens again, costs a second pass on every rejection (benchmarks/mtp.py measures both).

The head sees (main hidden state at t, token t+1) pairs at rope position t+1. Pairs the main model
produced are queued and fed to the head at the start of its next draft; the head's own further
drafts are trimmed from its cache once drafted. What the head has not seen (turns restored from a
snapshot) only lowers acceptance: output is decided by the main model alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_DEPTH = 2  # the best decode speed on the fixture (benchmarks/mtp.py, docs/RESULTS.md)
MAX_DEPTH = 4
CAPTURE, RECOMPUTE = "capture", "recompute"


@dataclass
class Stats:
    """Drafts proposed and accepted by position in the round (0: the first draft)."""

    proposed: list[int] = field(default_factory=lambda: [0] * MAX_DEPTH)
    accepted: list[int] = field(default_factory=lambda: [0] * MAX_DEPTH)
    rounds: int = 0
    emitted: int = 0

    def acceptance(self) -> list[float | None]:
        return [a / p if p else None for a, p in zip(self.accepted, self.proposed)]

    def add(self, other: "Stats") -> None:
        for i in range(MAX_DEPTH):
            self.proposed[i] += other.proposed[i]
            self.accepted[i] += other.accepted[i]
        self.rounds += other.rounds
        self.emitted += other.emitted


class Adaptive:
    """Chooses each round's draft depth from what decoding has measured: tokens per second at every
    depth in `depths` (0: plain decoding, one token per step), kept as decayed sums. Every depth is
    tried for a few rounds first (its very first round, which pays for MLX's first use of that
    shape, is not counted); then the fastest is used, and the others are measured afresh for a few
    rounds after `period` tokens (twice as long after each trial that changes nothing), so a depth
    that has become faster is found while a slower one costs little."""

    TRIAL_ROUNDS = 2
    PERIOD, MAX_PERIOD = 128, 2048
    DECAY = 0.7

    def __init__(self, depths):
        self.depths = sorted(set(depths))
        self.tokens = {d: 0.0 for d in self.depths}
        self.seconds = {d: 0.0 for d in self.depths}
        self.trials = [d for d in self.depths for _ in range(self.TRIAL_ROUNDS + 1)]
        self.warm: set[int] = set()
        self.period, self.since = self.PERIOD, 0
        self.best = None

    def rate(self, depth: int) -> float:
        return self.tokens[depth] / self.seconds[depth] if self.seconds[depth] > 0 else 0.0

    def next_depth(self) -> int:
        if self.trials:
            return self.trials.pop(0)
        if self.since >= self.period:
            self.since = 0
            challengers = [d for d in self.depths if d != self.best]
            for d in challengers:
                self.tokens[d] = self.seconds[d] = 0.0
            self.trials = [d for d in challengers for _ in range(self.TRIAL_ROUNDS)]
            return self.next_depth() if self.trials else self.best
        return self.best

    def record(self, depth: int, tokens: int, seconds: float) -> None:
        self.since += tokens
        if depth not in self.warm:
            self.warm.add(depth)
        else:
            self.tokens[depth] = self.DECAY * self.tokens[depth] + tokens
            self.seconds[depth] = self.DECAY * self.seconds[depth] + seconds
        if not self.trials:
            best = max(self.depths, key=self.rate)
            if self.best is not None:
                self.period = self.PERIOD if best != self.best else min(2 * self.period, self.MAX_PERIOD)
            self.best = best


def check_depth(depth: int) -> int:
    from mixquant.errors import MixquantError

    if not 1 <= depth <= MAX_DEPTH:
        raise MixquantError(f"mtp depth: must be 1..{MAX_DEPTH}, got {depth}")
    return depth


class _At:
    """The head's KV cache as its attention sees it: rope offset at `position`, storage unchanged."""

    def __init__(self, kv, position: int):
        self.kv, self.offset = kv, position

    def update_and_fetch(self, keys, values):
        return self.kv.update_and_fetch(keys, values)


class Drafter:
    """One conversation's MTP head state: its KV cache and the pairs it has not seen yet."""

    def __init__(self, parts):
        self.parts = parts
        self.reset()

    def reset(self) -> None:
        from mlx_lm.models.cache import KVCache

        self.kv = KVCache()
        self.queue: list[tuple] = []  # (hidden [1, n, H], token ids [n], rope position of the first)
        self.out, self.position = None, None  # the head's output at the last pair it ran over, and where

    def push(self, hidden, tokens: list[int], position: int) -> None:
        self.queue.append((hidden, tokens, position))

    def _step(self, hidden, tokens, position: int):
        from mlx_lm.models.base import create_attention_mask

        mask = create_attention_mask(hidden, self.kv)
        return self.parts.head(self.parts.embed(tokens), hidden, mask, _At(self.kv, position))

    def backlog(self) -> int:
        """Pairs queued that the head has not run over yet."""
        return sum(len(tokens) for _, tokens, _ in self.queue)

    def catch_up(self) -> None:
        """Run the head over the queued pairs (its output at the last one is what drafting starts from)."""
        import mlx.core as mx

        for hidden, tokens, position in self.queue:
            self.out = self._step(hidden, mx.array([tokens]), position)
            self.position = position + len(tokens)
        self.queue = []

    def draft(self, depth: int, sampling):
        """`depth` draft tokens (a lazy [depth] array) and, when sampling, their distributions [depth, V]."""
        import mlx.core as mx

        self.catch_up()
        out, position = self.out, self.position
        drafts, dists = [], []
        for j in range(depth):
            logits = self.parts.logits(out[:, -1:])[0, 0]
            if sampling.greedy:
                token = mx.argmax(logits)
            else:
                q = sampling.probs(logits)
                token = mx.random.categorical(mx.log(q))
                dists.append(q)
            drafts.append(token)
            if j + 1 < depth:
                out = self._step(out[:, -1:], token.reshape(1, 1), position + j)
        if depth > 1:
            self.kv.trim(depth - 1)  # its own drafts' entries: only main-model pairs stay
        return mx.stack(drafts), (mx.stack(dists) if dists else None)


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """Drafts up to the first that differs from the main model's argmax, then the main model's token."""
    a = 0
    while a < len(drafts) and drafts[a] == targets[a]:
        a += 1
    return drafts[:a] + [targets[a]]


def accept_sampled(p, q, drafts: list[int]) -> list[int]:
    """The speculative acceptance rule: draft i kept with probability min(1, p_i(d) / q_i(d)); the
    first one refused is replaced by a sample of max(0, p_i - q_i) renormalised; if none is refused,
    one more token from p_k. p [k+1, V] (main), q [k, V] (drafter) are the samplers' distributions."""
    import mlx.core as mx

    k = len(drafts)
    rows = mx.arange(k)
    idx = mx.array(drafts)
    u = mx.random.uniform(shape=(k,))
    keep = (u * q[rows, idx] <= p[:k][rows, idx]).tolist()
    a = keep.index(False) if False in keep else k
    if a == k:
        last = p[k]
    else:
        last = mx.maximum(p[a] - q[a], 0.0)
        if float(last.sum()) <= 0:  # p_a == q_a: refusal has probability 0; only rounding gets here
            last = p[a]
    return drafts[:a] + [int(mx.random.categorical(mx.log(last)))]


def _apply_processors(processors, context: list[int], logits):
    """Logits processors at each of the pass's positions, each seeing the tokens up to it."""
    import mlx.core as mx

    rows = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        seen = mx.array(context[: len(context) - logits.shape[0] + 1 + i])
        for proc in processors:
            row = proc(seen, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def _rewind(cache, keep: int, fed: int) -> None:
    """After a recorded pass of `fed` tokens, keep the first `keep`."""
    from mixquant.kernels import StepStates

    for c in cache:
        if isinstance(c, StepStates):
            c.rewind(keep - 1)
        else:
            c.trim(fed - keep)


def _record(cache, on: bool) -> None:
    from mixquant.kernels import StepStates

    for c in cache:
        if isinstance(c, StepStates):
            c.record = on
            c.steps = []


def speculative_steps(parts, session, fresh: list[int], *, max_new_tokens: int, sampling, processors=(),
                      depth: int = DEFAULT_DEPTH, stats: Stats | None = None, rollback: str = CAPTURE,
                      prefill_step: int = 512, chooser: "Adaptive | None" = None, kv=None):
    """Token ids decoded with drafts from `parts.head`, on `session.cache` (a recording cache) after
    feeding `fresh` (the prompt tokens it does not hold yet). `session.tokens` tracks what the cache
    holds, `session.drafter` the head's state. With a `chooser` (an Adaptive over 0, 1 and `depth`,
    kept with the model: how fast each depth decodes is the machine's and the model's, not one
    conversation's), each round drafts as many tokens as it measures fastest, 0 being a plain step,
    so speculation costs no more than its trial rounds where it does not pay; without one, `depth`
    tokens every round. `kv` (a mixquant.runtime.kv.KVQuant): the attention layers' cache quantized
    after each prefill chunk and each round, as mlx-lm's generate_step quantizes after each call;
    rejected positions are trimmed from the quantized cache as from a float one."""
    import time

    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache

    check_depth(depth)
    cache, drafter = session.cache, session.drafter
    stats = stats if stats is not None else Stats()
    context = list(fresh)  # what logits processors see: this call's prompt and output
    position = len(session.tokens)

    hidden = []
    for i in range(0, len(fresh), prefill_step):
        hidden.append(parts.body(mx.array([fresh[i : i + prefill_step]]), cache=cache))
        if kv is not None:
            kv.apply(cache)
        mx.eval(hidden[-1])
    hidden = mx.concatenate(hidden, axis=1)
    logits = parts.logits(hidden[:, -1:])[0]
    if processors:
        logits = _apply_processors(processors, context, logits)
    y = int(mx.argmax(logits[0]) if sampling.greedy else mx.random.categorical(mx.log(sampling.probs(logits[0]))))
    session.tokens += fresh
    drafter.push(hidden, fresh[1:] + [y], position + 1)
    position += len(fresh)  # y's position
    produced = 1
    yield y
    while produced < max_new_tokens:
        chosen = chooser.next_depth() if chooser is not None else depth
        if chosen and drafter.backlog() > depth + 1:  # a prompt or plain steps to catch up on: not the round's
            drafter.catch_up()
            mx.eval(drafter.out)
        start = time.perf_counter()
        k = min(chosen, max_new_tokens - produced)
        if k == 0:  # a plain step; the head is still shown the pair, so that drafting can resume
            hidden = parts.body(mx.array([[y]]), cache=cache)
            if kv is not None:
                kv.apply(cache)
            logits = parts.logits(hidden)[0]
            if processors:
                logits = _apply_processors(processors, context + [y], logits)
            token = int(mx.argmax(logits[0]) if sampling.greedy else
                        mx.random.categorical(mx.log(sampling.probs(logits[0]))))
            chooser.record(0, 1, time.perf_counter() - start)
            session.tokens.append(y)
            drafter.push(hidden, [token], position + 1)
            position += 1
            context.append(y)
            produced += 1
            stats.rounds += 1
            stats.emitted += 1
            yield token
            y = token
            continue
        drafted, q = drafter.draft(k, sampling)
        mx.async_eval(drafted)  # drafting runs while the verification pass is built
        fed = mx.concatenate([mx.array([y]), drafted])
        snapshot = [list(c.cache) if isinstance(c, ArraysCache) else None for c in cache] \
            if rollback == RECOMPUTE else None
        _record(cache, rollback == CAPTURE)
        hidden = parts.body(fed[None], cache=cache)
        logits = parts.logits(hidden)[0]
        if processors:
            logits = _apply_processors(processors, context + [y] + drafted.tolist(), logits)
        if sampling.greedy:  # one evaluation for the whole round: drafting, then verifying
            targets = mx.argmax(logits, axis=-1)
            mx.eval(drafted, targets)
            drafts = drafted.tolist()
            emitted = accept_greedy(targets.tolist(), drafts)
        else:
            drafts = drafted.tolist()
            emitted = accept_sampled(sampling.probs(logits), q, drafts)
        a = len(emitted) - 1
        if chooser is not None:
            chooser.record(chosen, a + 1, time.perf_counter() - start)
        if rollback == CAPTURE:
            _rewind(cache, a + 1, k + 1)
            _record(cache, False)
        elif a < k:
            for c, arrays in zip(cache, snapshot):
                if arrays is not None:
                    c.cache = arrays
                else:
                    c.trim(k + 1)
            hidden = parts.body(fed[None, : a + 1], cache=cache)
        if kv is not None:
            kv.apply(cache)
        stats.rounds += 1
        for i in range(k):
            stats.proposed[i] += 1
            stats.accepted[i] += i < a
        session.tokens += [y] + drafts[:a]
        drafter.push(hidden[:, : a + 1], emitted, position + 1)
        position += a + 1
        context += [y] + drafts[:a]
        for token in emitted:
            produced += 1
            stats.emitted += 1
            yield token
            if produced >= max_new_tokens:
                return
        y = emitted[-1]
