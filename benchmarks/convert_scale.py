"""Conversion and calibration memory at scale: synthetic Qwen3.5-MoE checkpoints of ~5 and ~20 GB.

    python benchmarks/convert_scale.py [--sizes 5 20] [--calib-tokens 1024] [--work DIR] [--keep]

Writes each checkpoint with benchmarks/synthetic.py (fused expert layout, which both tools read),
then, each in a child process (peak RSS is that process's ru_maxrss): converts it with
`mixquant convert -q --q-recipe unsloth --q-bits 3`; computes `mixquant imatrix`; converts with
AWQ at a fixed alpha and with AWQ's alpha searched per group (`--awq-judge-windows 0`: the judge
holds the float model, and a model over half the memory skips it anyway); imatrix and AWQ measure
--calib-tokens tokens of the bundled mix, running the float model one decoder layer at a time. The smallest is also converted with `mlx_lm.convert`
(4-bit) for seconds per GB side by side. Rows measured again replace those of the same tool and size
in the results; the others are kept, so `--sizes 20 --tools ...` adds to an earlier run.
Writes benchmarks/results/convert_scale.json and its section of docs/RESULTS.md.
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


TOOLS = {"mixquant": "convert unsloth-3", "mlx_lm.convert": "convert 4-bit", "mixquant imatrix": "imatrix",
         "mixquant awq": "convert unsloth-3 + AWQ, alpha 0.5",
         "mixquant awq-search": "convert unsloth-3 + AWQ, alpha searched"}
SMALLEST_ONLY = ("mlx_lm.convert",)


def child(tool: str, src: str, out: str, tokens: int) -> None:
    t0 = time.perf_counter()
    if tool.startswith("mixquant") and tool != "mixquant imatrix":
        from mixquant.convert import AwqOptions, ConvertOptions, convert
        from mixquant.quant.recipe import unsloth

        awq = None
        if tool == "mixquant awq":
            awq = AwqOptions(tokens=tokens, alpha=0.5)
        elif tool == "mixquant awq-search":
            awq = AwqOptions(tokens=tokens, judge_windows=0)
        convert(Path(src), Path(out), ConvertOptions(recipe=unsloth(3), progress=False, awq=awq))
    elif tool == "mixquant imatrix":
        from mixquant.calib.imatrix import compute_imatrix
        from mixquant.io.imatrix import write_imatrix_gguf

        Path(out).mkdir()
        imatrix, _, _ = compute_imatrix(Path(src), "mix", tokens, 512)
        write_imatrix_gguf(Path(out) / "imatrix.gguf", imatrix)
    else:
        from mlx_lm import convert as mlx_convert

        mlx_convert(src, mlx_path=out, quantize=True, q_bits=4, q_group_size=64)
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(tool: str, src: Path, out: Path, tokens: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", tool, str(src), str(out), "--calib-tokens",
                           str(tokens)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors")) if tool != "mixquant imatrix" \
        else (out / "imatrix.gguf").stat().st_size
    shutil.rmtree(out, ignore_errors=True)
    return result


def same_row(a: dict, b: dict) -> bool:
    return a["tool"] == b["tool"] and round(a["source_gb"]) == round(b["source_gb"])


def report(rows: list[dict]) -> None:
    earlier = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []
    rows = sorted([r for r in earlier if not any(same_row(r, n) for n in rows)] + rows,
                  key=lambda r: (round(r["source_gb"]), list(TOOLS).index(r["tool"])))
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, " \
              f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    out = {"machine": machine, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["<!-- convert-scale:begin -->", "## Conversion at scale", "",
             f"`python benchmarks/convert_scale.py` ({machine}): synthetic Qwen3.5-MoE checkpoints (64 experts, "
             "bf16, fused experts), each tool in its own process. imatrix and AWQ run the float model one decoder "
             "layer at a time.", "",
             "| source GB | tool | step | peak RSS GB | seconds | s / GB | output GB |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        step = TOOLS[r["tool"]] + (f" ({r['calib_tokens']} calibration tokens)" if "calib_tokens" in r else "")
        tool = r["tool"].split()[0]
        if "error" in r:
            lines.append(f"| {r['source_gb']:.2f} | {tool} | {step} | failed: {r['error']} | | | |")
        else:
            lines.append(f"| {r['source_gb']:.2f} | {tool} | {step} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                         f"{r['seconds']:.0f} | {r['seconds_per_gb']:.1f} | {r['output_bytes'] / 1e9:.2f} |")
    lines.append("<!-- convert-scale:end -->")
    replace_section(DOC, "convert-scale", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[5, 20])
    ap.add_argument("--work", default="/tmp/mixquant-bench-scale")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--calib-tokens", type=int, default=1024, help="calibration tokens of imatrix and AWQ")
    ap.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS))
    ap.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import mixquant

        mixquant.enable_cpu_blas()
        child(*args.child, args.calib_tokens)
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
        tools = [t for t in args.tools if t not in SMALLEST_ONLY or gb == min(args.sizes)]
        for tool in tools:
            r = measure(tool, src, work / "out", args.calib_tokens)
            r.update(tool=tool, source_gb=size)
            if tool.startswith("mixquant "):
                r["calib_tokens"] = args.calib_tokens
            if "seconds" in r:
                r["seconds_per_gb"] = r["seconds"] / size
                print(f"{size:6.2f} GB  {tool:<16} peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB, "
                      f"{r['seconds_per_gb']:.1f} s/GB", flush=True)
            else:
                print(f"{size:6.2f} GB  {tool:<16} failed: {r['error']}", flush=True)
            rows.append(r)
            report(rows)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
