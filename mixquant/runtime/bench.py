"""Speed of a model as a user runs it: prefill and decode tokens per second, multi-turn decode
after cache reuse, peak memory. Native kernels (no dequantization), through `Model.stream`: the
path `chat` decodes on (mlx-lm's generate_step on a ChatSession's cache).

Decode is measured in steady state: the first WARMUP_TOKENS of each generation are not timed.
Each figure is the median over repeats; with --compare the two models alternate repeat by repeat
in one process, so drift on a noisy machine hits both alike. With --mtp, plain decoding and MTP
speculative decoding at each depth alternate the same way on one loaded model, and the drafts'
acceptance is counted by position.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixquant.bundled import EVAL_TEXT
from mixquant.errors import MixquantError

WARMUP_TOKENS = 4


@dataclass
class BenchConfig:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    turns: int = 4
    turn_tokens: int = 64  # new user tokens added per later turn
    repeats: int = 3


@dataclass
class Runs:
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    last_turn_decode: list[float] = field(default_factory=list)
    peak_memory: int = 0


def prompt_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    """n tokens of the bundled text from `offset`."""
    ids = tokenizer.encode(EVAL_TEXT.read_text(encoding="utf-8"))
    if len(ids) < offset + n:
        raise MixquantError(f"the bundled text has {len(ids)} tokens, fewer than {offset + n}")
    return list(ids[offset : offset + n])


def _generate(model, session, new_tokens: list[int], gen_tokens: int, mtp: int = 0, stats=None,
              sampling=None, fixed: bool = True) -> tuple[float, float]:
    """Prefill `new_tokens` after what the session holds, decode `gen_tokens` (greedily unless
    `sampling`); returns (prefill tok/s, decode tok/s)."""
    from mixquant.runtime.sampling import GREEDY

    prompt = session.tokens + new_tokens
    t0 = time.perf_counter()
    times = []
    for _ in model.stream(prompt, session, max_new_tokens=gen_tokens, mtp=mtp, stats=stats,
                          sampling=sampling or GREEDY, mtp_fixed=fixed):
        times.append(time.perf_counter())
    prefill = len(new_tokens) / (times[0] - t0)
    timed = times[WARMUP_TOKENS:]
    decode = (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    return prefill, decode


def run_once(model, cfg: BenchConfig, runs: Runs, mtp: int = 0, stats=None, offset: int = 0,
             sampling=None, fixed: bool = True) -> None:
    """One conversation of cfg.turns turns, its prompt from the bundled text at token `offset`."""
    import mlx.core as mx

    from mixquant.runtime.chat import ChatSession

    mx.reset_peak_memory()
    session = ChatSession(model)
    prefill, decode = _generate(model, session, prompt_ids(model.tokenizer, cfg.prompt_tokens, offset),
                                cfg.gen_tokens, mtp, stats, sampling, fixed)
    runs.prefill.append(prefill)
    runs.decode.append(decode)
    last = decode
    offset += cfg.prompt_tokens
    for _ in range(cfg.turns - 1):  # later turns prefill only their new tokens on top of the kept cache
        _, last = _generate(model, session, prompt_ids(model.tokenizer, cfg.turn_tokens, offset), cfg.gen_tokens,
                            mtp, stats, sampling, fixed)
        offset += cfg.turn_tokens
    runs.last_turn_decode.append(last)
    runs.peak_memory = max(runs.peak_memory, mx.get_peak_memory())


def summarize(path: Path, runs: Runs, cfg: BenchConfig) -> dict:
    return {
        "model": str(path),
        "prefill_tok_s": statistics.median(runs.prefill),
        "decode_tok_s": statistics.median(runs.decode),
        f"turn{cfg.turns}_decode_tok_s": statistics.median(runs.last_turn_decode),
        "peak_memory_bytes": runs.peak_memory,
        "repeats": len(runs.decode),
    }


def load_for_bench(path: Path, mtp: bool = False, native: bool = False, kv=None, shard=None):
    """A chat Model as `chat` loads it (`native`: with the quantized kernels on any backend; kv: a
    mixquant.runtime.kv.KVQuant, or None; shard: a mixquant.distributed.Shard)."""
    from mixquant.runtime.chat import load_model

    return load_model(Path(path), mtp=mtp, native=native, kv=kv, shard=shard)


def bench(paths: list[Path], cfg: BenchConfig, native: bool = False, kv=None, shard=None) -> list[dict]:
    """Benchmark one model, or several alternating repeat by repeat (shard: each split over the
    processes, as mixquant.distributed.Shard says)."""
    if cfg.gen_tokens <= WARMUP_TOKENS + 1:
        raise MixquantError(f"--gen-tokens must be above {WARMUP_TOKENS + 1} (the first {WARMUP_TOKENS} are warm-up)")
    models = [load_for_bench(p, native=native, kv=kv, shard=shard) for p in paths]
    runs = [Runs() for _ in paths]
    for model in models:  # one untimed pass each: compile, page in, allocate
        run_once(model, BenchConfig(min(cfg.prompt_tokens, 32), WARMUP_TOKENS + 2, 1), Runs())
    for _ in range(cfg.repeats):
        for model, r in zip(models, runs):
            run_once(model, cfg, r)
    return [{**summarize(p, r, cfg), "cache": cache_of(m)} for p, r, m in zip(paths, runs, models)]


CACHE_PROBE = (256, 512)  # prefill lengths whose caches' bytes give the cost per token (whole buffers)


def cache_of(model) -> dict:
    """The cache of one sequence as this model keeps it (its KV settings, quantized from the first
    token), measured: the nbytes of its caches after prefills of CACHE_PROBE tokens give the bytes
    per token and the fixed bytes; with the loaded weights' bytes, the totals at kvbytes.CONTEXTS."""
    import dataclasses

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    from mixquant.kvbytes import CONTEXTS

    kv = dataclasses.replace(model.kv, start=0) if model.kv is not None else None
    sizes = []
    for n in CACHE_PROBE:
        cache = make_prompt_cache(model.model)
        if kv is not None:
            kv.adopt(cache)
        model.model(mx.array([[0] * (n - 1)]), cache=cache)
        if kv is not None:
            kv.apply(cache)
        model.model(mx.array([[0]]), cache=cache)
        mx.eval([c.state for c in cache])
        sizes.append(sum(c.nbytes for c in cache))
    per_token = (sizes[1] - sizes[0]) / (CACHE_PROBE[1] - CACHE_PROBE[0])
    fixed = sizes[0] - per_token * CACHE_PROBE[0]
    weights = sum(v.nbytes for _, v in tree_flatten(model.model.parameters()))
    return {"kv": "float" if kv is None else kv.describe(), "bytes_per_token": per_token, "fixed_bytes": int(fixed),
            "weights_bytes": weights, "contexts": {n: int(fixed + per_token * n) for n in CONTEXTS}}


def format_cache(c: dict) -> list[str]:
    lines = [f"cache per sequence ({c['kv']}): {c['bytes_per_token'] / 1024:.2f} KiB per token, "
             f"{c['fixed_bytes'] / 1e6:.2f} MB fixed; weights as loaded {c['weights_bytes'] / 1e9:.3f} GB"]
    lines += [f"  at {n // 1024}k tokens: cache {b / 1e9:.3f} GB, with the weights {(b + c['weights_bytes']) / 1e9:.3f} GB"
              for n, b in c["contexts"].items()]
    return lines


def format_table(results: list[dict], cfg: BenchConfig) -> str:
    turn_key = f"turn{cfg.turns}_decode_tok_s"
    lines = [f"{'model':<40} {'prefill tok/s':>14} {'decode tok/s':>13} {f'turn {cfg.turns} decode':>14} "
             f"{'peak MB':>9}"]
    for r in results:
        lines.append(f"{Path(r['model']).name[:40]:<40} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} "
                     f"{r[turn_key]:>14.2f} {r['peak_memory_bytes'] / 1e6:>9.1f}")
    if len(results) == 2:
        a, b = results
        lines.append(f"ratio (second / first): prefill {b['prefill_tok_s'] / a['prefill_tok_s']:.3f}, "
                     f"decode {b['decode_tok_s'] / a['decode_tok_s']:.3f}, "
                     f"turn {cfg.turns} decode {b[turn_key] / a[turn_key]:.3f}")
    return "\n".join(lines)


MTP_PROMPT_STRIDE = 1000  # tokens between the bundled-text prompts of successive repeats


def bench_mtp(path: Path, cfg: BenchConfig, depths: list[int], model=None, sampled: bool = False,
              native: bool = False) -> dict:
    """Plain decoding and MTP speculative decoding at each depth, alternating on one loaded model
    (`model`: a chat Model loaded with its MTP head; default: `path` as chat loads it), each repeat
    on another prompt; greedy, or sampled with the model's generation_config (`sampled`, seeded).
    The speed-up is the median over repeats of MTP tok/s over plain tok/s on the same prompt."""
    import mlx.core as mx

    from mixquant.runtime.mtp import DEFAULT_DEPTH, Stats, check_depth

    for d in depths:
        check_depth(d)
    if cfg.gen_tokens <= WARMUP_TOKENS + 1:
        raise MixquantError(f"--gen-tokens must be above {WARMUP_TOKENS + 1} (the first {WARMUP_TOKENS} are warm-up)")
    model = model or load_for_bench(path, mtp=True, native=native)
    sampling = model.sampling() if sampled else None
    modes = [(0, True), (DEFAULT_DEPTH, False)] + [(d, True) for d in depths]  # (depth, fixed); 0: plain
    runs = {m: Runs() for m in modes}
    stats = {m: Stats() for m in modes}
    for depth, fixed in modes:
        run_once(model, BenchConfig(min(cfg.prompt_tokens, 32), WARMUP_TOKENS + 2, 1), Runs(), depth, Stats(),
                 fixed=fixed)
    for r in range(cfg.repeats):
        for m in modes:
            mx.random.seed(r)
            run_once(model, cfg, runs[m], m[0], stats[m], offset=r * MTP_PROMPT_STRIDE, sampling=sampling,
                     fixed=m[1])
    plain = summarize(path, runs[(0, True)], cfg)

    def row(mode):
        r = summarize(path, runs[mode], cfg)
        ratios = [a / b for a, b in zip(runs[mode].decode, runs[(0, True)].decode)]
        st = stats[mode]
        r.update(depth=mode[0], speedup=statistics.median(ratios), speedups=ratios,
                 acceptance=st.acceptance()[:mode[0]], tokens_per_round=st.emitted / max(st.rounds, 1))
        return r

    rows = [row((d, True)) for d in depths]
    best = max(rows, key=lambda r: r["speedup"])
    return {"plain": plain, "adaptive": row((DEFAULT_DEPTH, False)), "mtp": rows, "best_depth": best["depth"],
            "sampled": sampled, "sampling": None if sampling is None else vars(sampling)}


def format_mtp_table(result: dict) -> str:
    plain = result["plain"]
    lines = [f"{'decoding':<12} {'decode tok/s':>13} {'speed-up':>9} {'tokens/round':>13}  acceptance by draft position",
             f"{'plain':<12} {plain['decode_tok_s']:>13.2f} {1.0:>9.3f} {1.0:>13.2f}"]
    auto = result["adaptive"]
    lines.append(f"{'mtp (default)':<12} {auto['decode_tok_s']:>13.2f} {auto['speedup']:>9.3f} "
                 f"{auto['tokens_per_round']:>13.2f}  up to depth {auto['depth']}, as measured fastest (plain steps "
                 "count as rounds)")
    for r in result["mtp"]:
        acc = ", ".join("-" if a is None else f"{a:.1%}" for a in r["acceptance"])
        lines.append(f"{'mtp depth ' + str(r['depth']):<12} {r['decode_tok_s']:>13.2f} {r['speedup']:>9.3f} "
                     f"{r['tokens_per_round']:>13.2f}  {acc}")
    lines.append(f"best depth: {result['best_depth']}")
    return "\n".join(lines)
