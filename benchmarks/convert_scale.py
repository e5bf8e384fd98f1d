"""Conversion memory at scale: synthetic Qwen3.5-MoE checkpoints of ~5 and ~20 GB, unsloth-3.

    python benchmarks/convert_scale.py [--sizes 5 20] [--work DIR] [--keep]

Writes each checkpoint with benchmarks/synthetic.py (fused expert layout, which both tools read),
converts it with `mixquant convert -q --q-recipe unsloth --q-bits 3` in a child process (peak RSS is
that process's ru_maxrss), and converts the smallest with `mlx_lm.convert` (4-bit) for seconds per
GB side by side. Writes benchmarks/results/convert_scale.json and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402
from benchmarks.synthetic import write  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results" / "convert_scale.json"
DOC = ROOT / "docs" / "RESULTS.md"


def child(tool: str, src: str, out: str) -> None:
    t0 = time.perf_counter()
    if tool == "mixquant":
        from mixquant.convert import ConvertOptions, convert
        from mixquant.quant.recipe import unsloth

        convert(Path(src), Path(out), ConvertOptions(recipe=unsloth(3), progress=False))
    else:
        from mlx_lm import convert as mlx_convert

        mlx_convert(src, mlx_path=out, quantize=True, q_bits=4, q_group_size=64)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(tool: str, src: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", tool, str(src), str(out)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[5, 20])
    ap.add_argument("--work", default="/tmp/mixquant-bench-scale")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import mixquant

        mixquant.enable_cpu_blas()
        child(*args.child)
        return
    work = Path(args.work)
    rows = []
    for gb in sorted(args.sizes):
        src = work / f"moe-{gb:g}gb"
        if not src.exists():
            t0 = time.perf_counter()
            write(src, gb, layout="fused")
            print(f"wrote {src} in {time.perf_counter() - t0:.0f} s", flush=True)
        size = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9
        tools = ["mixquant"] + (["mlx_lm.convert"] if gb == min(args.sizes) else [])
        for tool in tools:
            r = measure(tool, src, work / "out")
            r.update(tool=tool, source_gb=size)
            if "seconds" in r:
                r["seconds_per_gb"] = r["seconds"] / size
                print(f"{size:6.2f} GB  {tool:<15} peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"{r['seconds_per_gb']:.1f} s/GB", flush=True)
            else:
                print(f"{size:6.2f} GB  {tool:<15} failed: {r['error']}", flush=True)
            rows.append(r)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, " \
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    out = {"machine": machine, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["<!-- convert-scale:begin -->", "## Conversion at scale", "",
             f"`python benchmarks/convert_scale.py` ({machine}): synthetic Qwen3.5-MoE checkpoints (64 experts, "
             "bf16, fused experts), each tool in its own process.", "",
             "| source GB | tool | recipe | peak RSS GB | seconds | s / GB | output GB |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        recipe = "unsloth-3" if r["tool"] == "mixquant" else "4-bit"
        if "error" in r:
            lines.append(f"| {r['source_gb']:.2f} | {r['tool']} | {recipe} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['source_gb']:.2f} | {r['tool']} | {recipe} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                         f"{r['seconds']:.0f} | {r['seconds_per_gb']:.1f} | {r['output_bytes'] / 1e9:.2f} |")
    lines.append("<!-- convert-scale:end -->")
    replace_section(DOC, "convert-scale", "\n".join(lines))


if __name__ == "__main__":
    main()
