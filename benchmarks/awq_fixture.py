"""Does AWQ help on the fixture? unsloth-3 without AWQ, with fixed alpha 0.5, with searched alpha.

    python benchmarks/awq_fixture.py [--chunks 32] [--calib mix]

Evaluates the three quants against one float32 reference on the bundled held-out text and writes
the numbers into the "AWQ" section of docs/RESULTS.md (and benchmarks/results/awq_fixture.json).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--calib", default="mix")
    args = ap.parse_args()

    from mixquant.convert import AwqOptions, ConvertOptions, convert
    from mixquant.eval.kld import compute_reference, evaluate
    from mixquant.quant.recipe import unsloth

    variants = {
        "unsloth-3": None,
        "unsloth-3 + AWQ alpha 0.5": AwqOptions(calib=args.calib, alpha=0.5),
        "unsloth-3 + AWQ searched alpha": AwqOptions(calib=args.calib, alpha=None),
    }
    work = Path(tempfile.mkdtemp(prefix="mixquant-awq-"))
    rows = {}
    try:
        reference = compute_reference(FIXTURE, None, 512, args.chunks, topk=0)
        for i, (name, awq) in enumerate(variants.items()):
            out = work / f"v{i}"
            convert(FIXTURE, out, ConvertOptions(recipe=unsloth(3), keep_vision=False, keep_mtp=False,
                                                 progress=False, awq=awq))
            r = evaluate(out, reference)
            rows[name] = {"kld_mean": r["kld"]["mean"], "kld_stderr": r["kld"]["stderr"],
                          "p99": r["kld"]["p99"], "same_top": r["same_top"]}
            print(f"{name:<34} mean KLD {r['kld']['mean']:.6f} ± {r['kld']['stderr']:.6f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out_json = ROOT / "benchmarks" / "results" / "awq_fixture.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"chunks": args.chunks, "calib": args.calib, "results": rows}, indent=2) + "\n")

    table = "\n".join(
        ["| quant | mean KLD ± se | p99 | same top |", "|---|---:|---:|---:|"]
        + [f"| {k} | {v['kld_mean']:.5f} ± {v['kld_stderr']:.5f} | {v['p99']:.4f} | {100 * v['same_top']:.2f}% |"
           for k, v in rows.items()])
    base = rows["unsloth-3"]["kld_mean"]
    change = ", ".join(f"{k.split(' + ')[1]} {100 * (v['kld_mean'] / base - 1):+.1f}%"
                       for k, v in rows.items() if k != "unsloth-3")
    section = f"""<!-- awq:begin -->
## AWQ on the fixture

`python benchmarks/awq_fixture.py --chunks {args.chunks} --calib {args.calib}` (calibration: {args.calib};
evaluation: {args.chunks} windows of 512 tokens of the bundled held-out text, float32 reference):

{table}

Mean KLD relative to plain unsloth-3: {change}.
<!-- awq:end -->"""
    results = ROOT / "docs" / "RESULTS.md"
    text = results.read_text()
    if "<!-- awq:begin -->" in text:
        text = re.sub(r"<!-- awq:begin -->.*<!-- awq:end -->", lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    results.write_text(text)


if __name__ == "__main__":
    main()
