"""One process against two on this machine, through MLX's ring backend (mixquant.distributed).

    python benchmarks/distributed.py [--tokens 16384] [--learn-steps 50] [--gen-tokens 64]

- imatrix, GPTQ (`convert -q --q-rounding gptq`) and learned rounding (`--q-rounding learned`) on
  the fixture (the bundled mix): wall time of 1 and of 2 processes (each one BLAS thread), and
  whether the outputs are byte-identical.
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


def ranks(n: int, argv: list[str]) -> tuple[float, list]:
    """(wall seconds, per-rank (code, stdout, stderr)) of `argv` on n processes (n = 1: alone)."""
    from mixquant.distributed import run_local

    argv = CLI + [str(a) for a in argv]
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


def calibration_rows(tmp: Path, tokens: int, learn_steps: int) -> list[dict]:
    commands = {
        "imatrix": lambda out: ["imatrix", "-m", FIXTURE, "-o", out, "--calib", "mix", "--tokens", tokens],
        "GPTQ": lambda out: ["convert", "-i", FIXTURE, "-o", out, "-q", "--q-rounding", "gptq", "--calib", "mix",
                             "--calib-tokens", tokens],
        "learned rounding": lambda out: ["convert", "-i", FIXTURE, "-o", out, "-q", "--q-rounding", "learned",
                                         "--q-learn-steps", learn_steps, "--calib", "mix", "--calib-tokens", tokens],
    }
    rows = []
    for command, argv in commands.items():
        files = {}
        for n in (1, 2):
            out = tmp / f"{command.replace(' ', '-')}-{n}{'.gguf' if command == 'imatrix' else ''}"
            seconds, _ = ranks(n, argv(out))
            files[n] = contents(out)
            rows.append({"command": command, "processes": n, "seconds": round(seconds, 2)})
        rows[-1]["speedup"] = round(rows[-2]["seconds"] / rows[-1]["seconds"], 3)
        rows[-1]["identical"] = files[1] == files[2]
    return rows


def decode_rows(tmp: Path, gen_tokens: int) -> list[dict]:
    quant = tmp / "unsloth3"
    subprocess.run(CLI + ["convert", "-i", str(FIXTURE), "-o", str(quant), "-q"], check=True, capture_output=True)
    rows = []
    for n, mode in ((1, None), (2, "pipeline"), (2, "tensor")):
        report = tmp / f"bench-{mode}.json"
        argv = ["bench", quant, "--prompt-tokens", 512, "--gen-tokens", gen_tokens, "--turns", 1, "--repeats", 3,
                "--json", report] + (["--shard", mode] if mode else [])
        ranks(n, argv)
        result = json.loads(report.read_text())["results"][0]
        rows.append({"command": "bench", "processes": n, "shard": mode or "-",
                     "prefill_tok_s": round(result["prefill_tok_s"], 1),
                     "decode_tok_s": round(result["decode_tok_s"], 1)})
    for r in rows[1:]:
        r["decode_speedup"] = round(r["decode_tok_s"] / rows[0]["decode_tok_s"], 3)
    return rows


def markdown(out: dict) -> str:
    cal, dec = out["calibration"], out["decode"]
    lines = ["<!-- distributed:begin -->", "## Several processes: mlx.distributed on one machine", "",
             f"`python benchmarks/distributed.py --tokens {out['tokens']} --gen-tokens {out['gen_tokens']}` "
             f"({out['machine']}): each command in its own processes, the ranks on this one machine over MLX's "
             "ring backend (127.0.0.1), one BLAS thread per process, the single process with one thread too. "
             "On two cores two ranks can at best halve the time; what the ring costs shows here, not what two "
             "machines would give.", "",
             "| command | processes | seconds | speed-up | output identical to 1 process |", "|---|---|---|---|---|"]
    for r in cal:
        steps = f" ({out['learn_steps']} steps a layer)" if r["command"] == "learned rounding" else ""
        what = f"{r['command']}{steps}"
        lines.append(f"| {what}, fixture, {out['tokens']} tokens | {r['processes']} | {r['seconds']:.2f} | "
                     f"{r.get('speedup', 1.0):.2f}x | {'yes (byte for byte)' if r.get('identical', True) else 'NO'} |")
    lines += ["", "| decode, fixture unsloth-3 | processes | shard | prefill tok/s | decode tok/s | decode speed-up |",
              "|---|---|---|---|---|---|"]
    for r in dec:
        lines.append(f"| 512-token prompt, {out['gen_tokens']} tokens | {r['processes']} | {r['shard']} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r.get('decode_speedup', 1.0):.2f}x |")
    lines += ["", "Greedy tokens under both splits equal one process's, and sensitivity's proxy splits its windows "
              "too (tests/test_distributed.py). GPTQ deals whole batches of windows to the ranks and each layer's "
              "linears by cost; learned rounding deals each step's windows, the ranks' gradients added in one "
              "process's order. Distillation and measured sensitivity do not run split yet.",
              "<!-- distributed:end -->"]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.report import replace_section
    from mixquant import cpu_blas

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--learn-steps", type=int, default=50)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    blas = cpu_blas.enable() or "MLX's own"
    with tempfile.TemporaryDirectory(prefix="mixquant-distributed-") as tmp:
        out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
               "tokens": args.tokens, "learn_steps": args.learn_steps, "gen_tokens": args.gen_tokens,
               "calibration": calibration_rows(Path(tmp), args.tokens, args.learn_steps),
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
