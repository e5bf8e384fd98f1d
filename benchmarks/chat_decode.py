"""Decode speed of our chat path against mlx-lm's stream_generate on the same quant, in one process.

    python benchmarks/chat_decode.py [--tokens 256 2048] [--repeats 3] [--model FOLDER]

Both decode the same rendered prompt greedily with the same loaded model (the unsloth-3 quant of
the bundled fixture unless --model is given), with end-of-sequence tokens disabled so every run
decodes exactly N tokens; runs alternate (ours, theirs, theirs, ours, ...) so drift hits both.
Decode tok/s counts from the first token to the last. Writes benchmarks/results/chat_decode.json
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
from benchmarks.report import replace_section  # noqa: E402
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
RESULTS = ROOT / "benchmarks" / "results" / "chat_decode.json"
DOC = ROOT / "docs" / "RESULTS.md"
MESSAGES = [{"role": "user", "content": "Write a Python function that parses a config file."}]


def ours(model, n: int) -> float:
    """The chat path's own clock (ChatResult.timings): first token to the end of the stream."""
    result = model.chat(MESSAGES, max_new_tokens=n, temperature=0.0, enable_thinking=False)
    assert result.num_tokens == n, result.num_tokens
    return result.timings["decode_tok_s"]


def theirs(model, prompt: list[int], n: int) -> float:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    times = []
    for _ in stream_generate(model.model, model.tokenizer, prompt, max_tokens=n, sampler=make_sampler(0.0)):
        times.append(time.perf_counter())
    assert len(times) == n, len(times)
    return (n - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="an MLX folder (default: unsloth-3 of the fixture)")
    args = parser.parse_args()

    import mixquant

    blas = mixquant.enable_cpu_blas()
    from mixquant.convert import ConvertOptions, convert
    from mixquant.quant.recipe import unsloth

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else Path(tmp) / "unsloth3"
        if not args.model:
            convert(FIXTURE, path, ConvertOptions(recipe=unsloth(3), keep_vision=False, keep_mtp=False,
                                                  progress=False))
        model = mixquant.load(path)
    model.eos_ids = set()  # decode exactly N tokens on both paths
    model.tokenizer.eos_token_ids = set()
    prompt = model.encode(model.prompt(MESSAGES, enable_thinking=False))
    ours(model, 8), theirs(model, prompt, 8)  # warm-up
    rows = []
    for n in args.tokens:
        a, b = [], []
        for r in range(args.repeats):
            for path_name in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                (a if path_name == "ours" else b).append(ours(model, n) if path_name == "ours" else
                                                           theirs(model, prompt, n))
        rows.append({"tokens": n, "ours_tok_s": statistics.median(a), "mlx_lm_tok_s": statistics.median(b),
                     "ratio": statistics.median(a) / statistics.median(b), "ours_runs": a, "mlx_lm_runs": b})
        print(f"{n:>6} tokens: chat path {rows[-1]['ours_tok_s']:.2f} tok/s, stream_generate "
              f"{rows[-1]['mlx_lm_tok_s']:.2f} tok/s, ratio {rows[-1]['ratio']:.3f}", flush=True)
    machine = f"{platform.machine()} {platform.system()}, {__import__('os').cpu_count()} cores, BLAS: {blas}"
    result = {"machine": machine, "model": "unsloth-3 of qwen35-tiny" if not args.model else args.model,
              "repeats": args.repeats, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result)


def write_doc(result: dict) -> None:
    lines = ["<!-- chat-decode:begin -->", "## Chat path vs mlx-lm's stream_generate",
             "", f"`python benchmarks/chat_decode.py` ({result['machine']}; {result['model']}, greedy, "
             f"end-of-sequence disabled, median of {result['repeats']} alternating runs each):", "",
             "| generated tokens | chat path tok/s | stream_generate tok/s | ratio |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['tokens']} | {r['ours_tok_s']:.2f} | {r['mlx_lm_tok_s']:.2f} | {r['ratio']:.3f} |"
              for r in result["rows"]]
    lines.append("<!-- chat-decode:end -->")
    replace_section(DOC, "chat-decode", "\n".join(lines))


if __name__ == "__main__":
    main()
