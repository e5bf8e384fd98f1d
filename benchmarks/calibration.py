"""Does the default calibration hold off the lab path? GPTQ under each calibration, on text none of them saw.

    python benchmarks/calibration.py --model fixture
    python benchmarks/calibration.py --model smollm2 --rows "uniform-3 gptq, auto" "uniform-3 gptq, in-domain"

Evaluation text: 32 windows of 512 tokens from the fixture's held-out file (its domain: Python
sources, Debian package documentation, man pages), past the part bundled as the default
evaluation text, taken from every other block of BLOCK characters; the in-domain calibration is
the blocks in between (other files of the same domain). No calibration, seed prompt or sample
has seen the evaluated blocks. Every calibration gets the same budget (--calib-tokens, the
default calibration's), except the bundled mix, which holds fewer tokens and is used whole.

Rows: mlx-lm's 3-bit and 4-bit (group 64) as the peers; uniform 3-bit round-to-nearest; uniform
3-bit GPTQ under the default calibration (`auto`), the mix alone, the model's samples alone
(`self`) and in-domain text; `--q-recipe auto` at 3.6 bits per weight with GPTQ on in-domain text, and on the default
calibration with the allocation priced after GPTQ (`mixquant sensitivity --rounding gptq`);
and the one-flag path as a user runs it (`mixquant convert -i M -o OUT --target-bpw X [--quality
Q]`, the default calibration) at mlx-lm 3-bit's size (`--target-size` of its bytes), 3.6 and 4.5
bits per weight. Writes benchmarks/results/calibration-<model>.json and the section of
docs/RESULTS.md of that name, after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.allocation import FIXTURE, hf_folder, source_of, work_folder  # noqa: E402
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "RESULTS.md"
BLOCK = 64_000  # characters: many files of the held-out split per block
EVAL_PER_BLOCK = 9_000  # characters of each evaluation block that the evaluation text takes
CHUNKS = 32
CALIBS = ("auto", "mix", "self", "in-domain")


def split_heldout(work: Path) -> tuple[Path, Path]:
    """(evaluation text, in-domain calibration text), written into `work`: the fixture's held-out
    file past the bundled evaluation text (and a 1000-character gap), cut into blocks of BLOCK
    characters; the even blocks' first EVAL_PER_BLOCK characters (whole lines) are evaluated, the
    odd blocks calibrate."""
    from mixquant.bundled import EVAL_TEXT

    full = (FIXTURE / "heldout.txt").read_text(encoding="utf-8")
    bundled = EVAL_TEXT.read_text(encoding="utf-8")
    if not full.startswith(bundled):
        raise SystemExit(f"{FIXTURE / 'heldout.txt'}: does not begin with the bundled evaluation text")
    rest = full[len(bundled) + 1000 :]
    blocks = [rest[i : i + BLOCK] for i in range(0, len(rest), BLOCK)]
    evaluated = "".join(b[: b.rfind("\n", 0, EVAL_PER_BLOCK) + 1] for b in blocks[0::2])
    calib = "".join(blocks[1::2])
    paths = work / "eval-independent.txt", work / "calib-in-domain.txt"
    for path, text in zip(paths, (evaluated, calib)):
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("fixture", "smollm2"), default="fixture")
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: the default calibration's budget")
    ap.add_argument("--work", default=None)
    ap.add_argument("--rows", nargs="+", default=None, metavar="NAME", help="measure only these rows")
    ap.add_argument("--note", default=None, help="a sentence for the docs section (how the machine was shared)")
    ap.add_argument("--rewrite-doc", action="store_true", help="only regenerate the docs section from the JSON")
    args = ap.parse_args()
    results = RESULTS / f"calibration-{args.model}.json"
    if args.rewrite_doc:
        result = json.loads(results.read_text())
        write_doc({**result, **({"note": args.note} if args.note else {})})
        return

    import mixquant

    blas = mixquant.enable_cpu_blas()
    from mlx_lm import convert as mlx_convert

    from mixquant.calib.data import AUTO_TOKENS
    from mixquant.calib.sensitivity import compute_sensitivity
    from mixquant.quant.sensitivity import PROXY
    from mixquant.convert import ConvertOptions, convert
    from mixquant.eval.kld import Reference, compute_reference, evaluate
    from mixquant.quant.auto import Target
    from mixquant.quant.recipe import auto_base, uniform

    tokens = args.calib_tokens or AUTO_TOKENS
    work = work_folder(args.work, "mixquant-calibration-")
    src = source_of(args.model, work)
    eval_text, in_domain = split_heldout(work)
    ref_path = work / "reference.npz"
    if ref_path.exists():
        reference = Reference.load(ref_path)
    else:
        reference = compute_reference(src, eval_text, 512, CHUNKS, topk="auto")
        reference.save(ref_path)
    if len(reference.windows) < CHUNKS:
        raise SystemExit(f"{eval_text}: fewer than {CHUNKS} windows of 512 tokens")
    earlier = json.loads(results.read_text()) if results.exists() and args.rows else {"rows": []}
    rows = {r["name"]: r for r in earlier["rows"] if r["name"] not in args.rows} if args.rows else {}
    folder = hf_folder(src, work)

    def spec(calib: str) -> str:
        return str(in_domain) if calib == "in-domain" else calib

    def ours(recipe, rounding="nearest", calib="auto", target=None, sensitivity=None):
        def make(dest):
            convert(src, dest, ConvertOptions(recipe=recipe, keep_vision=False, keep_mtp=False, progress=False,
                                              rounding=rounding, calib=spec(calib), calib_tokens=tokens,
                                              target=target, sensitivity=sensitivity() if sensitivity else None))
        return make

    def priced_after_gptq() -> Path:
        """The default proxy sensitivity, priced after GPTQ (`mixquant sensitivity --rounding gptq`)."""
        path = work / "sensitivity-after-gptq.json"
        if not path.exists():
            compute_sensitivity(src, PROXY, "auto", out=path, rounding="gptq")
        return path

    plan = [("mlx-lm 3-bit", "-", lambda d: mlx_convert(str(folder), mlx_path=str(d), quantize=True, q_bits=3,
                                                         q_group_size=64)),
            ("mlx-lm 4-bit", "-", lambda d: mlx_convert(str(folder), mlx_path=str(d), quantize=True, q_bits=4,
                                                         q_group_size=64)),
            ("uniform-3 nearest", "-", ours(uniform(3, 64)))]
    plan += [(f"uniform-3 gptq, {c}", c, ours(uniform(3, 64), "gptq", c)) for c in CALIBS]
    plan += [("auto 3.6 gptq, in-domain", "in-domain", ours(auto_base(), "gptq", "in-domain", Target(bpw=3.6))),
             ("auto 3.6 gptq, priced after GPTQ", "auto",
              ours(auto_base(), "gptq", "auto", Target(bpw=3.6), priced_after_gptq))]
    plan += [(" ".join(flags), "auto", one_flag(src, flags, rows)) for flags in ONE_FLAG]
    unknown = set(args.rows or ()) - {name for name, _, _ in plan}
    if unknown:
        raise SystemExit(f"--rows: no such row: {', '.join(sorted(unknown))}")
    for stale in set(rows) - {n for n, _, _ in plan}:
        del rows[stale]

    for name, calib, make in plan:
        if args.rows is not None and name not in args.rows:
            continue
        path = work / "models" / "current"
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        make(path)
        seconds = time.time() - t0
        report = evaluate(path, reference)
        shutil.rmtree(path, ignore_errors=True)
        k = report["kld"]
        rows[name] = {"name": name, "calib": calib, "bpw": report["bpw"], "bytes": report["size_bytes"],
                      "mean": k["mean"], "stderr": k["stderr"], "p999": k["p999"], "same_top": report["same_top"],
                      "seconds": round(seconds, 1)}
        print(f"{name:<28} {report['bpw']:6.3f} bpw  KLD {k['mean']:.5f} ± {k['stderr']:.5f}  p99.9 {k['p999']:.4f}"
              f"  ({seconds:.0f} s)", flush=True)
        order = [n for n, _, _ in plan]
        note = args.note or earlier.get("note")
        result = {"model": args.model, "calib_tokens": tokens, "chunks": CHUNKS, "block": BLOCK,
                  **({"note": note} if note else {}),
                  "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
                  "rows": sorted(rows.values(), key=lambda r: order.index(r["name"]))}
        result["checks"] = checks(rows)
        RESULTS.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(result, indent=2) + "\n")
        write_doc(result)
    for key, value in checks(rows).items():
        print(f"{key:<48} {value:.3f}")


AT_MLX_3BIT = "--target-size (mlx-lm 3-bit's)"
ONE_FLAG = (("--target-bpw", "3.6"), (AT_MLX_3BIT,), ("--target-bpw", "4.5"),
            ("--target-bpw", "3.6", "--quality", "fast"), ("--target-bpw", "3.6", "--quality", "best"))


def one_flag(src: Path, flags: tuple[str, ...], rows: dict):
    """The user's path: `mixquant convert -i SRC -o DEST FLAGS` (no calibration flag), the MTP head and
    vision tower left out as the other rows leave them; AT_MLX_3BIT is `--target-size` of the
    mlx-lm 3-bit row's bytes."""
    from mixquant.cli import main

    def make(dest):
        given = ["--target-size", f"{rows['mlx-lm 3-bit']['bytes']}B"] if flags == (AT_MLX_3BIT,) else list(flags)
        if main(["convert", "-i", str(src), "-o", str(dest), "--drop-mtp", "--drop-vision", *given]) != 0:
            raise SystemExit(f"mixquant convert {' '.join(given)} failed")
    return make


def checks(rows: dict) -> dict:
    """The acceptance ratios whose rows have been measured: (row, peer, statistic)."""
    wanted = [("uniform-3 gptq, auto", "uniform-3 gptq, in-domain", "mean"),
              ("uniform-3 gptq, mix", "uniform-3 gptq, in-domain", "mean"),
              ("uniform-3 gptq, self", "uniform-3 gptq, in-domain", "mean"),
              ("uniform-3 gptq, auto", "uniform-3 nearest", "mean"),
              ("--target-bpw 3.6", "auto 3.6 gptq, in-domain", "mean"),
              ("auto 3.6 gptq, priced after GPTQ", "--target-bpw 3.6", "mean"),
              (AT_MLX_3BIT, "mlx-lm 3-bit", "mean"), (AT_MLX_3BIT, "mlx-lm 3-bit", "p999"),
              ("--target-bpw 3.6", "mlx-lm 4-bit", "mean"), ("--target-bpw 3.6", "mlx-lm 4-bit", "p999"),
              ("--target-bpw 3.6 --quality best", "mlx-lm 4-bit", "mean"),
              ("--target-bpw 3.6 --quality best", "mlx-lm 4-bit", "p999"),
              ("--target-bpw 4.5", "mlx-lm 4-bit", "mean")]
    return {f"{a} / {b} ({key})": rows[a][key] / rows[b][key] for a, b, key in wanted if a in rows and b in rows}


PROJECTED = {"Qwen3.5-9B": 9e9, "Qwen3.5-27B": 27e9}


def presets_table(result: dict) -> list[str]:
    """The `--quality` presets at 3.6 bits per weight side by side: quality, time here, and the
    time mixquant.quant.presets projects for larger models on the same machine."""
    from mixquant.quant.presets import PRESETS, expected_seconds

    rows = {r["name"]: r for r in result["rows"]}
    names = {"fast": "--target-bpw 3.6 --quality fast", "balanced": "--target-bpw 3.6",
             "best": "--target-bpw 3.6 --quality best"}
    if not any(n in rows for n in names.values()):
        return []
    lines = ["", f"Presets at 3.6 bits per weight (`--quality`; balanced is the default), time measured here and "
                 f"projected by `mixquant.quant.presets` for larger models on this machine "
                 f"({result['calib_tokens']} calibration tokens):", "",
             "| preset | steps | mean KLD ± se | p99.9 | s here | "
             + " | ".join(f"projected {m}" for m in PROJECTED) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(PROJECTED)]
    for preset, name in names.items():
        if name not in rows:
            continue
        r, p = rows[name], PRESETS[preset]
        hours = [f"{expected_seconds(p, n, result['calib_tokens'], True) / 3600:.1f} h" for n in PROJECTED.values()]
        lines.append(f"| {preset} | {p.summary} | {r['mean']:.5f} ± {r['stderr']:.5f} | {r['p999']:.4f} | "
                     f"{r['seconds']} | " + " | ".join(hours) + " |")
    return lines


def write_doc(result: dict) -> None:
    key = f"calibration-{result['model']}"
    lines = [f"<!-- {key}:begin -->",
             f"## Default calibration off the lab path: {result['model']}", "",
             f"`python benchmarks/calibration.py --model {result['model']}` ({result['machine']}). Evaluation: "
             f"{result['chunks']} windows of 512 tokens of held-out text of the fixture's domain that no calibration, "
             "seed prompt or sample has seen (every other block of the held-out file past the bundled evaluation "
             f"text); in-domain calibration: the blocks in between. Calibration budget {result['calib_tokens']} "
             "tokens for every calibration but the bundled mix (used whole). `auto` is the default: for the rounding, the "
             "mix and the model's own continuations of seed prompts from it; for the allocation's proxy, 8 windows of "
             "text the model samples from its start token (the one-flag rows and `priced after GPTQ`; the other auto "
             "rows are uniform and have no proxy)." + (f" {result['note']}" if result.get("note") else ""),
             "",
             "| quant | calibration | bpw | mean KLD ± se | p99.9 | same top | convert s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['calib']} | {r['bpw']:.3f} | {r['mean']:.5f} ± {r['stderr']:.5f} | "
                     f"{r['p999']:.4f} | {100 * r['same_top']:.2f}% | {r['seconds']} |")
    lines += presets_table(result)
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["checks"].items()]
    lines.append(f"<!-- {key}:end -->")
    replace_section(DOC, key, "\n".join(lines))


if __name__ == "__main__":
    main()
