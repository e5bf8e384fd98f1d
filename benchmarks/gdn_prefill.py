"""The chunked Gated DeltaNet prefill against mlx-lm's token loop, on the fixture in float32.

    python benchmarks/gdn_prefill.py [--tokens 512] [--repeats 5]

Two levels: the recurrence alone (one Gated DeltaNet layer's shapes, mlx-lm's gated_delta_ops vs
mixquant.kernels.chunked_gated_delta), and a whole forward pass of the model over a prompt (mlx-lm's
modules vs the same with the chunked prompt pass). Both paths' logits are compared. Writes
benchmarks/results/gdn_prefill.json and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"


def timed(fn, repeats: int) -> float:
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import mixquant

    blas = mixquant.enable_cpu_blas()
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models.gated_delta import compute_g, gated_delta_ops, normalize_qk
    from mlx_lm.models.qwen3_5 import GatedDeltaNet

    from mixquant.kernels import CHUNK, chunk_prefill, chunked_gated_delta
    from mixquant.loading import load

    model = load(FIXTURE, dtype="float32", dequantize=True).model
    plain = {p: m for p, m in model.named_modules() if isinstance(m, GatedDeltaNet)}
    restore = []
    for path, module in plain.items():  # mlx-lm's own modules, for the baseline
        own = GatedDeltaNet.__new__(GatedDeltaNet)
        dict.update(own, module)
        own.__dict__.update(module.__dict__)
        restore.append((path, own))
    model.update_modules(tree_unflatten(restore))
    ids = mx.array(np.random.default_rng(0).integers(0, 8166, (1, args.tokens)))
    loop_logits = model(ids)
    loop_model = timed(lambda: model(ids), args.repeats)
    chunk_prefill(model)
    chunk_logits = model(ids)
    chunk_model = timed(lambda: model(ids), args.repeats)
    diff = float(mx.abs(loop_logits - chunk_logits).max())

    layer = next(iter(plain.values()))
    rng = np.random.default_rng(1)
    q, k = (mx.array(rng.normal(size=(1, args.tokens, layer.num_k_heads, layer.head_k_dim)).astype(np.float32))
            for _ in range(2))
    q, k = normalize_qk(q, k, inv_scale=layer.head_k_dim**-0.5, eps=1e-6)
    v = mx.array(rng.normal(size=(1, args.tokens, layer.num_v_heads, layer.head_v_dim)).astype(np.float32))
    g = compute_g(layer.A_log, mx.array(rng.normal(size=(1, args.tokens, layer.num_v_heads)).astype(np.float32)),
                  layer.dt_bias)
    beta = mx.sigmoid(mx.array(rng.normal(size=(1, args.tokens, layer.num_v_heads)).astype(np.float32)))
    zeros = mx.zeros((1, layer.num_v_heads, layer.head_v_dim, layer.head_k_dim))
    loop_kernel = timed(lambda: gated_delta_ops(q, k, v, g, beta, zeros), args.repeats)
    chunk_kernel = timed(lambda: chunked_gated_delta(q, k, v, g, beta, None), args.repeats)
    result = {"tokens": args.tokens, "chunk": CHUNK, "repeats": args.repeats,
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
              "recurrence_loop_s": loop_kernel, "recurrence_chunked_s": chunk_kernel,
              "recurrence_speedup": loop_kernel / chunk_kernel,
              "forward_loop_s": loop_model, "forward_chunked_s": chunk_model, "forward_speedup": loop_model / chunk_model,
              "max_logit_difference": diff}
    out = ROOT / "benchmarks" / "results" / "gdn_prefill.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = [f"| recurrence, one layer's shapes | {1000 * loop_kernel:.1f} | {1000 * chunk_kernel:.1f} | "
             f"{result['recurrence_speedup']:.1f}x |",
             f"| whole forward (8 layers, head) | {1000 * loop_model:.1f} | {1000 * chunk_model:.1f} | "
             f"{result['forward_speedup']:.1f}x |"]
    print("\n".join(table) + f"\nmax |logit difference| {diff:.2e}")
    replace_section(ROOT / "docs" / "RESULTS.md", "gdn-prefill", "\n".join([
        "<!-- gdn-prefill:begin -->", "## Chunked Gated DeltaNet prefill", "",
        f"`python benchmarks/gdn_prefill.py` ({result['machine']}; the fixture in float32, a {args.tokens}-token "
        f"prompt, chunks of {CHUNK}, median of {args.repeats}). Logits of the two paths differ by at most "
        f"{diff:.1e}.", "", "| what | mlx-lm's token loop, ms | chunked, ms | speed-up |", "|---|---:|---:|---:|",
        *table, "", "The rest of a forward pass (projections, attention, MLP, head) is unchanged, which bounds the "
        "whole-model gain on this CPU.", "<!-- gdn-prefill:end -->"]))


if __name__ == "__main__":
    main()
