"""GGUF dequantization throughput (MB/s of float32 output) per tensor type.

    python benchmarks/dequant_speed.py [--rows 4096] [--cols 4096]

Random blocks with sane float16 scale fields, dequantized by the same function the GGUF source
uses. Target: Q4_K and Q8_0 at >= 200 MB/s of output. Writes benchmarks/results/dequant_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TARGET_MB_S = 200


def main() -> None:
    import gguf

    from mixquant.io.gguf import dequantize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    print(f"{'type':<6} {'MB/s of float32 output':>24}")
    for name in TYPES:
        qtype = gguf.GGMLQuantizationType[name]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(args.rows, args.cols // block * size), dtype=np.uint8)
        times = []
        with np.errstate(all="ignore"):  # random scale bits may be inf/nan; the speed is what counts
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = dequantize(data, qtype, args.cols)
                times.append(time.perf_counter() - t0)
        mb_s = out.nbytes / statistics.median(times) / 1e6
        results[name] = round(mb_s, 1)
        mark = "" if name not in ("Q4_K", "Q8_0") else ("  ok" if mb_s >= TARGET_MB_S else "  BELOW TARGET")
        print(f"{name:<6} {mb_s:>24.0f}{mark}")
    out_path = ROOT / "benchmarks" / "results" / "dequant_speed.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"machine": f"{platform.machine()} {platform.system()}",
                                    "shape": [args.rows, args.cols], "mb_per_s": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
