"""Peak memory and speed of converting a ~3 GB bf16 Qwen3.5-shaped checkpoint: mixquant vs mlx_lm.convert.

    python benchmarks/convert_memory.py [--gb 3] [--work DIR] [--json OUT.json]

Builds a synthetic checkpoint (random bf16 weights, the real fixture's tokenizer) in DIR, then
converts it to 4-bit (uniform, group 64) once with each tool, each in its own process so that
peak RSS (ru_maxrss) belongs to that conversion alone. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
sys.path.insert(0, str(ROOT))


def synthetic_config(layers: int) -> dict:
    text = dict(
        model_type="qwen3_5_text", vocab_size=8192, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=layers, full_attention_interval=4,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        num_attention_heads=16, num_key_value_heads=4, head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_output_gate=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    )
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "tie_word_embeddings": False}


def make_checkpoint(folder: Path, target_gb: float, config: dict | None = None) -> float:
    """Write random bf16 weights shaped by the config (default: synthetic_config with as many layers
    as make ~target_gb), one tensor at a time. Returns GB written."""
    from mixquant.arch import qwen35
    from mixquant.io.safetensors import OutSpec, StreamingWriter

    if config is None:
        per_layer = 3 * 2048 * 6144 + (2 * 16 * 128 + 32 * 128) * 2048 * 2 + 2048 * 4096
        config = synthetic_config(max(4, int(round(target_gb * 1e9 / 2 / per_layer / 4)) * 4))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(FIXTURE / name, folder / name)

    g = qwen35.geometry(config, "synthetic")  # shapes come from the same table the converter checks
    rows = [("embed_tokens.weight", (g.vocab, g.hidden)), ("norm.weight", (g.hidden,))]
    for i in range(g.n_layers):
        block = qwen35._norms_block(g)
        block += qwen35._attention_block(g) if g.is_full_attention(i) else qwen35._linear_attention_block(g)
        block += qwen35._dense_mlp_block(g)
        rows += [(f"layers.{i}.{rel}", shape) for rel, _, shape in block]
    specs = [OutSpec("model.language_model." + n, "BF16", s) for n, s in rows]
    specs.append(OutSpec("lm_head.weight", "BF16", (g.vocab, g.hidden)))
    writer = StreamingWriter(folder / "model.safetensors", specs)
    rng = np.random.default_rng(0)
    for s in specs:
        n = int(np.prod(s.shape))
        for start in range(0, n, 1 << 24):
            count = min(1 << 24, n - start)
            words = (rng.standard_normal(count, dtype=np.float32) * 0.02).view(np.uint32) >> 16
            writer.write(s.name, words.astype(np.uint16))
    writer.close()
    return (folder / "model.safetensors").stat().st_size / 1e9


def child(tool: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    if tool == "mixquant":
        from mixquant.convert import ConvertOptions, convert
        from mixquant.quant.recipe import uniform

        convert(Path(src), Path(out), ConvertOptions(recipe=uniform(4, 64), progress=False))
    else:
        from mlx_lm import convert as mlx_convert

        mlx_convert(src, mlx_path=out, quantize=True, q_bits=4, q_group_size=64)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_kb * 1024}))


def measure(tool: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", tool, str(src), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else f"exit {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--work", default="/tmp/mixquant-bench-convert")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "convert_memory.json"))
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    gb = make_checkpoint(src, args.gb)
    results = {"machine": f"{platform.machine()}, {platform.system()}, {_cpu_count()} cores",
               "source_gb": round(gb, 3), "tools": {}}
    for tool in ("mixquant", "mlx_lm.convert"):
        r = measure(tool, src, work / tool.replace(".", "_"))
        if "seconds" in r:
            r["seconds_per_gb"] = r["seconds"] / gb
        results["tools"][tool] = r
    shutil.rmtree(work, ignore_errors=True)

    print(f"source: {gb:.2f} GB bf16 ({results['machine']})")
    print(f"{'tool':<16} {'peak RSS (GB)':>14} {'seconds':>9} {'s / GB':>8} {'output (GB)':>12}")
    for tool, r in results["tools"].items():
        if "error" in r:
            print(f"{tool:<16} failed: {r['error']}")
            continue
        print(f"{tool:<16} {r['peak_rss_bytes'] / 1e9:>14.3f} {r['seconds']:>9.1f} {r['seconds_per_gb']:>8.1f} "
              f"{r['output_bytes'] / 1e9:>12.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
