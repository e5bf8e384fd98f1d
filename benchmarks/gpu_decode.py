"""Batch-1 decode speed on a GPU at Qwen3.5-9B shapes: bf16, uniform-4 and unsloth-3, our chat path
and mlx-lm's stream_generate side by side in one process.

    python benchmarks/gpu_decode.py [--work DIR] [--prompt-tokens 128] [--tokens 256] [--repeats 3]

Writes a random-weight checkpoint with Qwen3.5-9B's shapes (hidden 4096, 32 layers of which 8 full
attention, MLP 12288, vocabulary 248320; ~19 GB in bf16; the fixture's tokenizer), converts it with
each recipe, and decodes greedily after a --prompt-tokens prompt with end-of-sequence disabled.
Effective GB/s = bytes of weights a decode step reads (all but the embedding table) x tok/s. Needs
MLX's CUDA backend (`pip install -e '.[cuda]'`) or Metal. Writes benchmarks/results/gpu_decode.json
and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.convert_memory import make_checkpoint, synthetic_config  # noqa: E402
from benchmarks.report import replace_section  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "gpu_decode.json"
DOC = ROOT / "docs" / "RESULTS.md"


def config_9b() -> dict:
    config = synthetic_config(32)
    config["text_config"].update(vocab_size=248320, hidden_size=4096, intermediate_size=12288,
                                 num_attention_heads=16, num_key_value_heads=4, head_dim=256,
                                 linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                                 linear_value_head_dim=128)
    return config


def step_bytes(model) -> int:
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    embed = sum(v.nbytes for k, v in params.items() if ".embed_tokens." in k)
    return sum(v.nbytes for v in params.values()) - embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    import mixquant
    from mixquant.convert import ConvertOptions, convert
    from mixquant.quant.recipe import uniform, unsloth
    from mixquant.runtime.chat import ChatSession

    work = Path(args.work or tempfile.mkdtemp(prefix="mixquant-gpu-"))
    src = work / "src"
    if not src.exists():
        make_checkpoint(src, 0, config_9b())
    rows = []
    for name, recipe in (("bf16", None), ("uniform-4", uniform(4)), ("unsloth-3", unsloth(3))):
        out = work / name
        if not out.exists():
            convert(src, out, ConvertOptions(recipe=recipe, keep_vision=False, keep_mtp=False, progress=False))
        model = mixquant.load(out)
        model.eos_ids = set()
        model.tokenizer.eos_token_ids = set()
        prompt = [int(t) for t in mx.random.randint(0, 8000, (args.prompt_tokens,)).tolist()]

        def ours():
            times = [time.perf_counter() for _ in model.stream(prompt, ChatSession(model),
                                                               max_new_tokens=args.tokens)]
            return (len(times) - 1) / (times[-1] - times[0])

        def theirs():
            times = [time.perf_counter() for _ in stream_generate(model.model, model.tokenizer, prompt,
                                                                  max_tokens=args.tokens, sampler=make_sampler(0.0))]
            return (len(times) - 1) / (times[-1] - times[0])

        ours(), theirs()
        a, b = [], []
        for _ in range(args.repeats):
            a.append(ours())
            b.append(theirs())
        nbytes = step_bytes(model.model)
        rows.append({"model": name, "ours_tok_s": statistics.median(a), "mlx_lm_tok_s": statistics.median(b),
                     "step_gb": nbytes / 1e9, "ours_gb_s": nbytes / 1e9 * statistics.median(a)})
        print(f"{name:<10} ours {rows[-1]['ours_tok_s']:.1f} tok/s ({rows[-1]['ours_gb_s']:.0f} GB/s), "
              f"mlx-lm {rows[-1]['mlx_lm_tok_s']:.1f} tok/s", flush=True)
        del model
        mx.clear_cache()
    device = mx.default_device()
    name = mx.device_info().get("device_name", str(device)) if hasattr(mx, "device_info") else str(device)
    result = {"device": f"{name} ({platform.machine()} {platform.system()})", "rows": rows,
              "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "repeats": args.repeats}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["<!-- gpu-decode:begin -->", "## GPU decode at Qwen3.5-9B shapes", "",
             f"`python benchmarks/gpu_decode.py` on {result['device']}: batch-1 greedy decode of {args.tokens} tokens "
             f"after {args.prompt_tokens}, random weights, median of {args.repeats}.", "",
             "| model | step GB | ours tok/s | ours GB/s | mlx-lm tok/s | ratio |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['step_gb']:.2f} | {r['ours_tok_s']:.1f} | {r['ours_gb_s']:.0f} | "
              f"{r['mlx_lm_tok_s']:.1f} | {r['ours_tok_s'] / r['mlx_lm_tok_s']:.2f} |" for r in rows]
    lines.append("<!-- gpu-decode:end -->")
    replace_section(DOC, "gpu-decode", "\n".join(lines))


if __name__ == "__main__":
    main()
