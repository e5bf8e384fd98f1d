"""Is `mixquant bench --compare` fair on a noisy machine? Bench a model against itself.

    python benchmarks/bench_repeatability.py [--runs 3] [--prompt-tokens 64] [--gen-tokens 48]

Converts the bundled fixture (unsloth-4), then runs `mixquant bench M --compare M` several times
and prints each run's decode and prefill ratios; a fair comparison keeps them within 0.9-1.1.
Writes benchmarks/results/bench_repeatability.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=48)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mixquant-benchrep-"))
    runs = []
    try:
        model = work / "q4"
        subprocess.run([sys.executable, "-m", "mixquant.cli", "convert", "-i", str(FIXTURE), "-o", str(model),
                        "-q", "--q-bits", "4", "--drop-vision", "--drop-mtp"], check=True, capture_output=True)
        for i in range(args.runs):
            out = work / f"run{i}.json"
            subprocess.run([sys.executable, "-m", "mixquant.cli", "bench", str(model), "--compare", str(model),
                            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                            "--turns", "2", "--repeats", "3", "--json", str(out)], check=True, capture_output=True)
            runs.append(json.loads(out.read_text()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'run':>4} {'decode A':>9} {'decode B':>9} {'decode ratio':>13} {'prefill ratio':>14}")
    for i, r in enumerate(runs):
        a, b = r["results"]
        print(f"{i:>4} {a['decode_tok_s']:>9.2f} {b['decode_tok_s']:>9.2f} {r['ratio']['decode_tok_s']:>13.3f} "
              f"{r['ratio']['prefill_tok_s']:>14.3f}")
    ok = all(0.9 <= r["ratio"]["decode_tok_s"] <= 1.1 for r in runs)
    print("all decode ratios within 0.9-1.1" if ok else "SOME DECODE RATIOS OUTSIDE 0.9-1.1")
    out = ROOT / "benchmarks" / "results" / "bench_repeatability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()} {platform.system()}", "runs": runs,
                               "within_0.9_1.1": ok}, indent=2) + "\n")


if __name__ == "__main__":
    main()
