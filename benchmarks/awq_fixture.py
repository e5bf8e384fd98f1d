"""Does AWQ help on the fixture? unsloth-3 without AWQ, with fixed alpha 0.5, with searched alpha
(the default: per-group search, then the end-to-end check with the clipping fit), and with the
per-group search alone (--awq-judge-windows 0), to show what the end-to-end check adds.

    python benchmarks/awq_fixture.py [--chunks 32] [--calib mix|heldout-tail|FILE] [--tokens N]

Evaluates the quants against one float32 reference on the bundled held-out text and writes the
numbers into docs/RESULTS.md, one section per calibration (and benchmarks/results/awq_fixture-*.json).
`heldout-tail` calibrates on in-domain text that the evaluation never sees: the bundled held-out
file from 1,000 characters past the last evaluated token to its end.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.allocation import FIXTURE, calibration_of  # noqa: E402


CALIB_NAMES = {"mix": "the bundled calibration mix",
               "heldout-tail": "in-domain text the evaluation does not see (heldout-tail)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--calib", default="mix")
    ap.add_argument("--tokens", type=int, default=None, help="calibration tokens (default: all of it)")
    args = ap.parse_args()

    from mixquant.convert import AwqOptions, ConvertOptions, convert
    from mixquant.eval.kld import compute_reference, evaluate
    from mixquant.quant.recipe import unsloth

    work = Path(tempfile.mkdtemp(prefix="mixquant-awq-"))
    _, calib = calibration_of("fixture", args.calib, work, FIXTURE, args.chunks)
    variants = {
        "unsloth-3": None,
        "unsloth-3 + AWQ alpha 0.5": AwqOptions(calib=calib, alpha=0.5, tokens=args.tokens),
        "unsloth-3 + AWQ searched alpha": AwqOptions(calib=calib, alpha=None, tokens=args.tokens),
        "unsloth-3 + AWQ searched alpha, no end-to-end check": AwqOptions(calib=calib, alpha=None, tokens=args.tokens,
                                                                          judge_windows=0),
    }
    rows = {}
    try:
        reference = compute_reference(FIXTURE, None, 512, args.chunks, topk=0)
        for i, (name, awq) in enumerate(variants.items()):
            out = work / f"v{i}"
            started = time.perf_counter()
            convert(FIXTURE, out, ConvertOptions(recipe=unsloth(3), keep_vision=False, keep_mtp=False,
                                                 progress=False, awq=awq))
            seconds = time.perf_counter() - started
            r = evaluate(out, reference)
            rows[name] = {"kld_mean": r["kld"]["mean"], "kld_stderr": r["kld"]["stderr"],
                          "p99": r["kld"]["p99"], "same_top": r["same_top"], "convert_s": seconds}
            print(f"{name:<52} mean KLD {r['kld']['mean']:.6f} ± {r['kld']['stderr']:.6f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tag = Path(args.calib).stem
    out_json = ROOT / "benchmarks" / "results" / f"awq_fixture-{tag}.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"chunks": args.chunks, "calib": args.calib, "tokens": args.tokens,
                                    "results": rows}, indent=2) + "\n")

    table = "\n".join(
        ["| quant | mean KLD ± se | p99 | same top | convert |", "|---|---:|---:|---:|---:|"]
        + [f"| {k} | {v['kld_mean']:.5f} ± {v['kld_stderr']:.5f} | {v['p99']:.4f} | {100 * v['same_top']:.2f}% "
           f"| {v['convert_s']:.0f} s |"
           for k, v in rows.items()])
    base = rows["unsloth-3"]["kld_mean"]
    change = ", ".join(f"{k.split(' + ')[1]} {100 * (v['kld_mean'] / base - 1):+.1f}%"
                       for k, v in rows.items() if k != "unsloth-3")
    tokens = f" --tokens {args.tokens}" if args.tokens else ""
    begin, end = f"<!-- awq:{tag}:begin -->", f"<!-- awq:{tag}:end -->"
    section = f"""{begin}
### AWQ on the fixture, calibrated on {CALIB_NAMES.get(args.calib, args.calib)}

`python benchmarks/awq_fixture.py --chunks {args.chunks} --calib {args.calib}{tokens}` (evaluation: {args.chunks}
windows of 512 tokens of the bundled held-out text, float32 reference):

{table}

Mean KLD relative to plain unsloth-3: {change}.
{end}"""
    results = ROOT / "docs" / "RESULTS.md"
    text = results.read_text()
    if begin in text:
        text = re.sub(re.escape(begin) + ".*" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
