"""One process against two on this machine, through MLX's ring backend (mixquant.distributed).

    python benchmarks/distributed.py [--tokens 16384] [--learn-steps 50] [--distill-steps 50] [--gen-tokens 64]

- imatrix, GPTQ (`convert -q --q-rounding gptq`), learned rounding (`--q-rounding learned`) and
  distillation (`--q-distill`) on the fixture (the bundled mix): wall time of 1 and of 2 processes
  (each one BLAS thread), each process's peak resident memory, and whether the outputs are
  byte-identical.
- decode of the fixture's unsloth-3 quant: `mixquant bench` alone, and under `--shard pipeline`
  and `--shard tensor` with 2 processes (prefill and decode tokens per second, rank 0's figures).

Each command runs in its own processes, ranks started as mlx.launch's ring backend starts them
(mixquant.distributed.run_local). Writes benchmarks/results/distributed.json and the section
"Several processes" of docs/RESULTS.md.
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

FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
CLI = [sys.executable, "-m", "mixquant"]
TIMEOUT = 3600
# each process runs under this one, which says on its last stderr line how much memory it held at most
PEAK = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == 'darwin' else 1024); "
        "print(f'peak_rss_bytes {peak}', file=sys.stderr); sys.exit(code)")


def ranks(n: int, argv: list[str]) -> tuple[float, list]:
    """(wall seconds, per-rank (code, stdout, stderr)) of `argv` on n processes (n = 1: alone)."""
    from mixquant.distributed import run_local

    argv = [sys.executable, "-c", PEAK] + CLI + [str(a) for a in argv]
    t0 = time.perf_counter()
    if n == 1:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                             env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        results = [(run.returncode, run.stdout, run.stderr)]
    else:
        results = run_local([argv] * n, TIMEOUT)
    seconds = time.perf_counter() - t0
    for code, _, err in results:
        if code != 0:
            raise SystemExit(f"{' '.join(argv)}: exit {code}\n{err}")
    return seconds, results


def contents(path: Path) -> dict:
    """name -> bytes of a file, or of every file of a folder."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else {"": path.read_bytes()}


def peaks_gb(results: list) -> list[float]:
    """Each process's peak resident memory (GB), from PEAK's line."""
    return [round(int(err.rstrip().rsplit("\n", 1)[-1].split()[1]) / 1e9, 3) for _, _, err in results]


ONE_WINDOW = 512  # tokens: a run on one window is what imatrix costs beyond its windows' work
# GPTQ's one-window run holds its solves, which are split too; learned rounding's and distillation's
# work is set by their steps: only imatrix's is all start-up, reading and writing
SCALES_WITH_WINDOWS = ("imatrix",)


def calibration_rows(tmp: Path, tokens: int, learn_steps: int, distill_steps: int) -> list[dict]:
    commands = {  # (output, calibration tokens) -> argv
        "imatrix": lambda out, t: ["imatrix", "-m", FIXTURE, "-o", out, "--calib", "mix", "--tokens", t],
        "GPTQ": lambda out, t: ["convert", "-i", FIXTURE, "-o", out, "-q", "--q-rounding", "gptq", "--calib", "mix",
                                "--calib-tokens", t],
        "learned rounding": lambda out, t: ["convert", "-i", FIXTURE, "-o", out, "-q", "--q-rounding", "learned",
                                            "--q-learn-steps", learn_steps, "--calib", "mix", "--calib-tokens", t],
        "distillation": lambda out, t: ["convert", "-i", FIXTURE, "-o", out, "-q", "--q-distill", distill_steps,
                                        "--calib", "mix", "--calib-tokens", t],
    }
    rows = []
    for command, argv in commands.items():
        files = {}
        for n in (1, 2):
            out = tmp / f"{command.replace(' ', '-')}-{n}{'.gguf' if command == 'imatrix' else ''}"
            seconds, results = ranks(n, argv(out, tokens))
            files[n] = contents(out)
            rows.append({"command": command, "processes": n, "seconds": round(seconds, 2),
                         "peak_rss_gb": peaks_gb(results)})
        rows[-1]["speedup"] = round(rows[-2]["seconds"] / rows[-1]["seconds"], 3)
        rows[-1]["identical"] = files[1] == files[2]
        if command in SCALES_WITH_WINDOWS:
            fixed, _ = ranks(1, argv(tmp / f"{command}-short{'.gguf' if command == 'imatrix' else ''}", ONE_WINDOW))
            whole = rows[-2]["seconds"]
            rows[-1]["one_window_seconds"] = round(fixed, 2)
            rows[-1]["bound"] = round(whole / (fixed + (whole - fixed) / 2), 3)
    return rows


def decode_rows(tmp: Path, gen_tokens: int) -> list[dict]:
    quant = tmp / "unsloth3"
    subprocess.run(CLI + ["convert", "-i", str(FIXTURE), "-o", str(quant), "-q"], check=True, capture_output=True)
    rows = []
    for n, mode in ((1, None), (2, "pipeline"), (2, "tensor")):
        report = tmp / f"bench-{mode}.json"
        argv = ["bench", quant, "--prompt-tokens", 512, "--gen-tokens", gen_tokens, "--turns", 1, "--repeats", 3,
                "--json", report] + (["--shard", mode] if mode else [])
        _, results = ranks(n, argv)
        result = json.loads(report.read_text())["results"][0]
        rows.append({"command": "bench", "processes": n, "shard": mode or "-", "peak_rss_gb": peaks_gb(results),
                     "prefill_tok_s": round(result["prefill_tok_s"], 1),
                     "decode_tok_s": round(result["decode_tok_s"], 1)})
    for r in rows[1:]:
        r["decode_speedup"] = round(r["decode_tok_s"] / rows[0]["decode_tok_s"], 3)
    return rows


def markdown(out: dict) -> str:
    cal, dec = out["calibration"], out["decode"]
    lines = ["<!-- distributed:begin -->", "## Several processes: mlx.distributed on one machine", "",
             f"`python benchmarks/distributed.py --tokens {out['tokens']} --learn-steps {out['learn_steps']} "
             f"--distill-steps {out['distill_steps']} --gen-tokens {out['gen_tokens']}` "
             f"({out['machine']}): each command in its own processes, the ranks on this one machine over MLX's "
             "ring backend (127.0.0.1), one BLAS thread per process, the single process with one thread too. "
             "On two cores two ranks can at best halve the time; what the ring costs shows here, not what two "
             "machines would give.", "",
             "| command | processes | seconds | speed-up | peak RSS per process (GB) | output identical to 1 process |",
             "|---|---|---|---|---|---|"]
    steps = {"learned rounding": f" ({out['learn_steps']} steps a layer)",
             "distillation": f" ({out['distill_steps']} steps)"}
    for r in cal:
        what = f"{r['command']}{steps.get(r['command'], '')}"
        lines.append(f"| {what}, fixture, {out['tokens']} tokens | {r['processes']} | {r['seconds']:.2f} | "
                     f"{r.get('speedup', 1.0):.2f}x | {_peaks(r)} | "
                     f"{'yes (byte for byte)' if r.get('identical', True) else 'NO'} |")
    bounds = [r for r in cal if "bound" in r]
    if bounds:
        lines += ["", "What every rank of an imatrix run repeats (start-up, reading the model, writing) shows in a "
                  "run on one "
                  f"{ONE_WINDOW}-token window alone: " + ", ".join(f"{r['command']} {r['one_window_seconds']:.2f} s"
                                                                 for r in bounds)
                  + ". Were the rest halved exactly, two processes would give at best "
                  + ", ".join(f"{r['bound']:.2f}x ({r['command']})" for r in bounds)
                  + f" at {out['tokens']} tokens; the rest of the gap (the ranks' exchanges, two processes on one "
                  "machine's caches and memory) is not measured apart here. More tokens give the split more "
                  "weight."]
    lines += ["", "| decode, fixture unsloth-3 | processes | shard | prefill tok/s | decode tok/s | decode speed-up | "
              "peak RSS per process (GB) |", "|---|---|---|---|---|---|---|"]
    for r in dec:
        lines.append(f"| 512-token prompt, {out['gen_tokens']} tokens | {r['processes']} | {r['shard']} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r.get('decode_speedup', 1.0):.2f}x | "
                     f"{_peaks(r)} |")
    lines += ["", "Greedy tokens under both splits equal one process's, and sensitivity splits its work too (the "
              "proxy its windows, a measured run its units; tests/test_distributed.py). GPTQ deals whole batches "
              "of windows to the ranks and each layer's linears by cost; learned rounding deals each step's "
              "windows, the ranks' gradients added in one process's order; distillation splits only its held-out "
              "checks (every rank takes the same training steps, one window each), so it gains least. Every rank "
              "of a calibration holds what one process holds (the float model a layer at a time, or whole for "
              "distillation): the split buys time, not memory. The fixture's weights are 26 MB, so MLX's and "
              "Python's own ~0.35 GB are most of every memory figure here.",
              "<!-- distributed:end -->"]
    return "\n".join(lines)


def _peaks(row: dict) -> str:
    return " / ".join(f"{g:.2f}" for g in row["peak_rss_gb"])


def main() -> None:
    from benchmarks.report import replace_section
    from mixquant import cpu_blas

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--learn-steps", type=int, default=50)
    ap.add_argument("--distill-steps", type=int, default=50)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    blas = cpu_blas.enable() or "MLX's own"
    with tempfile.TemporaryDirectory(prefix="mixquant-distributed-") as tmp:
        out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
               "tokens": args.tokens, "learn_steps": args.learn_steps, "distill_steps": args.distill_steps,
               "gen_tokens": args.gen_tokens,
               "calibration": calibration_rows(Path(tmp), args.tokens, args.learn_steps, args.distill_steps),
               "decode": decode_rows(Path(tmp), args.gen_tokens)}
    for r in out["calibration"] + out["decode"]:
        print(r)
    path = ROOT / "benchmarks" / "results" / "distributed.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    replace_section(ROOT / "docs" / "RESULTS.md", "distributed", markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
