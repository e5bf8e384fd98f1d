"""A measured per-layer KV cache allocation (`--kv-bits auto`).

For each attention layer and each of its two tensors (K, V), the cost of storing that tensor at
a width is measured alone: the mean KL divergence of the next-token distributions over `scored`
positions at the end of windows of `context` tokens, the cache prefilled in float and then packed,
against the float cache (the scored tokens decode as generation would, attending to the packed
cache). By default two widths per tensor are measured (REFERENCE) and the others' costs follow
from their squared errors on the tensor's own cached values (`scaled`: the power law through the
two measured points, and below them proportional to the squared error, as a small error's KL
divergence is);
`every_width` measures each width instead (tests/runtime/test_kv_layers.py compares the two). The widths are
then chosen by the weights' knapsack (mixquant.quant.allocate), costs assumed additive, under a budget of KV bytes per token: by default what uniform 4-bit (group 64)
takes. The result is data, stored in config.json's mixquant section and read by --kv-bits auto."""

from __future__ import annotations

import logging
import time

import numpy as np

from mixquant.errors import MixquantError
from mixquant.runtime.kv import FLOAT, LayerKV, Width

log = logging.getLogger(__name__)

WIDTHS = (Width(3, 64), Width(3, 32), Width(4, 128), Width(4, 64), Width(4, 32), Width(5, 64), Width(6, 64),
          Width(8, 64))  # every option a tensor may take, besides the model's dtype
BUDGET = Width(4, 64)  # the default budget: this width on every tensor
REFERENCE = (Width(3, 64), Width(5, 64))  # the widths measured per tensor, the others scaled from them
CONTEXT, SCORED, WINDOWS = 2048, 128, 2  # the measurement's windows
TOKENS_PER_UNIT = 128  # bytes are counted per this many tokens, so every width's are whole


def attention_layers(model) -> list[tuple[int, int, int]]:
    """(cache index, kv heads, head dim) of each layer whose cache grows with the context, read from
    a short forward (the caches' own shapes)."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0, 0]]), cache=cache)
    return [(i, c.keys.shape[1], c.keys.shape[3]) for i, c in enumerate(cache) if type(c) is KVCache]


def unit_bytes(heads: int, head_dim: int, w: Width, dtype_bytes: int) -> int:
    return int(round(TOKENS_PER_UNIT * heads * head_dim * w.element_bytes(dtype_bytes)))


def _logprobs(model, tokens: np.ndarray, cache) -> np.ndarray:
    import mlx.core as mx

    logits = model(mx.array(tokens[None].astype(np.int32)), cache=cache)[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).astype(np.float64)


def prefilled(model, tokens: np.ndarray, step: int = 512) -> list:
    """A float cache holding `tokens`."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for i in range(0, len(tokens), step):
        model(mx.array(tokens[None, i: i + step].astype(np.int32)), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def packed(model, snapshot: list, kv) -> list:
    """`snapshot` (chat.snapshot_cache of a float cache) restored and packed as `kv` (a KVQuant, or a
    {cache index: LayerKV}) would have it after its prefill: uniform, mlx-lm's QuantizedKVCache; per
    layer, MixedKVCaches holding the float contents, packed on their next call. None: float."""
    from mixquant.runtime.chat import restore_cache
    from mixquant.runtime.kvcache import MixedKVCache

    cache = restore_cache(model, snapshot)
    if kv is None:
        return cache
    if not isinstance(kv, dict):
        if kv.uniform:
            kv.apply(cache)
            return cache
        kv = dict(kv.layers)
    for i, spec in kv.items():
        c = cache[i]
        cache[i] = MixedKVCache.restored(spec, 0, False, (c.keys,), (c.values,), c.offset)
    return cache


def windows(tokens: np.ndarray, context: int, count: int) -> list[np.ndarray]:
    n = min(count, len(tokens) // context)
    if n < 1:
        raise MixquantError(f"KV measurement: the text has {len(tokens)} tokens, fewer than one window of {context}")
    return [tokens[i * context: (i + 1) * context] for i in range(n)]


def scored_windows(model, tokens: np.ndarray, context: int, scored: int, count: int):
    """Per window: (the float cache's snapshot after its first context - scored tokens, the last
    `scored` tokens, their log-probs on the float cache)."""
    from mixquant.runtime.chat import snapshot_cache

    if context <= scored:
        raise MixquantError(f"KV measurement: context {context} must exceed the {scored} scored tokens")
    for window in windows(tokens, context, count):
        head, tail = window[: context - scored], window[context - scored:]
        snap = snapshot_cache(prefilled(model, head))
        yield snap, tail, _logprobs(model, tail, packed(model, snap, None))


def evaluate(model, tokens: np.ndarray, settings: dict, context: int, scored: int, count: int) -> dict:
    """Per setting (name -> a `kv` as `packed` takes it): the next-token distributions with the cache
    packed so against the float cache, over the last `scored` positions of up to `count` windows of
    `context` tokens (metrics.summarize's report), every setting on the same prefilled windows."""
    from mixquant.eval import metrics

    chunks = {name: [] for name in settings}
    for snap, tail, ref in scored_windows(model, tokens, context, scored, count):
        for name, kv in settings.items():
            lp = _logprobs(model, tail, packed(model, snap, kv))
            chunks[name].append(metrics.token_metrics(ref[:-1], lp[:-1], tail[1:]))
    return {name: metrics.summarize(metrics.concat(c)) for name, c in chunks.items()}


def squared_error(x, w: Width) -> float:
    """Mean squared error of `x` (an MLX array) stored at `w`."""
    import mlx.core as mx

    q = mx.quantize(x, group_size=w.group_size, bits=w.bits)
    return float(mx.mean(mx.square(x - mx.dequantize(*q, group_size=w.group_size, bits=w.bits))))


def scaled(points: list[tuple[float, float]], error: float) -> float:
    """The cost at squared error `error` from two measured (error, cost) points: between them (and
    above), on the power law through both; below the smaller error, proportional to it (a small
    error's KL divergence is quadratic in the perturbation, linear in its square)."""
    (e_lo, c_lo), (e_hi, c_hi) = sorted(points)
    if e_lo <= 0 or c_lo <= 0:
        return c_lo
    if error <= e_lo or c_hi <= 0 or e_hi == e_lo:
        return c_lo * error / e_lo
    p = float(np.log(c_hi / c_lo) / np.log(e_hi / e_lo))
    return c_lo * (error / e_lo) ** p


def measure(model, tokens: np.ndarray, dtype_bytes: int, context: int = CONTEXT, scored: int = SCORED,
            count: int = WINDOWS, widths=WIDTHS, every_width: bool = False, progress=None) -> dict:
    """{"layers": {index: {"k"|"v": {width label: mean KLD}}}, "shapes": ..., ...}: each tensor alone,
    at REFERENCE and scaled to the other widths by their squared errors (or, `every_width`, at
    each), over up to `count` windows of `context` tokens of `tokens`."""
    from mixquant.eval.metrics import kl_per_token

    layers = attention_layers(model)
    fits = {i: [w for w in widths if d % w.group_size == 0] for i, _, d in layers}  # groups within a head
    costs = {i: {t: {w.label: 0.0 for w in fits[i]} for t in "kv"} for i, _, _ in layers}
    n = len(windows(tokens, context, count))
    t0 = time.perf_counter()
    total, done = n * 2 * (sum(len(f) for f in fits.values()) if every_width else len(layers) * len(REFERENCE)), 0

    def cost(snap, tail, ref, i, spec):
        lp = _logprobs(model, tail, packed(model, snap, {i: spec}))
        return float(np.mean(np.maximum(kl_per_token(ref[:-1], lp[:-1]), 0.0)))

    for snap, tail, ref in scored_windows(model, tokens, context, scored, count):
        for i, _, _ in layers:
            _, stored, _ = snap[i]
            for t, x in zip("kv", stored):
                def spec(w):
                    return LayerKV(w, FLOAT) if t == "k" else LayerKV(FLOAT, w)

                if every_width:
                    measured = {w.label: cost(snap, tail, ref, i, spec(w)) for w in fits[i]}
                else:
                    points = [(squared_error(x, w), cost(snap, tail, ref, i, spec(w))) for w in REFERENCE]
                    measured = {w.label: scaled(points, squared_error(x, w)) for w in fits[i]}
                for label, c in measured.items():
                    costs[i][t][label] += c / n
                done += len(measured) if every_width else len(REFERENCE)
                if progress:
                    progress(done, total)
    seconds = time.perf_counter() - t0
    log.info("KV measurement: %d windows of %d tokens, %d layers x 2 tensors, %.1f s", n, context, len(layers), seconds)
    return {"layers": costs, "shapes": {i: [h, d] for i, h, d in layers}, "dtype_bytes": dtype_bytes,
            "context": context, "scored": scored, "windows": n, "every_width": every_width,
            "seconds": round(seconds, 1)}


def allocate_kv(measured: dict, budget_width: Width = BUDGET, budget_bytes: float | None = None) -> dict:
    """The widths with the least predicted KLD whose KV bytes per token are at most `budget_bytes`
    (default: every tensor at `budget_width`): the config.json entry --kv-bits auto reads."""
    from mixquant.quant.allocate import Choice, allocate

    db = measured["dtype_bytes"]
    choices, budget = [], 0
    for i, per in measured["layers"].items():
        heads, dim = measured["shapes"][i]
        for t in "kv":
            options = [(FLOAT, unit_bytes(heads, dim, FLOAT, db), 0.0)]
            options += [(Width.parse(label), unit_bytes(heads, dim, Width.parse(label), db), cost)
                        for label, cost in per[t].items()]
            choices.append(Choice(f"{i}.{t}", options))
            budget += unit_bytes(heads, dim, budget_width, db)
    if budget_bytes is not None:
        budget = int(budget_bytes * TOKENS_PER_UNIT)
    picks = allocate(choices, budget).picks
    layers = {str(i): [picks[f"{i}.k"][0].label, picks[f"{i}.v"][0].label] for i in measured["layers"]}
    spent = sum(b for _, b, _ in picks.values())
    return {"layers": layers, "bytes_per_token": spent / TOKENS_PER_UNIT,
            "budget_bytes_per_token": budget / TOKENS_PER_UNIT, "budget": f"uniform {budget_width.label}"
            if budget_bytes is None else f"{budget_bytes} bytes per token",
            "predicted_kld": sum(d for _, _, d in picks.values()),
            "measured": {k: measured[k] for k in ("context", "scored", "windows", "every_width")},
            "costs": {str(i): per for i, per in measured["layers"].items()}}


def measure_folder(folder, calib: str, dtype: str, progress=None) -> dict:
    """The allocation of a converted model (a folder), measured on `calib` (calibration_tokens)
    and priced in its float dtype: the config.json entry."""
    from mixquant.kvbytes import DTYPE_BYTES
    from mixquant.loading import load_for_running

    loaded = load_for_running(folder)
    measured = measure(loaded.model, calibration_tokens(calib, loaded.tokenizer), DTYPE_BYTES[dtype],
                       progress=progress)
    from mixquant.calib.data import BUILTIN_CALIB, MIX

    entry = allocate_kv(measured)
    entry["calibration"] = MIX if calib in BUILTIN_CALIB else str(calib)
    return entry


def store(folder, entry: dict) -> None:
    """Put the allocation into the folder's config.json, under its mixquant section."""
    import json
    from pathlib import Path

    from mixquant.io.output import CONFIG_MARKER
    from mixquant.io.textfile import read_json_object
    from mixquant.runtime.kv import CONFIG_KEY

    path = Path(folder) / "config.json"
    config = read_json_object(path)
    config.setdefault(CONFIG_MARKER, {})[CONFIG_KEY] = entry
    path.write_text(json.dumps(config, indent=2) + "\n")


def describe(entry: dict) -> str:
    layers = "; ".join(f"layer {i}: K {k} V {v}" for i, (k, v) in entry["layers"].items())
    m = entry["measured"]
    return (f"{layers}; {entry['bytes_per_token'] / 1024:.2f} KiB per token ({entry['budget']}: "
            f"{entry['budget_bytes_per_token'] / 1024:.2f} KiB); predicted mean KL divergence "
            f"{entry['predicted_kld']:.5f}, measured on {entry.get('calibration', 'mix')} ({m['windows']} windows of "
            f"{m['context']} tokens, the last {m['scored']} scored)")


def calibration_tokens(spec: str, tokenizer) -> np.ndarray:
    """One token stream for the measurement's long windows: a calibration file's documents, or (any
    built-in spec) the bundled mix's, joined in order."""
    from mixquant.calib.data import BUILTIN_CALIB, MIX, calibration_documents

    docs = calibration_documents(MIX if spec in BUILTIN_CALIB else spec, tokenizer)
    return np.array([t for d in docs for t in tokenizer.encode(d)], dtype=np.int32)
