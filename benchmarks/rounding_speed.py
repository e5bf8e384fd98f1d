"""What GPTQ and learned rounding cost against the unavoidable part: one forward pass over their calibration tokens.

    python benchmarks/rounding_speed.py [--model fixture smollm2] [--calib-tokens 16384] [--methods gptq learned]

For each model (the fixture; SmolLM2-135M-Instruct from its GGUF), on the same calibration tokens
of the bundled mix (no sampling, so that both runs read the same text): `mixquant imatrix` (one
float forward, layer by layer, collecting the inputs' squares), `convert` uniform 3-bit rounded to
nearest (the writing that every conversion does), `convert --q-rounding gptq` (Hessians in MLX,
the columns rounded by mixquant.quant.gptq_mlx, every expert of a stack at once) and `convert
--q-rounding learned` at its default steps. Each in a child
process, one after another, nothing else running, after one untimed short imatrix run (so that every
timed run finds the model and the package in the page cache).

Then one MoE layer's expert stacks (64 experts, top-8, gate/up [128, 256] and down [256, 128] per
expert, the routed inputs of 16,384 tokens, random routing), in this process: the per-expert loop
(each expert's Hessian summed from its rows in NumPy, then mixquant.quant.gptq's float64 reference,
one expert after another) against the batched path that convert takes (mixquant.calib.rounding's
routed Hessians, one batched matmul per stack, and gptq_stack for all experts at once).

Writes benchmarks/results/rounding_speed.json and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rounding_speed.json"
DOC = ROOT / "docs" / "RESULTS.md"
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
MIXQUANT = [str(Path(sys.executable).parent / "mixquant")]  # the command, as a user runs it


def source(model: str) -> Path:
    if model == "fixture":
        return FIXTURE
    sys.path.insert(0, str(ROOT / "tests"))
    import llamacpp_tools

    return llamacpp_tools.smollm2_gguf()


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*MIXQUANT, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


METHODS = ("gptq", "learned")


def run_model(model: str, tokens: int, work: Path, methods: tuple[str, ...]) -> dict:
    src = str(source(model))
    # a first run reads the model and the package from disk into the page cache; the timed runs find them there
    timed(["imatrix", "-m", src, "-o", str(work / f"{model}-warm.gguf"), "--calib", "mix", "--tokens", "512"])
    common = ["--calib", "mix", "--calib-tokens", str(tokens)]
    rows = {"imatrix, 512 tokens": timed(["imatrix", "-m", src, "-o", str(work / f"{model}-512.gguf"), "--calib",
                                          "mix", "--tokens", "512"]),
            "imatrix": timed(["imatrix", "-m", src, "-o", str(work / f"{model}.gguf"), "--calib", "mix",
                              "--tokens", str(tokens)]),
            "convert uniform-3, nearest": timed(["convert", "-i", src, "-o", str(work / f"{model}-nearest"), "-q",
                                                 "--q-recipe", "uniform", "--q-bits", "3", "--drop-vision"])}
    for method in methods:
        rows[f"convert uniform-3, {method}"] = timed(["convert", "-i", src, "-o", str(work / f"{model}-{method}"),
                                                      "-q", "--q-recipe", "uniform", "--q-bits", "3", "--drop-vision",
                                                      "--q-rounding", method, *common])
    for name, seconds in rows.items():
        print(f"{model}: {name} {seconds:.1f} s", flush=True)
    return {"model": model, "tokens": tokens, "params": text_params(src), "seconds": rows}


def with_ratios(result: dict) -> dict:
    """Each method's convert time over the imatrix pass, with and without the writing (nearest's time)."""
    s = result["seconds"]
    for method in METHODS:
        if f"convert uniform-3, {method}" in s:
            result[f"{method}_over_imatrix"] = s[f"convert uniform-3, {method}"] / s["imatrix"]
            result[f"{method}_less_writing_over_imatrix"] = (s[f"convert uniform-3, {method}"]
                                                             - s["convert uniform-3, nearest"]) / s["imatrix"]
    return result


def text_params(src: str) -> int:
    """The text model's parameters (the embedding and head included), from the conversion plan."""
    from mixquant.quant.plan import make_plan
    from mixquant.sources import arch_plan_of

    _, arch_plan = arch_plan_of(Path(src), None, False, False)
    return make_plan(arch_plan, None, "float16").summary()["model_params"]


def kernel_rates(seed: int = 0) -> dict:
    """The Hessian's FLOP/s (x^T x of 16,384 rows of 1,024 inputs, in MLX) and GPTQ's seconds per weight
    (gptq_stack of one [1024, 1024] matrix: on this CPU its cost is the per-weight work, the clipping
    fit, the column steps and the packing, far more than its 2 rows n^2 FLOPs of block updates)."""
    import mlx.core as mx
    import numpy as np

    from mixquant.quant.gptq_mlx import gptq_stack

    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((16384, 1024)).astype(np.float32))
    mx.eval(x.T @ x)
    t0 = time.perf_counter()
    for _ in range(5):
        mx.eval(x.T @ x)
    gemm = 5 * 2 * 16384 * 1024**2 / (time.perf_counter() - t0)
    h = np.array(x[:4096].T @ x[:4096], dtype=np.float64)[None]
    w = (rng.standard_normal((1, 1024, 1024)) * 0.05).astype(np.float32)
    gptq_stack(w[:, :64], h, 3, 64, mx.float16)  # the first call's one-time costs are not the solve's
    t0 = time.perf_counter()
    gptq_stack(w, h, 3, 64, mx.float16)
    solve = (time.perf_counter() - t0) / 1024**2
    return {"hessian_flops": gemm, "solve_s_per_weight": solve}


# Shapes for the projection (approximate, labelled so): hidden, intermediate, layers, vocab, total and
# active parameters; for the MoE, experts, routed per token, expert intermediate and the shared
# expert's. 9B as benchmarks/gpu_decode.py builds it; 27B and 397B-A17B from their published sizes.
SHAPES = {"Qwen3.5-9B": dict(hidden=4096, inter=12288, layers=32, vocab=248320, total=9e9, active=9e9),
          "Qwen3.5-27B": dict(hidden=5120, inter=17408, layers=64, vocab=248320, total=27e9, active=27e9),
          "Qwen3.5-397B-A17B": dict(hidden=4096, inter=0, layers=60, vocab=248320, total=397e9, active=17e9,
                                    experts=512, top=10, expert_inter=1024, shared_inter=1024)}


def flops(shape: dict, tokens: int) -> dict:
    """FLOPs of one forward over `tokens` and of GPTQ's Hessians (2 tokens n^2 per distinct input),
    and the weights GPTQ solves, from the shapes: per layer a mixer (an input projection and an output
    projection reading [hidden]-wide inputs) and an MLP (dense, or routed experts plus a shared expert)."""
    h, layers = shape["hidden"], shape["layers"]
    if "experts" in shape:
        top, ei, si = shape["top"], shape["expert_inter"], shape["shared_inter"]
        hess_mlp = 2 * tokens * (h * h + si * si) + 2 * tokens * top * (h * h + ei * ei)
    else:
        hess_mlp = 2 * tokens * (h * h + shape["inter"] ** 2)
    hess = layers * (2 * tokens * 2 * h * h + hess_mlp) + 2 * tokens * h * h
    return {"forward": 2 * shape["active"] * tokens, "hessian": hess, "weights": shape["total"]}


def projection(out: dict, tokens: int = 16384) -> dict:
    """Projected seconds on this machine per model in SHAPES: the forward at the rate the imatrix runs
    measured (their time less a 512-token run's, per FLOP of 2 params tokens), GPTQ as its two layer
    forwards (collect, advance) plus Hessians and solve (per weight) at kernel_rates, learned rounding as its
    measured multiple of the forward."""
    rates = out["rates"]
    fwd_rates, learned = [], []
    for m in out["models"]:
        s = m["seconds"]
        if "imatrix, 512 tokens" not in s:
            continue
        fwd = s["imatrix"] - s["imatrix, 512 tokens"]
        fwd_rates.append(2 * m["params"] * (m["tokens"] - 512) / fwd)
        if "convert uniform-3, learned" in s:
            learned.append((s["convert uniform-3, learned"] - s["imatrix, 512 tokens"]) / fwd)
    if not fwd_rates:
        return {}
    rate = min(fwd_rates)
    rows = {}
    for name, shape in SHAPES.items():
        f = flops(shape, tokens)
        fwd = f["forward"] / rate
        rows[name] = {"forward_s": fwd,
                      "gptq_s": 2 * fwd + f["hessian"] / rates["hessian_flops"] + f["weights"] * rates["solve_s_per_weight"],
                      "learned_s": max(learned) * fwd if learned else None, "flops": f}
    return {"tokens": tokens, "forward_flops": rate, "learned_over_forward": max(learned) if learned else None,
            "models": rows}


def expert_stacks(tokens: int = 16384, experts: int = 64, top: int = 8, hidden: int = 256, inter: int = 128,
                  bits: int = 3, group: int = 64, seed: int = 0) -> dict:
    """Seconds for one MoE layer's three expert stacks: the per-expert loop against the batched path."""
    import mlx.core as mx
    import numpy as np

    from mixquant.calib.rounding import _gram
    from mixquant.quant.gptq import gptq
    from mixquant.quant.gptq_mlx import gptq_stack

    rng = np.random.default_rng(seed)
    mix = np.eye(hidden) + 0.3 * rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    x = (rng.standard_normal((tokens, hidden)) @ mix).astype(np.float32)  # what gate/up read, once per token
    acts = rng.standard_normal((tokens, top, inter)).astype(np.float32)  # what down reads, per routed pair
    routes = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top]
    stacks = {"gate": (rng.standard_normal((experts, inter, hidden)) * 0.05).astype(np.float32),
              "up": (rng.standard_normal((experts, inter, hidden)) * 0.05).astype(np.float32),
              "down": (rng.standard_normal((experts, hidden, inter)) * 0.05).astype(np.float32)}

    t0 = time.perf_counter()
    hessian_s = 0.0
    for e in range(experts):
        h0 = time.perf_counter()
        token_rows = x[(routes == e).any(axis=1)].astype(np.float64)
        pair_rows = acts[routes == e].astype(np.float64)
        h_in, h_down = (r.T @ r / max(len(r), 1) for r in (token_rows, pair_rows))
        hessian_s += time.perf_counter() - h0
        for name, h in (("gate", h_in), ("up", h_in), ("down", h_down)):
            gptq(stacks[name][e], h, bits, group, mx.float16)
    loop = time.perf_counter() - t0

    t0 = time.perf_counter()
    grams = {}
    for name, inputs in (("gate", x[:, None, None, :]), ("down", acts)):
        gram, count = _gram(mx.array(inputs), mx.array(routes), experts)
        grams[name] = np.array(gram, dtype=np.float64) / np.maximum(count, 1.0)[:, None, None]
    grams["up"] = grams["gate"]  # gate and up read one input: convert shares its product
    batched_hessian_s = time.perf_counter() - t0
    for name in stacks:
        gptq_stack(stacks[name], grams[name], bits, group, mx.float16)
    batched = time.perf_counter() - t0
    return {"tokens": tokens, "experts": experts, "top": top, "hidden": hidden, "moe_intermediate": inter,
            "bits": bits, "group": group,
            "seconds": {"per-expert loop": loop, "per-expert loop, Hessians": hessian_s,
                        "batched": batched, "batched, Hessians": batched_hessian_s},
            "speedup": loop / batched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=("fixture", "smollm2"), default=["fixture", "smollm2"])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--rewrite-doc", action="store_true")
    args = ap.parse_args()
    if args.rewrite_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return
    from mixquant import cpu_blas

    work = Path(tempfile.mkdtemp(prefix="mixquant-rounding-speed-"))
    earlier = {m["model"]: m for m in json.loads(RESULTS.read_text())["models"]} if RESULTS.exists() else {}
    for model in args.model:
        new = run_model(model, args.calib_tokens, work, tuple(args.methods))
        old = earlier.get(model, {})
        if old.get("tokens") == new["tokens"]:  # a method not run this time keeps its row, against this run's imatrix
            kept = {k: v for k, v in old["seconds"].items() if k.startswith("convert uniform-3, ")
                    and k not in new["seconds"]}
            new["seconds"].update(kept)
            new["earlier_run"] = sorted(k.removeprefix("convert uniform-3, ") for k in kept)
        earlier[model] = with_ratios(new)
    blas = cpu_blas.enable()
    stacks = expert_stacks(args.calib_tokens)
    print(f"expert stacks: per-expert loop {stacks['seconds']['per-expert loop']:.2f} s, batched "
          f"{stacks['seconds']['batched']:.2f} s = {stacks['speedup']:.1f}x", flush=True)
    out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
           "models": [earlier[m] for m in ("fixture", "smollm2") if m in earlier], "expert_stacks": stacks,
           "rates": kernel_rates()}
    out["projection"] = projection(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    lines = ["<!-- rounding-speed:begin -->", "## Rounding speed: GPTQ and learned rounding against one forward pass", "",
             f"`python benchmarks/rounding_speed.py` ({out['machine']}): wall time of each command in its own "
             "process, nothing else running, the same calibration tokens of the bundled mix for imatrix, GPTQ and "
             "learned rounding (its default steps). GPTQ collects every Hessian of a decoder layer from one run of "
             "it (linears that read one input share its product), sums them in MLX and rounds the columns with "
             "mixquant.quant.gptq_mlx, every expert of a stack at once. Targets: GPTQ <= 2x the imatrix pass, "
             "learned rounding <= 40x.", "",
             "| model | tokens | imatrix s | convert nearest s | method | convert s | / imatrix | "
             "(convert - nearest) / imatrix |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for m in out["models"]:
        s = m["seconds"]
        for method in METHODS:
            if f"convert uniform-3, {method}" in s:
                mark = " (earlier run)" if method in m.get("earlier_run", ()) else ""
                lines.append(f"| {m['model']} | {m['tokens']} | {s['imatrix']:.1f} | "
                             f"{s['convert uniform-3, nearest']:.1f} | {method}{mark} | "
                             f"{s[f'convert uniform-3, {method}']:.1f} | "
                             f"{m[f'{method}_over_imatrix']:.2f}x | {m[f'{method}_less_writing_over_imatrix']:.2f}x |")
    st = out.get("expert_stacks")
    if st:
        sec = st["seconds"]
        lines += ["", f"One MoE layer's expert stacks ({st['experts']} experts, top-{st['top']}, gate/up "
                  f"[{st['moe_intermediate']}, {st['hidden']}] and down [{st['hidden']}, {st['moe_intermediate']}] "
                  f"per expert, {st['tokens']} tokens routed at random, {st['bits']}-bit group {st['group']}):", "",
                  "| path | Hessians s | total s |", "|---|---:|---:|",
                  f"| per-expert loop (NumPy Hessian per expert, float64 reference GPTQ one expert at a time) | "
                  f"{sec['per-expert loop, Hessians']:.2f} | {sec['per-expert loop']:.2f} |",
                  f"| batched (routed Hessians in one matmul per stack, gptq_stack of all experts) | "
                  f"{sec['batched, Hessians']:.2f} | {sec['batched']:.2f} |",
                  "", f"Per-expert loop / batched: {st['speedup']:.1f}x (target >= 10x). Both are mostly the clipping fit of "
                  "every group (seven candidate ranges, weighted least squares), which costs the same per weight "
                  "batched or not on this CPU."]
    pr = out.get("projection")
    if pr:
        def hours(x):
            return "—" if x is None else f"{x / 3600:.1f} h"

        r = out["rates"]
        lines += ["", f"**Projection, not a measurement**: hours on this machine for {pr['tokens']} calibration tokens, "
                  f"from FLOP counts (benchmarks/rounding_speed.py `flops`: approximate shapes, one mixer input and "
                  f"output projection per layer) at the rates measured here: the forward at "
                  f"{pr['forward_flops'] / 1e9:.1f} GFLOP/s (the imatrix runs less a 512-token run), Hessians at "
                  f"{r['hessian_flops'] / 1e9:.1f} GFLOP/s, GPTQ's solve at {r['solve_s_per_weight'] * 1e6:.2f} µs per weight "
                  f"(a [1024, 1024] matrix); GPTQ as two layer forwards plus its Hessians and solve; learned rounding as its measured "
                  f"{pr['learned_over_forward'] or 0:.0f}x the forward. Memory, not projected here, is the other "
                  "limit: at 397B-A17B one layer's expert Hessians are 512 x 4096^2 float32 each for gate and up "
                  "(34 GB apiece): GPTQ then runs the layer once per chunk of experts whose Hessians fit a "
                  "quarter of memory (mixquant.calib.rounding.expert_chunks), a layer forward more per chunk, "
                  "and not projected here either.", "",
                  "| model | forward | GPTQ | learned rounding | published anchor (GPU) |", "|---|---:|---:|---:|---|"]
        anchors = {"Qwen3.5-9B": "AutoRound: a 7-8B model in 10-13 min on one A100; llm-compressor GPTQ of "
                                 "Llama-3-8B 745 s on one GPU",
                   "Qwen3.5-27B": "—", "Qwen3.5-397B-A17B": "GPTQ paper: 175B in about 4 GPU-hours"}
        for name, row in pr["models"].items():
            lines.append(f"| {name} | {hours(row['forward_s'])} | {hours(row['gptq_s'])} | {hours(row['learned_s'])} | "
                         f"{anchors[name]} |")
    lines += ["<!-- rounding-speed:end -->"]
    replace_section(DOC, "rounding-speed", "\n".join(lines))


if __name__ == "__main__":
    main()
