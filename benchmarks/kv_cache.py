"""What a quantized KV cache costs in quality, and what it saves, at the contexts each model was
trained for.

    python benchmarks/kv_cache.py [--model fixture smollm2]

For each model (the fixture, trained on 512-token windows; SmolLM2-135M-Instruct from its GGUF,
context 8192), the per-layer allocation is made as a user makes it: `mixquant convert --kv-bits auto`
(measured on the bundled mix, at the bytes of a uniform 4-bit cache). Then, on evaluation text that
nothing here calibrated on (the fixture's held-out file past the bundled evaluation text, every
other block of BLOCK characters), at three context lengths: each window's first part is prefilled
into a float cache, the cache is packed (mlx-lm's QuantizedKVCache at 8 and 4 bits, group 64; the
allocation's MixedKVCaches), and the window's last tokens (the fixture: a quarter, at most 512;
SmolLM2: 128) decode against it, teacher-forced; the mean KL divergence of their next-token
distributions from the float cache's, ± its standard error, and p99.9. Also the cache's bytes per token in the model's dtype,
and decode tokens/s at the longest context on the chat path. Writes benchmarks/results/kv_cache.json
and its section of docs/RESULTS.md, with a projection for Qwen3.5-9B, 27B and 397B-A17B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "kv_cache.json"
DOC = ROOT / "docs" / "RESULTS.md"
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
BLOCK = 64_000
CONTEXTS = {"fixture": (128, 256, 512), "smollm2": (2048, 4096, 8192)}
WINDOWS = {"fixture": 64, "smollm2": 6}
# scored positions per window: the last quarter, at most 512, on the fixture; 128 on SmolLM2, whose
# teacher-forced positions attend through MLX's quantized CPU kernels (slow per extra row)
SCORED = {"fixture": lambda ctx: min(ctx // 4, 512), "smollm2": lambda ctx: 128}
DECODE_TOKENS = 64
# Qwen3.5 shapes for the projection (attention layers: every fourth of the layers): 9B from its
# config (as benchmarks/gpu_decode.py builds it); 27B and 397B-A17B from THUDM/slime's model
# scripts (scripts/models/qwen3.5-27B.sh, qwen3.5-397B-A17B.sh: layers, query groups, kv channels)
PROJECTED = {"Qwen3.5-9B": (9e9, 32, 4, 256), "Qwen3.5-27B": (27e9, 64, 4, 256),
             "Qwen3.5-397B-A17B": (397e9, 60, 2, 256)}
HEADLINE_BPW = 3.6
PROJECTED_CONTEXTS = (32768, 131072, 262144)


def eval_text(work: Path) -> Path:
    from mixquant.eval.kld import read_eval_text

    bundled, _ = read_eval_text(None)
    full = (FIXTURE / "heldout.txt").read_text(encoding="utf-8")
    if not full.startswith(bundled):
        raise SystemExit(f"{FIXTURE / 'heldout.txt'}: does not begin with the bundled evaluation text")
    rest = full[len(bundled) + 1000:]
    path = work / "kv-eval.txt"
    path.write_text("".join(rest[i: i + BLOCK] for i in range(0, len(rest), 2 * BLOCK)), encoding="utf-8")
    return path


def float_folder(name: str, work: Path) -> Path:
    """The model as `convert --kv-bits auto` writes it (unquantized, bfloat16)."""
    from mixquant.convert import ConvertOptions, convert

    out = work / f"{name}-kv-auto"
    if not out.exists():
        if name == "fixture":
            src = FIXTURE
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            import llamacpp_tools

            src = llamacpp_tools.smollm2_gguf()
        t0 = time.perf_counter()
        convert(src, out, ConvertOptions(progress=False, kv_auto=True, keep_vision=False))
        (out / "convert_seconds").write_text(f"{time.perf_counter() - t0:.1f}")
    return out


def decode_rate(folder: Path, tokens, kv_bits) -> float:
    """Decode tokens/s on the chat path after a prompt of len(tokens)."""
    import mixquant
    from mixquant.runtime.chat import ChatSession

    model = mixquant.load(folder, kv_bits=kv_bits)
    session = ChatSession(model)
    times = []
    for _ in model.stream(list(map(int, tokens)), session, max_new_tokens=DECODE_TOKENS):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def run_model(name: str, work: Path) -> dict:
    import numpy as np

    from mixquant import kvplan
    from mixquant.arch import family_for_config
    from mixquant.io.textfile import read_json_object
    from mixquant.kvbytes import DTYPE_BYTES, kv_bytes_per_token
    from mixquant.loading import load_for_running
    from mixquant.runtime.kv import KVQuant, kv_settings

    folder = float_folder(name, work)
    config = read_json_object(folder / "config.json")
    entry = config["mixquant"]["kv"]
    family = family_for_config(config, "config.json")
    attention = family.attention(config, "config.json")
    dtype = config.get("torch_dtype", "bfloat16")
    db = DTYPE_BYTES[dtype]
    settings = {"8-bit": KVQuant(8), "4-bit": KVQuant(4), "auto": kv_settings("auto", None, None, folder)}
    bytes_per_token = {"float": kv_bytes_per_token(attention, db), "8-bit": kv_bytes_per_token(attention, db, 8),
                       "4-bit": kv_bytes_per_token(attention, db, 4), "auto": entry["bytes_per_token"]}
    loaded = load_for_running(folder)
    tokens = np.array(loaded.tokenizer.encode(eval_text(work).read_text(encoding="utf-8")), dtype=np.int32)
    rows = []
    for ctx in CONTEXTS[name]:
        t0 = time.perf_counter()
        reports = kvplan.evaluate(loaded.model, tokens, settings, ctx, SCORED[name](ctx), WINDOWS[name])
        for setting, s in reports.items():
            rows.append({"context": ctx, "setting": setting, "kld": s["kld"]["mean"], "se": s["kld"]["stderr"],
                         "p999": s["kld"]["p999"], "tokens": s["tokens"], "windows": s["tokens"] // (SCORED[name](ctx) - 1)})
            print(f"{name} ctx {ctx} {setting:6s} KLD {s['kld']['mean']:.6f} ± {s['kld']['stderr']:.6f} "
                  f"p99.9 {s['kld']['p999']:.4f} ({s['tokens']} tokens)", flush=True)
        print(f"{name} ctx {ctx}: {time.perf_counter() - t0:.0f} s", flush=True)
    longest = max(CONTEXTS[name])
    prompt = tokens[:longest - DECODE_TOKENS]
    decode = {"float": decode_rate(folder, prompt, None)}
    decode.update({k: decode_rate(folder, prompt, bits) for k, bits in (("8-bit", 8), ("4-bit", 4), ("auto", "auto"))})
    return {"model": name, "dtype": dtype, "attention_layers": attention.layers, "allocation": entry,
            "convert_seconds": float((folder / "convert_seconds").read_text()),
            "bytes_per_token": bytes_per_token, "rows": rows, "decode_tok_s": decode, "decode_context": longest}


def projection() -> list[dict]:
    from mixquant.arch.tensors import Attention
    from mixquant.kvbytes import kv_bytes_per_token

    rows = []
    for name, (params, layers, kv_heads, head_dim) in PROJECTED.items():
        a = Attention(layers=layers // 4, heads=0, kv_heads=kv_heads, head_dim=head_dim)
        per = {"bf16": kv_bytes_per_token(a, 2), "8-bit": kv_bytes_per_token(a, 2, 8),
               "4-bit / auto": kv_bytes_per_token(a, 2, 4)}
        rows.append({"model": name, "weights": params * HEADLINE_BPW / 8, "attention_layers": a.layers,
                     "kv_heads": kv_heads, "head_dim": head_dim, "per_token": per,
                     "kv": {n: {k: v * n for k, v in per.items()} for n in PROJECTED_CONTEXTS}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=("fixture", "smollm2"), default=["fixture", "smollm2"])
    ap.add_argument("--work", default=None)
    ap.add_argument("--rewrite-doc", action="store_true", help="only regenerate the docs section from the JSON")
    args = ap.parse_args()
    if args.rewrite_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return
    import tempfile

    import mixquant

    blas = mixquant.enable_cpu_blas()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixquant-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(RESULTS.read_text())["models"] if RESULTS.exists() else []
    models = {m["model"]: m for m in earlier}
    for name in args.model:
        models[name] = run_model(name, work)
    out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
           "models": [models[n] for n in ("fixture", "smollm2") if n in models], "projection": projection()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    lines = ["<!-- kv-cache:begin -->", "## KV cache: quality and bytes of a quantized cache", "",
             f"`python benchmarks/kv_cache.py` ({out['machine']}). The per-layer allocation is the one "
             "`mixquant convert --kv-bits auto` stores (measured on the bundled mix, nothing of the evaluated "
             "text), at the bytes per token of a uniform 4-bit cache. Evaluated on held-out text: each window "
             "prefilled in float up to its last tokens (the fixture: a quarter of the window, at most 512; "
             "SmolLM2: 128), the cache packed, those tokens decoded against it; KL divergence of their "
             "next-token distributions from the float cache's. "
             "Bytes per token: K and V of all attention layers in the model's dtype (scales and biases included).",
             ""]
    for m in out["models"]:
        layers = "; ".join(f"layer {i}: K {k}, V {v}" for i, (k, v) in m["allocation"]["layers"].items())
        lines += [f"**{m['model']}** ({m['attention_layers']} attention layers, {m['dtype']}); allocation: {layers} "
                  f"(`convert --kv-bits auto` took {m['convert_seconds']:.0f} s in all).", "",
                  "| context | windows | cache | bytes/token | mean KLD ± se | p99.9 | vs uniform 4-bit |",
                  "|---:|---:|---|---:|---:|---:|---:|"]
        for ctx in sorted({r["context"] for r in m["rows"]}):
            rows = {r["setting"]: r for r in m["rows"] if r["context"] == ctx}
            four = rows["4-bit"]["kld"]
            for setting in ("8-bit", "4-bit", "auto"):
                r = rows[setting]
                lines.append(f"| {ctx} | {r['windows']} | {setting} | {m['bytes_per_token'][setting]:.0f} | {r['kld']:.5f} ± "
                             f"{r['se']:.5f} | {r['p999']:.4f} | {r['kld'] / four:.3f}x |")
        d = m["decode_tok_s"]
        lines += ["", f"Decode at {m['decode_context']} tokens of context (chat path, tokens/s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in d.items())
                  + f"; float cache {m['bytes_per_token']['float']:.0f} bytes/token.", ""]
    lines += ["**Projection** (a labelled estimate, not a measurement): weights at the headline "
              f"{HEADLINE_BPW} bits per weight plus one sequence's KV cache in GB, from each model's layer "
              "count (one full-attention layer in four), KV heads and head size (9B from its config; 27B and "
              "397B-A17B from THUDM/slime's model scripts); `auto` is allocated at uniform 4-bit's bytes. The "
              "Gated DeltaNet layers' fixed state (tens of MB) is left out.", "",
              "| model | weights GB | KV per token (bf16) | " + " | ".join(
                  f"{n:,} tokens: bf16 / 8-bit / 4-bit, auto" for n in PROJECTED_CONTEXTS) + " |",
              "|---|---:|---:|" + "---:|" * len(PROJECTED_CONTEXTS)]
    for p in out["projection"]:
        cells = []
        for n in PROJECTED_CONTEXTS:
            kv = p["kv"][str(n)] if str(n) in p["kv"] else p["kv"][n]
            cells.append(" / ".join(f"{(p['weights'] + v) / 1e9:.1f}" for v in kv.values()))
        lines.append(f"| {p['model']} | {p['weights'] / 1e9:.1f} | {p['per_token']['bf16'] / 1024:.0f} KiB | "
                     + " | ".join(cells) + " |")
    lines += ["<!-- kv-cache:end -->"]
    replace_section(DOC, "kv-cache", "\n".join(lines))


if __name__ == "__main__":
    main()
