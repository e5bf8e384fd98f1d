"""MTP speculative decoding against plain decoding on the bundled fixture, in one process.

    python benchmarks/mtp.py [--gen-tokens 128] [--prompt-tokens 128] [--repeats 3] [--depths 1 2 3 4]

For each way of running the fixture (its unsloth-4 quant as `chat --mtp` runs it by default, and
with --native's quantized kernels; float32, greedy and sampled with its generation_config),
`mixquant bench --mtp`'s measurement: plain decoding, the default MTP decoding (up to depth 2, the
depth chosen round by round as measured fastest, plain steps included) and MTP at each fixed depth
alternate on each of --repeats prompts from the bundled held-out text; the speed-up is the median over prompts of
the paired ratio, acceptance is counted by draft position over all of them. Then the two ways of rolling back rejected drafts (recording per-position
states during verification; restoring the states from before it and running the accepted tokens
again) are timed against each other. Last, what the same acceptance predicts where decoding is
memory-bound (a GPU): a verification pass costs one decode step and a draft step costs the bytes
the head reads over the bytes a main step reads. Writes benchmarks/results/mtp.json and its section
of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
RESULTS = ROOT / "benchmarks" / "results" / "mtp.json"
DOC = ROOT / "docs" / "RESULTS.md"


def step_bytes(model) -> tuple[int, int]:
    """Bytes of weights a decode step of the main model reads (all but the embedding table, which
    it reads one row of, unless it is also the lm_head) and a draft step of the head reads (its own
    weights and the lm_head)."""
    from mlx.utils import tree_flatten

    parts = model.mtp
    text = dict(tree_flatten(model.model.language_model.parameters()))
    lm_head = sum(v.nbytes for k, v in text.items() if k.startswith("lm_head."))
    embed = sum(v.nbytes for k, v in text.items() if k.startswith("model.embed_tokens."))
    main = sum(v.nbytes for v in text.values()) - (embed if lm_head else 0)
    head = sum(v.nbytes for _, v in tree_flatten(parts.head.parameters())) + (lm_head or embed)
    return main, head


def rollback_times(model, prompt: list[int], depths: list[int], gen: int, repeats: int) -> list[dict]:
    """Decode tok/s with each rollback, alternating, median of `repeats`."""
    from mixquant.runtime.chat import ChatSession
    from mixquant.runtime.mtp import CAPTURE, RECOMPUTE, speculative_steps
    from mixquant.runtime.sampling import GREEDY

    def once(depth, rollback):
        session = ChatSession(model)
        fresh = session.prepare(prompt)
        times = [time.perf_counter() for _ in speculative_steps(model.mtp, session, fresh, max_new_tokens=gen,
                                                                sampling=GREEDY, depth=depth, rollback=rollback)]
        return (len(times) - 1) / (times[-1] - times[0])

    rows = []
    for depth in depths:
        runs = {CAPTURE: [], RECOMPUTE: []}
        once(depth, CAPTURE), once(depth, RECOMPUTE)
        for r in range(repeats):
            for rollback in ((CAPTURE, RECOMPUTE) if r % 2 == 0 else (RECOMPUTE, CAPTURE)):
                runs[rollback].append(once(depth, rollback))
        rows.append({"depth": depth, "capture_tok_s": statistics.median(runs[CAPTURE]),
                     "recompute_tok_s": statistics.median(runs[RECOMPUTE])})
        print(f"rollback, depth {depth}: recorded states {rows[-1]['capture_tok_s']:.2f} tok/s, "
              f"snapshot and recompute {rows[-1]['recompute_tok_s']:.2f} tok/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="prompts (each a repeat; default 5)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()

    import mixquant

    blas = mixquant.enable_cpu_blas()
    from mixquant.convert import ConvertOptions, convert
    from mixquant.loading import load
    from mixquant.quant.recipe import unsloth
    from mixquant.runtime.bench import BenchConfig, bench_mtp, format_mtp_table, prompt_ids
    from mixquant.runtime.chat import Model

    cfg = BenchConfig(prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, turns=1, repeats=args.repeats)
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        quant = Path(tmp) / "unsloth4"
        convert(FIXTURE, quant, ConvertOptions(recipe=unsloth(4), keep_vision=False, progress=False))
        float32 = lambda: Model(load(FIXTURE, dtype="float32", dequantize=True, mtp=True))  # noqa: E731
        ways = [("unsloth-4, the default (`chat --mtp`)", lambda: mixquant.load(quant, mtp=True), False),
                ("unsloth-4, --native quantized kernels", lambda: mixquant.load(quant, mtp=True, native=True), False),
                ("qwen35-tiny, float32", float32, False),
                ("qwen35-tiny, float32, sampled", float32, True)]
        rollback = None
        for name, make, sampled in ways:
            model = make()
            result = bench_mtp(FIXTURE, cfg, args.depths, model=model, sampled=sampled)
            print(f"\n{name}\n{format_mtp_table(result)}", flush=True)
            main_bytes, head_bytes = step_bytes(model)
            result.update(name=name, main_step_bytes=main_bytes, head_step_bytes=head_bytes)
            for r in [result["adaptive"]] + result["mtp"]:
                r["predicted_memory_bound"] = r["tokens_per_round"] / (1 + r["depth"] * head_bytes / main_bytes)
            variants.append(result)
            if rollback is None:
                rollback = rollback_times(model, prompt_ids(model.tokenizer, args.prompt_tokens), args.depths,
                                          args.gen_tokens, args.repeats)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}"
    out = {"machine": machine, "config": vars(cfg), "variants": variants, "rollback": rollback}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    from mixquant.runtime.mtp import DEFAULT_DEPTH

    cfg = out["config"]
    lines = ["<!-- mtp:begin -->", "## MTP speculative decoding", "",
             f"`python benchmarks/mtp.py` ({out['machine']}): decoding of {cfg['gen_tokens']} tokens after a "
             f"{cfg['prompt_tokens']}-token prompt of the bundled held-out text (greedy unless marked sampled: "
             f"then the fixture's generation_config), plain and with the fixture's own MTP head drafting, "
             f"alternating in one process on each of {cfg['repeats']} prompts; speed-up: the median of the "
             f"per-prompt ratios. The default (`--mtp`) drafts up to {DEFAULT_DEPTH} tokens a round, choosing 0 "
             f"(a plain step), 1 or {DEFAULT_DEPTH} from the tokens per second it has measured "
             f"(mixquant.runtime.mtp.Adaptive); the fixed depths are for comparison. Acceptance: the share of drafts "
             f"kept at each position of a round. Predicted: tokens per round / (1 + depth x head bytes / main-step "
             f"bytes), the speed-up where a pass of a few tokens costs what one token does (memory-bound decoding).",
             "", "| model | decoding | tok/s | speed-up | tokens/round | acceptance by position | predicted, memory-bound |",
             "|---|---|---:|---:|---:|---|---:|"]
    for v in out["variants"]:
        p = v["plain"]
        lines.append(f"| {v['name']} | plain | {p['decode_tok_s']:.2f} | 1.000 | 1.00 | | |")
        a = v["adaptive"]
        lines.append(f"| | **MTP, default** (depth <= {a['depth']}, as measured fastest) | {a['decode_tok_s']:.2f} | "
                     f"**{a['speedup']:.3f}** | {a['tokens_per_round']:.2f} | | |")
        for r in v["mtp"]:
            acc = ", ".join(f"{a:.0%}" for a in r["acceptance"] if a is not None)
            lines.append(f"| | MTP depth {r['depth']} | {r['decode_tok_s']:.2f} | {r['speedup']:.3f} | "
                         f"{r['tokens_per_round']:.2f} | {acc} | {r['predicted_memory_bound']:.2f} |")
    v = out["variants"][0]
    lines += ["", f"Head bytes per draft step / main bytes per decode step: "
              + ", ".join(f"{x['name']} {x['head_step_bytes'] / x['main_step_bytes']:.2f}"
                          for x in out["variants"] if not x["sampled"]) + ".", "",
              f"Rolling back rejected drafts ({out['variants'][0]['name']}, greedy, first prompt): recorded "
              "per-position states against restoring "
              "the states from before verification and running the accepted tokens again.", "",
              "| depth | recorded states tok/s | snapshot and recompute tok/s |", "|---:|---:|---:|"]
    lines += [f"| {r['depth']} | {r['capture_tok_s']:.2f} | {r['recompute_tok_s']:.2f} |" for r in out["rollback"]]
    lines.append("<!-- mtp:end -->")
    replace_section(DOC, "mtp", "\n".join(lines))


if __name__ == "__main__":
    main()
