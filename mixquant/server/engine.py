"""The server's decoding engine: one model, every request decoded together.

A worker thread owns the model. Requests arrive as Jobs; without MTP they are decoded by mlx-lm's
BatchGenerator (continuous batching: a request joins the running batch at the next step and leaves
it when done or cancelled). With MTP, jobs are decoded one after another, speculatively.

A prefix cache shared by all requests keeps prompt caches (KV for attention, the recurrent state
for Gated DeltaNet) keyed by the exact tokens they hold: taken where a conversation ends and the
generation prompt begins, and after each reply. A request starts from the longest kept prefix of
its prompt and prefills only the rest; Gated DeltaNet state is never trimmed, only restored whole.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from dataclasses import dataclass, field

from mixquant.runtime.chat import restore_cache, snapshot_cache, snapshot_nbytes
from mixquant.runtime.sampling import Sampling

log = logging.getLogger(__name__)
END = None  # what a job's queue receives after its last token
PREFILL_CHUNK = 512  # prompt tokens per forward at most, when prefilling and when scoring a prompt
MIN_PREFILL_CHUNK = 64  # the fewest a long context's chunk is cut down to


@dataclass(frozen=True)
class PrefillCost:
    """A forward's FLOPs: `per_token` for each token's projections, `per_key` for each (token,
    earlier position) pair the attention layers score and mix."""

    per_token: float
    per_key: float

    def of(self, n: int, offset: int) -> float:
        """n tokens at positions offset..offset+n-1."""
        return n * self.per_token + self.per_key * n * (offset + (n + 1) / 2)


def prefill_cost(model) -> PrefillCost | None:
    """The prefill cost of a mixquant.runtime.chat.Model, from its family's attention layers and the
    sizes of its linear layers (the output head left out: prefill does not run it; an MoE's expert
    stacks are not linear layers, so its chunks are cut by attention somewhat more than they need);
    None for a family mixquant does not describe."""
    import mlx.nn as nn

    from mixquant.arch import family_for_config
    from mixquant.errors import MixquantError

    try:
        family = family_for_config(model.loaded.config, model.path)
    except MixquantError:
        return None
    if family.attention is None:
        return None
    a = family.attention(model.loaded.config, model.path)
    linear = 0
    for _, m in model.model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            out_features, packed = m.weight.shape[-2:]
            in_features = packed * 32 // m.bits if isinstance(m, nn.QuantizedLinear) else packed
            if out_features != model.vocab_rows:
                linear += out_features * in_features
    return PrefillCost(per_token=2.0 * linear, per_key=4.0 * a.layers * a.heads * a.head_dim)


def prefill_pieces(n_tokens: int, offset: int, cost: PrefillCost | None, chunk: int = PREFILL_CHUNK) -> list[int]:
    """The sizes `n_tokens` prompt tokens from position `offset` are prefilled in, one piece per
    decoding step: `chunk` tokens, fewer where the context is long, so that no piece costs more than
    `chunk` tokens at the start of a context (down to MIN_PREFILL_CHUNK). A later chunk attends to
    more positions; equal-cost pieces keep each step, and so every other stream's wait, the same."""
    budget = cost.of(chunk, 0) if cost is not None else None
    sizes = []
    while n_tokens > 0:
        n = chunk
        if cost is not None and cost.per_key > 0:
            b = cost.per_token + cost.per_key * (offset + 0.5)
            n = int((-b + math.sqrt(b * b + 2 * cost.per_key * budget)) / cost.per_key)
            n = max(min(n, chunk), MIN_PREFILL_CHUNK)
        n = min(n, n_tokens)
        sizes.append(n)
        n_tokens -= n
        offset += n
    return sizes


@dataclass(frozen=True)
class Step:
    """One token as decoded: its id and, when the job asked for them, its log-probability under the
    model (after the job's logits processors) and the `top` most likely tokens, best first."""

    token: int
    logprob: float | None = None
    top: tuple = ()  # ((token, logprob), ...)


def step_of(token: int, logprobs, top: int | None) -> Step:
    """The Step for `token` from the log-softmax `logprobs` [V] it was drawn from (top None: the
    token alone)."""
    import mlx.core as mx

    if top is None:
        return Step(int(token))
    lp = logprobs.astype(mx.float32)
    best = ()
    if top > 0:
        k = min(top, lp.shape[-1])
        idx = mx.argpartition(-lp, k - 1)[:k]
        vals = lp[idx]
        order = mx.argsort(-vals)
        best = tuple(zip(idx[order].tolist(), vals[order].tolist()))
    return Step(int(token), float(lp[int(token)].item()), best)


@dataclass
class Job:
    prompt: list[int]
    boundary: int | None  # where the conversation before the generation prompt ends, if it does
    max_tokens: int
    sampling: Sampling
    processors: list
    deliver: object  # called from the worker with each Step, then END (or an exception)
    seed: int | None = None  # its own random key, whatever else is decoded meanwhile
    top_logprobs: int | None = None  # None: no log-probabilities; else how many alternatives per token
    uid: int | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cancelled: bool = False
    segments_to_boundary: int = 0  # prompt segments up to `boundary`, where the cache is kept (0: not kept)
    spec: dict | None = None  # what it was built from (mixquant.server.generation.job_spec)
    seq: int | None = None  # under --shard: its number in rank 0's order


def job_of(model, spec: dict, deliver) -> Job:
    """The Job for a mixquant.server.generation.job_spec (rank 0 builds its jobs so, and the other
    ranks theirs from the same spec)."""
    from mixquant.runtime.sampling import logit_bias

    processors = model.processors(*spec["penalties"])
    if spec["logit_bias"]:
        processors.append(logit_bias(dict(spec["logit_bias"])))
    if spec["grammar"] is not None:
        from mixquant.runtime.grammar import SchemaMask

        processors.append(SchemaMask(model.token_table, spec["grammar"]))
    return Job(spec["prompt"], spec["boundary"], spec["max_tokens"], model.sampling(*spec["sampling"]), processors,
               deliver=deliver, seed=spec["seed"], top_logprobs=spec["top_logprobs"], spec=spec)


@dataclass
class _Entry:
    tokens: tuple
    snapshot: list
    nbytes: int


@dataclass
class PrefixCache:
    """Prompt-cache snapshots by the tokens they hold, least recently used dropped first."""

    max_bytes: int
    entries: list = field(default_factory=list)  # most recently used last
    evicted: list | None = None  # when a list: the keys dropped, for the other ranks to drop too

    def drop(self, key: tuple) -> None:
        self.entries = [e for e in self.entries if e.tokens != key]

    def lookup(self, prompt: list[int]):
        """The longest kept snapshot whose tokens are a proper prefix of `prompt`: (its length, the
        snapshot), or (0, None)."""
        best = None
        for e in self.entries:
            n = len(e.tokens)
            if n < len(prompt) and (best is None or n > len(best.tokens)) and tuple(prompt[:n]) == e.tokens:
                best = e
        if best is None:
            return 0, None
        self.entries.remove(best)
        self.entries.append(best)
        return len(best.tokens), best.snapshot

    def store(self, tokens: list[int], cache) -> None:
        key = tuple(tokens)
        if not key:
            return
        self.drop(key)
        snap = snapshot_cache(cache)
        nbytes = snapshot_nbytes(snap)
        self.entries.append(_Entry(key, snap, nbytes))
        while sum(e.nbytes for e in self.entries) > self.max_bytes and len(self.entries) > 1:
            gone = self.entries.pop(0)
            if self.evicted is not None:
                self.evicted.append(gone.tokens)


class Engine:
    """The decoding worker. With `group` (the model split over processes, mixquant.distributed),
    every rank runs one and they take the same steps: rank 0's, whose server feeds it, hands what
    it takes from its inbox to the others at every step (broadcast as JSON); the others
    (follow()) decode alongside and deliver nothing."""

    def __init__(self, model, *, max_concurrency: int = 16, mtp: int = 0, cache_bytes: int = 2 << 30, group=None):
        from mixquant.distributed import is_main

        self.model = model
        self.max_concurrency = max_concurrency
        self.mtp = mtp
        # split: rank 0 alone decides what the prefix cache drops (a pipeline rank's share of a
        # snapshot has its own size); the others drop what it dropped
        self.prefix = (PrefixCache(cache_bytes, evicted=[] if group is not None else None) if is_main(group)
                       else PrefixCache(1 << 62))
        self.group = group
        self.cost = self._same_cost(prefill_cost(model))
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict[int, Job] = {}
        self.closing = False
        self._followed: dict[int, Job] = {}  # a follower's copies of rank 0's jobs, by seq
        self._seq = 0
        self.thread = threading.Thread(target=self._run, name="mixquant-engine", daemon=True)
        if is_main(group):
            self.thread.start()

    def follow(self) -> None:
        """A rank other than 0: decode rank 0's requests alongside it until it closes."""
        self._run()

    def _same_cost(self, cost):
        """Rank 0's prefill cost on every rank: a pipeline rank holds other layers, and the prompt
        pieces must be the same everywhere."""
        if self.group is None:
            return cost
        import numpy as np

        from mixquant.distributed import broadcast

        given = np.array([-1.0, -1.0] if cost is None else [cost.per_token, cost.per_key], np.float64)
        per_token, per_key = broadcast(given, self.group)
        return None if per_token < 0 else PrefillCost(float(per_token), float(per_key))

    # -- called from the server's event loop ----------------------------------------------------
    def submit(self, job: Job) -> None:
        self.inbox.put(("job", job))

    def score(self, tokens: list[int], top: int, deliver) -> None:
        """The log-probability of every token of `tokens` after the ones before it (with the `top`
        alternatives), computed between decoding steps: `deliver` gets the list of Steps for
        tokens[1:], or an exception."""
        self.inbox.put(("score", (tokens, top, deliver)))

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        self.inbox.put(("cancel", job))

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; in-flight jobs are ended (their streams close) and the worker exits."""
        self.closing = True
        self.inbox.put(("close", None))
        self.thread.join(timeout)

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        if self.mtp:
            self._run_sequential()
        else:
            self._run_batched()

    def _end(self, job: Job, error: Exception | None = None) -> None:
        self.active.pop(job.uid, None)
        self._followed.pop(job.seq, None)
        job.deliver(error if error is not None else END)

    def _generator(self):
        """mlx-lm's BatchGenerator: each step decodes one token of every running request, then feeds
        one piece (prefill_pieces) of each prompt waiting, so a long prompt does not hold others up."""
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(self.model.model, completion_batch_size=self.max_concurrency,
                              prefill_batch_size=min(8, self.max_concurrency), prefill_step_size=PREFILL_CHUNK,
                              stop_tokens=[[t] for t in sorted(self.model.eos_ids)])

    def _run_batched(self) -> None:
        gen = self._generator()
        jobs: dict[int, Job] = {}
        while True:
            for kind, job in self._take(block=not jobs):
                if kind == "close":
                    for j in list(jobs.values()):
                        self._end(j)
                    gen.close()
                    return
                if kind == "score":
                    self._score(*job)
                    continue
                if kind == "cancel":
                    if job.uid in jobs:
                        gen.remove([job.uid])
                        self._end(jobs.pop(job.uid))
                    continue
                if job.cancelled and self.group is None:  # split: rank 0's cancel message removes it everywhere
                    job.deliver(END)
                    continue
                try:
                    job.uid = self._insert(gen, job)
                except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
                    log.exception("could not start a request")
                    job.deliver(e)
                    continue
                jobs[job.uid] = job
                self.active[job.uid] = job
            if not jobs:
                continue
            try:
                prompt_responses, responses = gen.next()
            except Exception as e:  # noqa: BLE001 - every request in the batch fails, the engine goes on
                log.exception("decoding failed")
                for j in list(jobs.values()):
                    self._end(j, e)
                jobs.clear()
                gen.close()
                gen = self._generator()
                continue
            for r in prompt_responses:
                job = jobs.get(r.uid)
                if job is not None and r.end_of_segment and job.segments_to_boundary:
                    job.segments_to_boundary -= 1
                    if job.segments_to_boundary:
                        continue
                    cache, _ = gen.extract_cache([r.uid])[r.uid]
                    self.prefix.store(job.prompt[: job.boundary], cache)
            for r in responses:
                job = jobs.get(r.uid)
                if job is None:
                    continue
                job.deliver(step_of(r.token, r.logprobs, job.top_logprobs))
                if r.finish_reason is not None:
                    if r.prompt_cache is not None and r.all_tokens:
                        self.prefix.store(list(r.all_tokens), r.prompt_cache)
                    jobs.pop(r.uid)
                    self._end(job)

    def _insert(self, gen, job: Job) -> int:
        cached, snapshot = self.prefix.lookup(job.prompt)
        cache = restore_cache(self.model.model, snapshot) if snapshot is not None else self._fresh_cache()
        job.cached_tokens = cached
        rest = job.prompt[cached:]
        cut = job.boundary - cached if job.boundary and cached < job.boundary < len(job.prompt) else None
        parts = [rest[:cut], rest[cut:]] if cut else [rest]
        segments, start = [], cached
        for i, part in enumerate(parts):
            for n in prefill_pieces(len(part), start, self.cost):
                segments.append(job.prompt[start: start + n])
                start += n
            if cut and i == 0:
                job.segments_to_boundary = len(segments)
        (uid,) = gen.insert_segments([segments], max_tokens=[job.max_tokens], caches=[cache],
                                     all_tokens=[list(job.prompt[:cached])],
                                     samplers=[job.sampling.sampler(job.seed)],
                                     logits_processors=[job.processors])
        return uid

    def _run_sequential(self) -> None:
        """MTP: one job at a time on one session (the session's own kept state is the prefix cache);
        a seeded job seeds MLX's generator, which nothing else draws from meanwhile."""
        import mlx.core as mx

        from mixquant.runtime.chat import ChatSession

        session = ChatSession(self.model)
        count = 0
        while True:
            for kind, job in self._take(block=True):
                if kind == "close":
                    return
                if kind == "score":
                    self._score(*job)
                    continue
                if kind == "cancel" or job.cancelled:
                    if kind == "job":
                        job.deliver(END)
                    continue
                count += 1
                job.uid = count
                self.active[job.uid] = job
                try:
                    if job.seed is not None:
                        mx.random.seed(job.seed)
                    steps = self.model.stream(job.prompt, session, max_new_tokens=job.max_tokens,
                                              sampling=job.sampling, processors=job.processors,
                                              boundary=job.boundary, mtp=self.mtp)
                    job.cached_tokens = -1
                    for token in steps:
                        if job.cached_tokens == -1:
                            job.cached_tokens = len(job.prompt) - session.last_prefill
                        job.deliver(Step(token))
                        if job.cancelled or self.closing or token in self.model.eos_ids:
                            break
                    steps.close()
                    self._end(job)
                except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
                    log.exception("decoding failed")
                    session.reset()
                    self._end(job, e)

    def _fresh_cache(self):
        """None (BatchGenerator makes the model's own), or with --kv-bits the model's cache whose
        attention layers hold MixedKVCaches, which merge into a batch (mixquant.runtime.kvcache)."""
        from mlx_lm.models.cache import make_prompt_cache

        kv = self.model.kv
        return None if kv is None else kv.adopt(make_prompt_cache(self.model.model), mixed=True)

    def _score(self, tokens: list[int], top: int, deliver) -> None:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        try:
            cache = self._fresh_cache() or make_prompt_cache(self.model.model)
            steps = []
            for start in range(0, len(tokens) - 1, PREFILL_CHUNK):
                chunk = tokens[start: start + PREFILL_CHUNK + 1]
                logits = self.model.model(mx.array(chunk[:-1])[None], cache=cache)[0].astype(mx.float32)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                steps += [step_of(t, logprobs[i], top) for i, t in enumerate(chunk[1:])]
            deliver(steps)
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            log.exception("scoring failed")
            deliver(e)

    def _take(self, block: bool) -> list:
        """Messages waiting in the inbox (waiting for one when `block`); under a group, rank 0's on
        every rank."""
        from mixquant.distributed import is_main

        if self.group is None:
            return self._inbox(block)
        if is_main(self.group):
            messages = self._inbox(block)
            dropped = [{"kind": "drop", "tokens": list(key)} for key in self.prefix.evicted]
            self.prefix.evicted.clear()
            self._shared(dropped + [self._said(kind, item) for kind, item in messages])
            return messages
        heard = []
        for message in self._shared(None):
            if message["kind"] == "drop":
                self.prefix.drop(tuple(message["tokens"]))
            else:
                heard.append(self._heard(message))
        return heard

    def _said(self, kind: str, item) -> dict:
        if kind == "job":
            self._seq += 1
            item.seq = self._seq
            return {"kind": kind, "seq": item.seq, "spec": item.spec}
        if kind == "cancel":
            return {"kind": kind, "seq": item.seq}
        if kind == "score":
            return {"kind": kind, "tokens": list(item[0]), "top": item[1]}
        return {"kind": kind}

    def _heard(self, message: dict):
        kind = message["kind"]
        if kind == "job":
            job = job_of(self.model, message["spec"], deliver=_ignore)
            job.seq = message["seq"]
            self._followed[job.seq] = job
            return kind, job
        if kind == "cancel":
            return kind, self._followed.pop(message["seq"], Job([], None, 0, None, [], _ignore))
        if kind == "score":
            return kind, (message["tokens"], message["top"], _ignore)
        return kind, None

    def _shared(self, messages: list | None) -> list:
        """Rank 0's `messages` on every rank (the others pass None). mlx-lm's BatchGenerator has the
        next step in flight (async_eval), its collectives among them: that finishes first, so that
        every rank meets the collectives in one order."""
        import mlx.core as mx
        import numpy as np
        from mlx_lm.generate import generation_stream

        from mixquant.distributed import broadcast

        mx.synchronize(generation_stream)
        mx.synchronize()

        raw = np.frombuffer(json.dumps(messages).encode(), np.uint8) if messages is not None else np.zeros(0, np.uint8)
        return json.loads(broadcast(raw, self.group).tobytes().decode())

    def _inbox(self, block: bool) -> list:
        out = []
        try:
            out.append(self.inbox.get(block=block, timeout=0.5 if block else None))
            while True:
                out.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return out


def _ignore(item) -> None:
    """A follower's deliver: rank 0 answers the client."""
