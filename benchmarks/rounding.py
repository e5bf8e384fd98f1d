"""What each step buys per byte: round-to-nearest, GPTQ, distillation, measured allocation, against
mlx-lm's 4-bit (4.5 bpw); and mlx-lm's own GPTQ where it runs.

    python benchmarks/rounding.py --model fixture [--calib heldout-tail] [--distill-steps 64]
    python benchmarks/rounding.py --model smollm2 [--calib mix]
    python benchmarks/rounding.py --model fixture --calib fixture-heldout-tail --calib-tokens 131072 \
        --distill-steps 256 --tag=-128k --rows "uniform-3 gptq" "uniform-3 gptq + distill" ...

Every quant is evaluated on the bundled held-out text (32 windows of 512 tokens) that no
calibration sees; calibration is the same text budget for every method that uses one. Rows:
uniform 3-bit and 4-bit (group 64) to nearest (MLX's own quantizer) and with GPTQ, GPTQ plus
distillation at 3-bit, and the headline: `--q-recipe auto` at 3.6 and 4.5 bits per weight with
GPTQ and distillation against `mlx_lm.convert -q --q-bits 4 --q-group-size 64`; then the
distillation rows again with the norm multipliers tuned too, and with every unquantized float
tensor of the text model (`--q-distill-floats`); then learned rounding
(`--q-rounding learned`) in GPTQ's place, alone and under distillation. Seconds per step and per billion
parameters are recorded. Writes benchmarks/results/rounding-<model><tag>.json and
the section of docs/RESULTS.md of that name, after every row (a run cut short keeps what it measured).
A run with --rows adds to that file: its other rows stay, if they were measured with the same
settings, and the section lists the commands that measured them.
GPTQ's and learned rounding's results are kept in the work folder (`rounding/`, see
--q-rounding-cache) and reused by a later row, or a later run with the same --work, that would
compute the same one again; that row's seconds leave the rounding out, and its table cells say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.allocation import calibration_of, hf_folder, reference_of, source_of, work_folder  # noqa: E402
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "RESULTS.md"
LATER_SETTINGS = {"distill_anneal": False,  # settings newer than some results files: what those were measured with
                  "distill_lr": 3e-4,
                  "distill_held_out": "a quarter of the windows, checked after every pass"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("fixture", "smollm2"), default="fixture")
    ap.add_argument("--calib", default=None,
                    help="auto (default: the default calibration) | mix | self | heldout-tail | "
                         "fixture-heldout-tail (in-domain, fixture) | FILE")
    ap.add_argument("--calib-tokens", type=int, default=16 * 512)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--distill-steps", type=int, default=64)
    ap.add_argument("--distill-anneal", action="store_true",
                    help="distillation's learning rate falls linearly toward zero over the second half of the steps")
    ap.add_argument("--distill-lr", type=float, default=None,
                    help="distillation's learning rate (default: the convert default)")
    ap.add_argument("--learn-steps", type=int, default=None,
                    help="learned rounding's steps per decoder layer (default: the convert default, 200)")
    ap.add_argument("--sensitivity", default=None, help="for the auto rows (default: a proxy on the calibration)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--rows", nargs="+", default=None, metavar="NAME",
                    help="measure only these rows; the other rows of the results file are kept")
    ap.add_argument("--tag", default="", help="suffix of the JSON and docs section (a second calibration budget)")
    ap.add_argument("--note", default="", help="a sentence for the docs section (how the machine was shared)")
    ap.add_argument("--rewrite-doc", action="store_true",
                    help="only regenerate the docs section from benchmarks/results/rounding-<model><tag>.json")
    args = ap.parse_args()
    if args.rewrite_doc:
        write_doc(json.loads((RESULTS / f"rounding-{args.model}{args.tag}.json").read_text()))
        return

    import mixquant

    blas = mixquant.enable_cpu_blas()
    from mlx_lm import convert as mlx_convert

    from mixquant.calib.sensitivity import compute_sensitivity
    from mixquant.convert import ConvertOptions, convert
    from mixquant.eval.kld import evaluate
    from mixquant.loading import count_parameters, load
    from mixquant.quant.auto import Target
    from mixquant.quant.distill import EVAL_EVERY, HELD_OUT_MAX, LEARNING_RATE
    from mixquant.quant.learned import STEPS
    from mixquant.quant.recipe import auto_base, uniform

    work = work_folder(args.work, "mixquant-rounding-")
    argv = sys.argv[1:]  # the command that reproduces the figures: without where they were kept, or the note
    hidden = ("--work", "--note")
    argv = [a for i, a in enumerate(argv) if a not in hidden and (i == 0 or argv[i - 1] not in hidden)]
    command = shlex.join(["python", "benchmarks/rounding.py", *argv])
    src = source_of(args.model, work)
    calib, calib_path = calibration_of(args.model, args.calib, work, src, args.chunks)
    reference = reference_of(src, work, args.chunks)
    params = count_parameters(load(src, dtype="float32").model)
    sens = {}  # the rounding a proxy is priced for -> its file (as convert prices it: after GPTQ where it rounds)
    for rounding in ("nearest", "gptq"):
        sens[rounding] = Path(args.sensitivity) if args.sensitivity else work / f"sensitivity-proxy-{rounding}.json"
        if not sens[rounding].exists():
            compute_sensitivity(src, "proxy", calib_path, 8, 512, out=sens[rounding], rounding=rounding)

    settings = {"model": args.model, "tag": args.tag, "calib": calib, "calib_tokens": args.calib_tokens,
                "chunks": args.chunks, "distill_steps": args.distill_steps, "distill_anneal": args.distill_anneal,
                "distill_lr": args.distill_lr or LEARNING_RATE,
                "distill_held_out": f"a quarter of the windows (at most {HELD_OUT_MAX}), checked every {EVAL_EVERY} "
                                    "steps or after every pass if sooner",
                "learn_steps": args.learn_steps or STEPS}
    results = RESULTS / f"rounding-{args.model}{args.tag}.json"
    earlier = earlier_run(results if args.rows else None, settings)
    commands = earlier["commands"] + [command] * (command not in earlier["commands"])
    notes = earlier["notes"] + [args.note] * bool(args.note and args.note not in earlier["notes"])
    rows = {r["name"]: r for r in earlier["rows"] if r["name"] not in args.rows}

    def row(name: str, make, group: str) -> dict:
        cache = work / f"eval-{name.replace(' ', '_').replace('/', '-')}.json"
        if cache.exists():
            rows[name] = json.loads(cache.read_text())
            return rows[name]
        path = work / "models" / "current"
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        reused = make(path) is True
        seconds = time.time() - t0
        report = evaluate(path, reference)
        shutil.rmtree(path, ignore_errors=True)
        k = report["kld"]
        rows[name] = {"name": name, "group": group, "bytes": report["size_bytes"], "bpw": report["bpw"],
                      "mean": k["mean"], "stderr": k["stderr"], "p999": k["p999"], "same_top": report["same_top"],
                      "seconds": round(seconds, 1), "s_per_billion": round(seconds / params * 1e9, 1),
                      **({"rounding_reused": True} if reused else {})}
        cache.write_text(json.dumps(rows[name]))
        print(f"{name:<36} {report['bpw']:6.3f} bpw  KLD {k['mean']:.5f} ± {k['stderr']:.5f}  p99.9 {k['p999']:.4f}"
              f"  ({seconds:.0f} s)", flush=True)
        return rows[name]

    def peer_bytes(name: str) -> int:
        if name not in rows:
            raise SystemExit(f"--rows: this row is sized to the row {name!r}; measure that one too")
        return rows[name]["bytes"]

    def ours(recipe, rounding="nearest", distill=0, target=None, norms=False, floats=False):
        """A conversion of ours; it returns True where it reused a rounding an earlier row left in the
        work folder (GPTQ is then not in its seconds)."""
        cache = work / "rounding" if rounding != "nearest" else None

        def make(dest):
            known = set(cache.glob("*.npz")) if cache is not None and cache.exists() else set()
            convert(src, dest, ConvertOptions(recipe=recipe, keep_vision=False, keep_mtp=False, progress=False,
                                              rounding=rounding, distill_steps=distill, distill_norms=norms,
                                              distill_floats=floats,
                                              distill_anneal=args.distill_anneal and distill > 0,
                                              distill_lr=args.distill_lr if distill > 0 else None,
                                              learn_steps=args.learn_steps or 0,
                                              calib=calib_path,
                                              calib_tokens=args.calib_tokens, target=target,
                                              sensitivity=sens["nearest" if rounding == "nearest" else "gptq"] if target
                                              else None, rounding_cache=cache))
            return bool(known) and set(cache.glob("*.npz")) == known
        return make

    folder = hf_folder(src, work)
    auto = auto_base()

    def write_report() -> None:
        order = [name for name, _, _ in plan]
        result = {**settings, "commands": commands, "notes": notes, "params": params,
                  "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
                  "rows": sorted(rows.values(), key=lambda r: order.index(r["name"])), "checks": checks(rows)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(result, indent=2) + "\n")
        write_doc(result)

    # the rows each acceptance check needs first, then what each step bought on the way to the auto rows;
    # the report is rewritten after every row, so a run cut short still says what it measured
    plan = [("mlx-lm 4-bit", lambda d: mlx_convert(str(folder), mlx_path=str(d), quantize=True, q_bits=4,
                                                   q_group_size=64), "baseline")]
    for bits in (3, 4):
        plan += [(f"uniform-{bits} nearest", ours(uniform(bits, 64)), f"uniform-{bits}"),
                 (f"uniform-{bits} gptq", ours(uniform(bits, 64), "gptq"), f"uniform-{bits}")]
    if args.model == "smollm2":
        plan.append(("mlx-lm gptq 4-bit", lambda d: mlx_lm_gptq(folder, d, calib_path, args.calib_tokens),
                     "mlx-lm gptq"))
        plan.append(("auto @ mlx-lm gptq size, gptq",
                     lambda d: ours(auto, "gptq", target=Target(bytes=peer_bytes("mlx-lm gptq 4-bit")))(d),
                     "mlx-lm gptq"))
    plan.append(("uniform-3 gptq + distill", ours(uniform(3, 64), "gptq", args.distill_steps), "uniform-3"))
    for bpw in (3.6, 4.5):
        plan.append((f"auto {bpw} gptq + distill", ours(auto, "gptq", args.distill_steps, Target(bpw=bpw)),
                     f"auto-{bpw}"))
    for bpw in (3.6, 4.5):
        plan += [(f"auto {bpw} nearest", ours(auto, target=Target(bpw=bpw)), f"auto-{bpw}"),
                 (f"auto {bpw} gptq", ours(auto, "gptq", target=Target(bpw=bpw)), f"auto-{bpw}")]
    plan.append(("uniform-3 gptq + distill + norms", ours(uniform(3, 64), "gptq", args.distill_steps, norms=True),
                 "uniform-3"))
    for bpw in (3.6, 4.5):
        plan.append((f"auto {bpw} gptq + distill + norms",
                     ours(auto, "gptq", args.distill_steps, Target(bpw=bpw), norms=True), f"auto-{bpw}"))
    plan.append(("uniform-3 gptq + distill + floats",
                 ours(uniform(3, 64), "gptq", args.distill_steps, floats=True), "uniform-3"))
    for bpw in (3.6, 4.5):
        plan.append((f"auto {bpw} gptq + distill + floats",
                     ours(auto, "gptq", args.distill_steps, Target(bpw=bpw), floats=True), f"auto-{bpw}"))
    plan.append(("uniform-3 learned", ours(uniform(3, 64), "learned"), "uniform-3"))
    plan.append(("uniform-3 learned + distill", ours(uniform(3, 64), "learned", args.distill_steps), "uniform-3"))
    plan.append(("auto 3.6 learned + distill", ours(auto, "learned", args.distill_steps, Target(bpw=3.6)), "auto-3.6"))
    plan.append(("uniform-3 learned + distill + norms", ours(uniform(3, 64), "learned", args.distill_steps, norms=True),
                 "uniform-3"))
    for bpw in (3.6, 4.5):
        plan.append((f"auto {bpw} learned + distill + norms",
                     ours(auto, "learned", args.distill_steps, Target(bpw=bpw), norms=True), f"auto-{bpw}"))
    unknown = set(args.rows or ()) - {name for name, _, _ in plan}
    if unknown:
        raise SystemExit(f"--rows: no such row: {', '.join(sorted(unknown))}")
    for name, make, group in plan:
        if args.rows is None or name in args.rows:
            row(name, make, group)
        write_report()
    for k, v in checks(rows).items():
        print(f"{k:<40} {v:.3f}")


def earlier_run(path: Path | None, settings: dict) -> dict:
    """The results file a --rows run adds to (`path`; None for a run of every row): its commands,
    notes and rows, if it was measured with the same settings (else the run stops: its rows would
    not compare). Learned rounding's steps count only where a row was learned."""
    if path is None or not path.exists():
        return {"commands": [], "notes": [], "rows": []}
    earlier = json.loads(path.read_text())
    compared = [k for k in settings if k != "learn_steps" or has_learned(earlier["rows"])]
    differ = [k for k in compared if earlier.get(k, LATER_SETTINGS.get(k)) != settings[k]]
    if differ:
        raise SystemExit(f"{path}: measured with other {', '.join(differ)}; run every row, or use another --tag")
    return earlier


def has_learned(rows: list[dict]) -> bool:
    return any("learned" in r["name"] for r in rows)


def checks(rows: dict) -> dict:
    """The acceptance ratios whose rows have been measured."""
    wanted = {
        "gptq/nearest uniform-3": ("uniform-3 gptq", "uniform-3 nearest", "mean"),
        "gptq/nearest uniform-4": ("uniform-4 gptq", "uniform-4 nearest", "mean"),
        "distill/gptq uniform-3": ("uniform-3 gptq + distill", "uniform-3 gptq", "mean"),
        "auto 3.6 full / mlx-lm 4-bit (mean)": ("auto 3.6 gptq + distill", "mlx-lm 4-bit", "mean"),
        "auto 3.6 full / mlx-lm 4-bit (p99.9)": ("auto 3.6 gptq + distill", "mlx-lm 4-bit", "p999"),
        "auto 4.5 full / mlx-lm 4-bit (mean)": ("auto 4.5 gptq + distill", "mlx-lm 4-bit", "mean"),
        "distill + norms/gptq uniform-3": ("uniform-3 gptq + distill + norms", "uniform-3 gptq", "mean"),
        "auto 3.6 full + norms / mlx-lm 4-bit (mean)": ("auto 3.6 gptq + distill + norms", "mlx-lm 4-bit", "mean"),
        "auto 3.6 full + norms / mlx-lm 4-bit (p99.9)": ("auto 3.6 gptq + distill + norms", "mlx-lm 4-bit", "p999"),
        "auto 4.5 full + norms / mlx-lm 4-bit (mean)": ("auto 4.5 gptq + distill + norms", "mlx-lm 4-bit", "mean"),
        "distill + floats/gptq uniform-3": ("uniform-3 gptq + distill + floats", "uniform-3 gptq", "mean"),
        "auto 3.6 full + floats / mlx-lm 4-bit (mean)": ("auto 3.6 gptq + distill + floats", "mlx-lm 4-bit", "mean"),
        "auto 3.6 full + floats / mlx-lm 4-bit (p99.9)": ("auto 3.6 gptq + distill + floats", "mlx-lm 4-bit",
                                                          "p999"),
        "auto 4.5 full + floats / mlx-lm 4-bit (mean)": ("auto 4.5 gptq + distill + floats", "mlx-lm 4-bit", "mean"),
        "learned/gptq uniform-3": ("uniform-3 learned", "uniform-3 gptq", "mean"),
        "learned + distill/gptq uniform-3": ("uniform-3 learned + distill", "uniform-3 gptq", "mean"),
        "auto 3.6 learned full / mlx-lm 4-bit (mean)": ("auto 3.6 learned + distill", "mlx-lm 4-bit", "mean"),
        "auto 3.6 learned full / mlx-lm 4-bit (p99.9)": ("auto 3.6 learned + distill", "mlx-lm 4-bit", "p999"),
        "learned + distill + norms/gptq uniform-3": ("uniform-3 learned + distill + norms", "uniform-3 gptq", "mean"),
        "auto 3.6 learned full + norms / mlx-lm 4-bit (mean)": ("auto 3.6 learned + distill + norms", "mlx-lm 4-bit",
                                                                "mean"),
        "auto 3.6 learned full + norms / mlx-lm 4-bit (p99.9)": ("auto 3.6 learned + distill + norms", "mlx-lm 4-bit",
                                                                 "p999"),
        "auto 4.5 learned full + norms / mlx-lm 4-bit (mean)": ("auto 4.5 learned + distill + norms", "mlx-lm 4-bit",
                                                                "mean"),
        "ours / mlx-lm gptq at its size": ("auto @ mlx-lm gptq size, gptq", "mlx-lm gptq 4-bit", "mean"),
    }
    return {k: rows[a][key] / rows[b][key] for k, (a, b, key) in wanted.items() if a in rows and b in rows}


def mlx_lm_gptq(folder: Path, dest: Path, calib: str, tokens: int) -> None:
    """mlx-lm's own GPTQ (4-bit, its fallback for the rest) on the same calibration tokens."""
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load, save

    from mixquant.calib.data import calibration_set
    from mixquant.vocab import embedding_rows

    model, tokenizer, config = load(str(folder), return_config=True)
    windows = calibration_set(calib, model, tokenizer, tokens, 512, embedding_rows(config, folder))
    model, config["quantization"] = gptq_quantize(model, mx.array(windows), 4, 64, 6, 64)
    save(str(dest), str(folder), model, tokenizer, config)


IN_DOMAIN = {c: " (in-domain text: the evaluation file's own tail, the lab path that flatters the error-compensating "
                "steps; the default path is in the section \"Default calibration off the lab path\")"
             for c in ("heldout-tail", "fixture-heldout-tail")}


def with_calib(command: str, calib: str) -> str:
    """A recorded command as it reproduces its figures now that the default calibration is `auto`."""
    return command if "--calib " in command or calib == "auto" else f"{command} --calib {calib}"


def write_doc(result: dict) -> None:
    key = f"rounding-{result['model']}{result['tag']}"
    learned = has_learned(result["rows"])
    lines = [f"<!-- {key}:begin -->", f"## Rounding and allocation on {result['model']}, {result['calib_tokens']} "
             "calibration tokens" + (f", learned rounding {result['learn_steps']} steps per layer" if learned else "")
             + ": what each step buys", "",
             (" then ".join(f"`{with_calib(c, result['calib'])}`" for c in result["commands"]) + f" ({result['machine']}). Calibration: "
              f"{result['calib_tokens']} tokens of {result['calib']}{IN_DOMAIN.get(result['calib'], '')}; "
              f"distillation {result['distill_steps']} steps"
              + (f", learning rate {result['distill_lr']:g}" if "distill_lr" in result else "")
              + (", the learning rate annealed over the second half" if result.get("distill_anneal") else "")
              + (f", held out: {result['distill_held_out']}" if "distill_held_out" in result else "") + "; "
              f"evaluation: {result['chunks']} windows of 512 tokens of the bundled held-out text. "
              + " ".join(result["notes"])).rstrip(), "",
             "| quant | bpw | mean KLD ± se | p99.9 | same top | convert s | s per 1B params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        reuse = " (rounding reused)" if r.get("rounding_reused") else ""
        lines.append(f"| {r['name']} | {r['bpw']:.3f} | {r['mean']:.5f} ± {r['stderr']:.5f} | {r['p999']:.4f} | "
                     f"{100 * r['same_top']:.2f}% | {r['seconds']}{reuse} | {r['s_per_billion']}{reuse} |")
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result["checks"].items()]
    lines.append(f"<!-- {key}:end -->")
    replace_section(DOC, key, "\n".join(lines))


if __name__ == "__main__":
    main()
