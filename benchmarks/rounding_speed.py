"""What GPTQ costs against the unavoidable part: one forward pass over its calibration tokens.

    python benchmarks/rounding_speed.py [--model fixture smollm2] [--calib-tokens 16384]

For each model (the fixture; SmolLM2-135M-Instruct from its GGUF), on the same calibration tokens
of the bundled mix (no sampling, so that both runs read the same text): `mixquant imatrix` (one
float forward, layer by layer, collecting the inputs' squares), `convert` uniform 3-bit rounded to
nearest (the writing that every conversion does), and `convert --q-rounding gptq` (Hessians in MLX,
the columns rounded by mixquant.quant.gptq_mlx, every expert of a stack at once). Each in a child
process, one after another, nothing else running, after one untimed short imatrix run (so that every
timed run finds the model and the package in the page cache). Writes benchmarks/results/rounding_speed.json
and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rounding_speed.json"
DOC = ROOT / "docs" / "RESULTS.md"
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
MIXQUANT = [str(Path(sys.executable).parent / "mixquant")]  # the command, as a user runs it


def source(model: str) -> Path:
    if model == "fixture":
        return FIXTURE
    sys.path.insert(0, str(ROOT / "tests"))
    import llamacpp_tools

    return llamacpp_tools.smollm2_gguf()


def timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([*MIXQUANT, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_model(model: str, tokens: int, work: Path) -> dict:
    src = str(source(model))
    # a first run reads the model and the package from disk into the page cache; the timed runs find them there
    timed(["imatrix", "-m", src, "-o", str(work / f"{model}-warm.gguf"), "--calib", "mix", "--tokens", "512"])
    common = ["--calib", "mix", "--calib-tokens", str(tokens)]
    rows = {"imatrix": timed(["imatrix", "-m", src, "-o", str(work / f"{model}.gguf"), "--calib", "mix",
                              "--tokens", str(tokens)]),
            "convert uniform-3, nearest": timed(["convert", "-i", src, "-o", str(work / f"{model}-nearest"), "-q",
                                                 "--q-recipe", "uniform", "--q-bits", "3", "--drop-vision"]),
            "convert uniform-3, gptq": timed(["convert", "-i", src, "-o", str(work / f"{model}-gptq"), "-q",
                                              "--q-recipe", "uniform", "--q-bits", "3", "--drop-vision",
                                              "--q-rounding", "gptq", *common])}
    for name, seconds in rows.items():
        print(f"{model}: {name} {seconds:.1f} s", flush=True)
    return {"model": model, "tokens": tokens, "seconds": rows,
            "gptq_over_imatrix": rows["convert uniform-3, gptq"] / rows["imatrix"],
            "gptq_less_writing_over_imatrix": (rows["convert uniform-3, gptq"] - rows["convert uniform-3, nearest"])
            / rows["imatrix"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=("fixture", "smollm2"), default=["fixture", "smollm2"])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--rewrite-doc", action="store_true")
    args = ap.parse_args()
    if args.rewrite_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return
    from mixquant import cpu_blas

    work = Path(tempfile.mkdtemp(prefix="mixquant-rounding-speed-"))
    earlier = {m["model"]: m for m in json.loads(RESULTS.read_text())["models"]} if RESULTS.exists() else {}
    for model in args.model:
        earlier[model] = run_model(model, args.calib_tokens, work)
    out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {cpu_blas.enable()}",
           "models": [earlier[m] for m in ("fixture", "smollm2") if m in earlier]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    lines = ["<!-- rounding-speed:begin -->", "## Rounding speed: GPTQ against one forward pass", "",
             f"`python benchmarks/rounding_speed.py` ({out['machine']}): wall time of each command in its own "
             "process, the same calibration tokens of the bundled mix for imatrix and GPTQ. GPTQ's Hessians "
             "are summed in MLX and its columns rounded by mixquant.quant.gptq_mlx (every expert of a stack "
             "at once); the ratio's target is 2x the imatrix pass.", "",
             "| model | tokens | imatrix s | convert nearest s | convert GPTQ s | GPTQ / imatrix | "
             "(GPTQ - nearest) / imatrix |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in out["models"]:
        s = m["seconds"]
        lines.append(f"| {m['model']} | {m['tokens']} | {s['imatrix']:.1f} | {s['convert uniform-3, nearest']:.1f} | "
                     f"{s['convert uniform-3, gptq']:.1f} | {m['gptq_over_imatrix']:.2f}x | "
                     f"{m['gptq_less_writing_over_imatrix']:.2f}x |")
    lines += ["<!-- rounding-speed:end -->"]
    replace_section(DOC, "rounding-speed", "\n".join(lines))


if __name__ == "__main__":
    main()
