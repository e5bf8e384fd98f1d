"""The `mixquant` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from mixquant.calib.data import BUILTIN_CALIB, DEFAULT_CALIB
from mixquant.calib.sensitivity import DEFAULT_WINDOWS
from mixquant.distributed import is_main, launched, shard_for, stop_on_terminate, world
from mixquant.errors import MixquantError
from mixquant.io.output import check_file_output, check_not_inputs
from mixquant.quant.presets import DEFAULT_PRESET, PRESETS, preset

CALIB_HELP = ("auto (default: the bundled mix and the model's own continuations of it), mix (bundled), "
              "self (sampled from the model) or FILE.jsonl / FILE.txt")


def _paths(*given) -> list[Path]:
    """The paths among `given` (None: an option not given)."""
    return [Path(p) for p in given if p is not None]


def _calib_file(spec: str | None) -> str | None:
    """The file a --calib names (None for the built-in specs: auto, mix, self)."""
    return None if spec is None or spec in BUILTIN_CALIB else spec


def write_json(path: Path, data) -> None:
    from mixquant.io.atomic import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def positive(value: int | None, flag: str, minimum: int = 1) -> int | None:
    """`value` unless it is below `minimum` (None passes: the option was not given)."""
    if value is not None and value < minimum:
        raise MixquantError(f"{flag}: must be at least {minimum}, got {value}")
    return value


def _add_recipe_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (default recipe: unsloth)")
    p.add_argument("--q-bits", type=int, default=None,
                   help="bits: uniform width, or the unsloth base B in 2..8 (default: 4 uniform, 3 unsloth)")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128), help="group size (default 64)")
    p.add_argument("--q-recipe", default=None,
                   help="uniform | unsloth | auto | RULES.toml (implies -q); auto needs --target-bpw or --target-size")
    p.add_argument("--target-bpw", type=float, default=None, metavar="X",
                   help="auto: bits per weight of the text model, scales and biases included (as plan counts)")
    p.add_argument("--target-size", default=None, metavar="SIZE",
                   help="auto: bytes of the text model's tensors, e.g. 6.4GB")
    p.add_argument("--sensitivity", default=None, metavar="FILE",
                   help="auto: a `mixquant sensitivity` file (default: a proxy estimated on --calib)")
    p.add_argument("--q-out-proj-8bit", action="store_true",
                   help="unsloth: the attention and Gated DeltaNet output projections at 8 bits instead of unquantized")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of unquantized tensors, scales and biases (default bfloat16)")
    p.add_argument("--drop-vision", action="store_true", help="leave the vision tower out")
    p.add_argument("--drop-mtp", action="store_true",
                   help="leave the MTP head out (default: kept, in a sidecar file mlx-lm does not read)")
    p.add_argument("--mtp-bf16", action="store_true",
                   help="keep the MTP head's projections unquantized (default: the recipe's attention bits; auto: 8)")
    p.add_argument("--max-shard-size", default="5GB", help="largest model shard (default 5GB)")
    p.add_argument("--calib", default=None,
                   help="calibration text of the steps that need one (auto's proxy, GPTQ, learned rounding, "
                        "distillation, AWQ): " + CALIB_HELP)
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens to use (default: 16384 for auto, all of a file or the mix, 4096 for self)")
    p.add_argument("--kv-bits", choices=("auto",), default=None,
                   help="auto: measure which width each attention layer's K and V cache needs, at the bytes of "
                        "a uniform 4-bit cache, and store it for chat/serve/generate/bench --kv-bits auto "
                        "(on --calib if a file, else the bundled mix)")
    p.add_argument("--quality", default=None, choices=tuple(PRESETS),
                   help="with --target-bpw / --target-size: the steps to take, as docs/RESULTS.md measures them "
                        "(fast: rounding to nearest; balanced: GPTQ, the default; best: GPTQ and distillation)")
    p.add_argument("--q-rounding", default=None, choices=("nearest", "gptq", "learned"),
                   help="nearest (default); gptq: each column's rounding error compensated on the rest, "
                        "layer by layer on calibration text; learned: each decoder layer's rounding trained on its "
                        "output (AutoRound-style), the head by GPTQ")
    p.add_argument("--q-learn-steps", type=int, default=None, metavar="N",
                   help="with --q-rounding learned: training steps per decoder layer (default 200)")
    p.add_argument("--q-rounding-cache", default=None, metavar="DIR",
                   help="with --q-rounding gptq or learned: keep the rounding in DIR, and reuse it in a later "
                        "conversion with the same input, plan and calibration (to try --q-distill settings)")
    p.add_argument("--q-distill", type=int, default=0, metavar="STEPS",
                   help="tune scales and biases for STEPS steps on the KL divergence to the unquantized model "
                        "(DWQ; kept only if it lowers the held-out divergence)")
    p.add_argument("--q-distill-norms", action="store_true",
                   help="with --q-distill: tune the norm multipliers too")
    p.add_argument("--q-distill-floats", action="store_true",
                   help="with --q-distill: tune every unquantized float tensor of the text model too (norms, "
                        "short convolutions and per-head parameters at a tenth of the rate, biases)")
    p.add_argument("--q-distill-anneal", action="store_true",
                   help="with --q-distill: lower the learning rate linearly toward zero over the second half "
                        "of the steps")
    p.add_argument("--q-distill-lr", type=float, default=None, metavar="LR",
                   help="with --q-distill: Adam's learning rate (default 3e-4; scales move as exp(a), biases in "
                        "units of the group's scale)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="keep tensors that hold inf or NaN unquantized, as they are (default: refuse them)")
    p.add_argument("--awq", action="store_true", help="AWQ channel scales (alpha searched unless --awq-alpha)")
    p.add_argument("--imatrix-path", default=None, help="AWQ with importances from this imatrix (GGUF or .dat)")
    p.add_argument("--awq-alpha", type=float, default=None, help="fixed AWQ exponent (default: searched per group)")
    p.add_argument("--imatrix-strict", action="store_true", help="a group the imatrix lacks is an error")
    p.add_argument("--awq-judge-windows", type=int, default=4, metavar="N",
                   help="searched alpha: keep a group's scales/clipping only if they lower the KL divergence "
                        "on N calibration windows (default 4; 0: per-group error alone)")


def _target(args):
    from mixquant.convert import parse_size
    from mixquant.quant.auto import Target, check_bpw

    if args.target_bpw is not None and args.target_size is not None:
        raise MixquantError("--target-bpw and --target-size: give one")
    if args.target_bpw is not None:
        return Target(bpw=check_bpw(args.target_bpw, "--target-bpw"))
    if args.target_size is not None:
        return Target(bytes=parse_size(args.target_size, "--target-size"))
    return None


def _options(args):
    from mixquant.convert import ConvertOptions, parse_size
    from mixquant.quant.recipe import recipe_from_options

    target = _target(args)
    wants_q = args.quantize or args.q_recipe is not None or args.q_bits is not None or args.q_out_proj_8bit
    recipe = None
    if wants_q or target is not None:
        default = "auto" if target is not None and not args.quantize and args.q_bits is None else "unsloth"
        recipe = recipe_from_options(args.q_recipe or default, args.q_bits, args.q_group_size, args.q_out_proj_8bit,
                                     args.mtp_bf16)
    chosen = _preset(args, target)
    rounding = chosen.rounding if chosen else args.q_rounding or "nearest"
    distill = chosen.distill_steps if chosen else args.q_distill
    if target is not None and (recipe is None or not recipe.auto):
        raise MixquantError("--target-bpw / --target-size: only with --q-recipe auto (or a rules file with "
                            "recipe = \"auto\")")
    if args.sensitivity is not None and (recipe is None or not recipe.auto):
        raise MixquantError("--sensitivity: only with --q-recipe auto")
    awq = _awq_options(args)
    positive(args.calib_tokens, "--calib-tokens", 16)
    positive(args.q_distill, "--q-distill", 0)
    positive(args.q_learn_steps, "--q-learn-steps", 1)
    if args.q_learn_steps is not None and rounding != "learned":
        raise MixquantError("--q-learn-steps: only with --q-rounding learned")
    uses_calib = awq is not None or rounding != "nearest" or distill > 0 or args.kv_bits is not None or (
        recipe is not None and recipe.auto and not args.sensitivity)
    if args.calib is not None and not uses_calib:
        raise MixquantError("--calib: no step of this conversion uses calibration text (add --awq or "
                            "--q-rounding gptq, or use it with --q-recipe auto or --kv-bits auto)")
    if (rounding != "nearest" or distill) and recipe is None:
        raise MixquantError("--q-rounding / --q-distill: only when quantizing (-q or --q-recipe)")
    if args.q_rounding_cache is not None:
        if rounding == "nearest":
            raise MixquantError("--q-rounding-cache: only with --q-rounding gptq or learned")
        if Path(args.q_rounding_cache).exists() and not Path(args.q_rounding_cache).is_dir():
            raise MixquantError(f"{args.q_rounding_cache}: --q-rounding-cache needs a folder, this is a file")
    for flag, given in (("--q-distill-norms", args.q_distill_norms), ("--q-distill-floats", args.q_distill_floats),
                        ("--q-distill-anneal", args.q_distill_anneal),
                        ("--q-distill-lr", args.q_distill_lr is not None)):
        if given and not distill:
            raise MixquantError(f"{flag}: only with --q-distill STEPS")
    if args.q_distill_lr is not None and not 0 < args.q_distill_lr < 1:
        raise MixquantError(f"--q-distill-lr: must be above 0 and below 1 (got {args.q_distill_lr})")
    return ConvertOptions(
        recipe=recipe,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size, "--max-shard-size"),
        keep_vision=not args.drop_vision,
        keep_mtp=not args.drop_mtp,
        force=getattr(args, "force", False) or getattr(args, "force_delete_any", False),
        replace_any=getattr(args, "force_delete_any", False), resume=getattr(args, "resume", False),
        config_dir=Path(args.config_dir) if getattr(args, "config_dir", None) else None,
        awq=awq,
        target=target,
        sensitivity=Path(args.sensitivity) if args.sensitivity else None,
        calib=args.calib or DEFAULT_CALIB,
        calib_tokens=args.calib_tokens,
        rounding=rounding,
        learn_steps=args.q_learn_steps or 0,
        distill_steps=distill,
        preset=chosen.name if chosen else None,
        distill_norms=args.q_distill_norms,
        distill_floats=args.q_distill_floats,
        distill_anneal=args.q_distill_anneal,
        distill_lr=args.q_distill_lr,
        rounding_cache=Path(args.q_rounding_cache) if args.q_rounding_cache else None,
        allow_nonfinite=args.allow_nonfinite,
        kv_auto=args.kv_bits is not None,
    )


def _preset(args, target):
    """The --quality preset of this conversion: the one given, or the default where a size is given
    and no rounding or distillation flag is (None: the flags decide)."""
    explicit = [f for f, given in (("--q-rounding", args.q_rounding is not None), ("--q-distill", args.q_distill > 0))
                if given]
    if args.quality is not None:
        if target is None:
            raise MixquantError("--quality: give the size to reach with --target-bpw or --target-size")
        if explicit:
            raise MixquantError(f"--quality and {explicit[0]}: the preset sets the rounding and distillation; give one")
        return preset(args.quality)
    return preset(DEFAULT_PRESET) if target is not None and not explicit else None


def _awq_options(args):
    from mixquant.convert import AwqOptions

    if args.awq_judge_windows < 0:
        raise MixquantError(f"--awq-judge-windows: must be 0 or more, got {args.awq_judge_windows}")
    if not (args.awq or args.imatrix_path or args.awq_alpha is not None):
        return None
    if args.awq_alpha is not None and not 0 <= args.awq_alpha <= 1:
        raise MixquantError(f"--awq-alpha: must be within 0..1, got {args.awq_alpha}")
    return AwqOptions(imatrix_path=Path(args.imatrix_path) if args.imatrix_path else None,
                      calib=args.calib or DEFAULT_CALIB, alpha=args.awq_alpha, strict=args.imatrix_strict,
                      tokens=args.calib_tokens,
                      judge_windows=args.awq_judge_windows)


def cmd_plan(args) -> int:
    from mixquant.convert import build_plan, preset_note

    options = _options(args)
    _, plan = build_plan(Path(args.input), options)
    note = preset_note(Path(args.input), options)
    if args.json:
        print(json.dumps({**plan.to_json(), "preset": options.preset, "preset_note": note}, indent=2))
    else:
        print(plan.format_table() + (f"\n{note}" if note else ""))
    return 0


def cmd_convert(args) -> int:
    from mixquant.convert import convert

    options = _options(args)
    group = world()  # under mlx.launch: GPTQ's and learned rounding's work is split, rank 0 writes
    plan = convert(Path(args.input), Path(args.output), options, group)
    if not is_main(group):
        return 0
    s = plan.summary()
    print(
        f"wrote {args.output}: {s['recipe']}, {s['bits_per_weight']:.3f} bits per weight, "
        f"{s['file_bytes'] / 1e9:.4f} GB in {len(s['files'])} file(s)"
    )
    return 0


def _progress(label: str):
    from mixquant.progress import callback

    return callback(label)


def load_reference(args):
    from mixquant.eval.kld import Reference, compute_reference

    ref = Path(args.reference)
    positive(args.chunks, "--chunks")
    positive(args.ctx, "--ctx", 4)
    if ref.is_file() and ref.suffix != ".gguf":
        given = [flag for flag, value in (("--text", args.text), ("--ctx", args.ctx), ("--chunks", args.chunks))
                 if value is not None]
        if given:
            raise MixquantError(f"{ref}: a saved reference fixes the text and its windows; {given[0]} cannot "
                                "change them (leave it out, or save a new reference)")
        return Reference.load(ref)
    return compute_reference(ref, args.text, args.ctx or DEFAULT_CTX, args.chunks, args.topk,
                             _progress("reference"), check_model=getattr(args, "model", None))


def cmd_eval(args) -> int:
    from mixquant.eval.kld import evaluate, format_report

    if args.model is None and args.save_reference is None:
        raise MixquantError("eval: give --model to evaluate, or --save-reference to only save the reference")
    inputs = _paths(args.reference, args.model, args.text)
    for flag in ("save_reference", "json"):
        if getattr(args, flag):
            check_file_output(Path(getattr(args, flag)), inputs, "--" + flag.replace("_", "-"))
    reference = load_reference(args)
    if args.save_reference:
        reference.save(Path(args.save_reference))
        print(f"saved reference: {args.save_reference} ({len(reference.windows)} windows, "
              f"{'full distributions' if reference.topk == 0 else f'top-{reference.topk}'})")
    if args.model is None:
        return 0
    report = evaluate(Path(args.model), reference, dequantize=False if args.native else None,
                      progress=_progress("evaluating"))
    print(format_report(report))
    if args.json:
        write_json(Path(args.json), report)
    return 0


def _compare_tasks(args, ref_path: Path):
    """compare --tasks: a function scoring a candidate folder against the reference (scored at the
    first call, once)."""
    if not args.tasks:
        if args.tasks_limit is not None:
            raise MixquantError("--tasks-limit: only with --tasks")
        return None
    suites = _suites(args.tasks, "--tasks")
    positive(args.tasks_limit, "--tasks-limit")
    if not (ref_path.is_dir() or ref_path.suffix == ".gguf"):
        raise MixquantError(f"{ref_path}: --tasks needs the reference model (a folder or GGUF), not a saved reference")
    from mixquant.tasks import run as tasks

    reference: list[dict] = []

    def score(path: Path) -> dict:
        if not reference:
            reference.append(tasks.score_model(tasks.LocalResponder(ref_path), suites, args.tasks_limit))
        return tasks.versus(tasks.score_model(tasks.LocalResponder(path), suites, args.tasks_limit), reference[0])

    return score


def cmd_compare(args) -> int:
    from mixquant.eval.compare import Candidate, FAMILY_GIVEN, mlx_lm_candidates, our_candidate, parse_recipes, run_compare
    from mixquant.loading import HF, source_kind

    ref_path = Path(args.reference)
    check_not_inputs([("--out folder", Path(args.out))],
                     _paths(args.reference, *args.candidates, args.sensitivity, args.text,
                            _calib_file(args.calib)))
    candidates = []
    for c in args.candidates:
        if not (Path(c) / "config.json").is_file():
            raise MixquantError(f"{c}: not a model folder (no config.json)")
        candidates.append(Candidate(Path(c).name, FAMILY_GIVEN, path=Path(c)))
    generated = parse_recipes(args.recipes) if args.recipes else []
    if generated or args.baselines:
        if not ref_path.is_dir() or source_kind(ref_path) != HF:
            raise MixquantError(f"{ref_path}: --recipes and --baselines need the unquantized Hugging Face folder")
    sensitivity = Path(args.sensitivity) if args.sensitivity else None
    if any(r == "auto" for r, _ in generated) and sensitivity is None:
        from mixquant.calib.sensitivity import compute_sensitivity

        sensitivity = Path(args.out) / "sensitivity.json"
        compute_sensitivity(ref_path, "proxy", args.calib or DEFAULT_CALIB, out=sensitivity)
    candidates += [our_candidate(ref_path, r, b, args.q_group_size, sensitivity) for r, b in generated]
    if args.baselines == "mlx-lm":
        candidates += mlx_lm_candidates(ref_path, args.q_group_size)
    if not candidates:
        raise MixquantError("compare: nothing to compare (give candidate folders, --recipes or --baselines)")
    if not Path(args.reference).is_file() and args.chunks is None:
        args.chunks = COMPARE_CHUNKS
    score_tasks = _compare_tasks(args, ref_path)
    reference = load_reference(args)
    result = run_compare(reference, ref_path, candidates, Path(args.out), keep_models=args.keep_models,
                         log=lambda line: print(line, flush=True), tasks=score_tasks)
    print(f"wrote {args.out}/report.json, report.md, pareto.png ({len(result['entries'])} models)")
    return 0


def cmd_bench(args) -> int:
    from mixquant.runtime.bench import BenchConfig, bench, bench_mtp, format_cache, format_mtp_table, format_table

    for flag in ("prompt_tokens", "turns", "turn_tokens", "repeats"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    cfg = BenchConfig(args.prompt_tokens, args.gen_tokens, args.turns, args.turn_tokens, args.repeats)
    if args.json:
        check_file_output(Path(args.json), _paths(args.model, args.compare), "--json")
    if args.sample and not args.mtp:
        raise MixquantError("--sample: only with --mtp")
    kv = kv_options(args)
    if args.mtp and kv:
        raise MixquantError("--kv-bits with --mtp: bench --mtp compares plain and MTP decoding on a float cache")
    if args.mtp:
        if args.shard:
            raise MixquantError("--mtp with --shard: the MTP head does not run sharded yet")
        if args.compare:
            raise MixquantError("--mtp and --compare: one at a time (--mtp compares plain and MTP decoding)")
        result = bench_mtp(Path(args.model), cfg, _depths(args.mtp_depths), sampled=args.sample,
                           native=args.native)
        print(format_mtp_table(result))
        if args.json:
            write_json(Path(args.json), {"config": vars(cfg), **result})
        return 0
    paths = [Path(args.model)] + ([Path(args.compare)] if args.compare else [])
    shard = _sharded(args, "bench")
    results = bench(paths, cfg, native=args.native, kv=kv, shard=shard)
    print(format_table(results, cfg))
    for r in results:
        for line in format_cache(r["cache"]):
            print(line)
    if args.json and (shard is None or is_main(shard.group)):
        out = {"config": vars(cfg), "results": results}
        if len(results) == 2:
            out["ratio"] = {k: results[1][k] / results[0][k] for k in results[0] if k.endswith("tok_s")}
        write_json(Path(args.json), out)
    return 0


def _depths(text: str) -> list[int]:
    try:
        depths = [int(d) for d in text.split(",")]
    except ValueError:
        raise MixquantError(f"--mtp-depths: a comma-separated list of depths, got {text!r}") from None
    return depths


def cmd_imatrix(args) -> int:
    from mixquant.calib.imatrix import compute_imatrix
    from mixquant.io.imatrix import write_imatrix_dat, write_imatrix_gguf

    positive(args.tokens, "--tokens")
    positive(args.ctx, "--ctx", 2)
    out = Path(args.output)
    check_file_output(out, _paths(args.model, _calib_file(args.calib)))
    group = world()  # under mlx.launch: the windows are split over the processes, rank 0 writes
    imatrix, _, _ = compute_imatrix(Path(args.model), args.calib, args.tokens, args.ctx,
                                    _progress("calibrating") if is_main(group) else None, group=group)
    if is_main(group):
        (write_imatrix_dat if out.suffix == ".dat" else write_imatrix_gguf)(out, imatrix)
        print(f"wrote {out}: {len(imatrix.entries)} tensors, {imatrix.chunk_count} chunks of {imatrix.chunk_size} "
              f"tokens{f' on {group.size()} processes' if group is not None else ''}")
    return 0


def cmd_sensitivity(args) -> int:
    from mixquant.calib.sensitivity import compute_sensitivity

    positive(args.windows, "--windows")
    positive(args.ctx, "--ctx", 4)
    check_file_output(Path(args.output), _paths(args.model, _calib_file(args.calib)))
    group = world()  # under mlx.launch: proxy windows or measured units split over the processes; rank 0 writes
    main = is_main(group)
    sens = compute_sensitivity(Path(args.model), args.mode, args.calib, args.windows, args.ctx, args.dtype,
                               Path(args.output) if main else None,
                               progress=_progress(f"{args.mode} sensitivity") if main else None,
                               rounding=args.rounding, group=group)
    if not main:
        return 0
    print(f"wrote {args.output}: {args.mode} sensitivity of {len(sens.units)} units on {sens.calib['windows']} "
          f"windows of {sens.calib['ctx']} tokens ({sens.calib['spec']})")
    return 0


def kv_options(args):
    """--kv-bits, --kv-group-size, --kv-start as a mixquant.runtime.kv.KVQuant (or None), checked
    before loading."""
    from mixquant.runtime.kv import kv_settings

    return kv_settings(args.kv_bits, args.kv_group_size, args.kv_start, args.model)


def cmd_chat(args) -> int:
    from mixquant.runtime.repl import run

    from mixquant.runtime.mtp import DEFAULT_DEPTH, check_depth

    from mixquant.runtime.sampling import check_sampling

    positive(args.max_tokens, "--max-tokens")
    check_sampling("--temperature", temperature=args.temperature)
    if args.mtp_depth is not None and not args.mtp:
        raise MixquantError("--mtp-depth: only with --mtp")
    mtp = (DEFAULT_DEPTH if args.mtp_depth is None else check_depth(args.mtp_depth)) if args.mtp else 0
    kv = kv_options(args)
    shard = _sharded(args, "chat")
    return run(Path(args.model), args.max_tokens, args.temperature, mtp=mtp, native=args.native, kv=kv, shard=shard)


def cmd_serve(args) -> int:
    from mixquant.runtime.mtp import DEFAULT_DEPTH, check_depth

    for flag in ("max_concurrency", "max_prompt_tokens", "max_tokens", "max_connections"):
        positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if not 0 <= args.port <= 65535:
        raise MixquantError(f"--port: must be within 0..65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("MIXQUANT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise MixquantError("--api-key: empty (an empty key would turn authentication off; leave it out for none)"
                            if args.api_key is not None else "MIXQUANT_API_KEY: set but empty")
    if args.mtp_depth is not None and not args.mtp:
        raise MixquantError("--mtp-depth: only with --mtp")
    mtp = (DEFAULT_DEPTH if args.mtp_depth is None else check_depth(args.mtp_depth)) if args.mtp else 0
    kv = kv_options(args)
    try:
        from mixquant.server.app import serve
    except ImportError as e:
        raise MixquantError(f"serve needs the server extra ({e.name} is missing): pip install 'mixquant[serve]'") \
            from None
    return serve(Path(args.model), host=args.host, port=args.port,
                 api_key=api_key, max_concurrency=args.max_concurrency,
                 max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, mtp=mtp,
                 native=args.native, max_connections=args.max_connections, kv=kv, shard=_sharded(args, "serve"))


def cmd_generate(args) -> int:
    from mixquant.runtime.generate import generate_text

    positive(args.max_tokens, "--max-tokens")
    if not args.prompt:
        raise MixquantError("--prompt: empty (give the text to continue)")
    shard = _sharded(args, "generate")
    for piece in generate_text(Path(args.model), args.prompt, args.max_tokens, native=args.native,
                               kv=kv_options(args), shard=shard):
        print(piece, end="", flush=True)
    print()
    return 0


def _sharded(args, command: str):
    """--shard as a mixquant.distributed.Shard (or None); a rank other than 0 runs the same steps
    with its standard output discarded, and every rank samples from rank 0's seed."""
    from mixquant.distributed import same_random_state

    shard = shard_for(args.shard, command)
    if shard is not None:
        if not is_main(shard.group):
            sys.stdout = open(os.devnull, "w")
        same_random_state(shard.group)
    return shard


DEFAULT_CTX = 512
COMPARE_CHUNKS = 32
DEMO_MODEL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "qwen35-tiny"


def _suites(spec: str, flag: str) -> list[str]:
    from mixquant.tasks.run import SUITES

    suites = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [x for x in suites if x not in SUITES]
    if unknown or not suites:
        raise MixquantError(f"{flag}: unknown suite(s) {', '.join(unknown) or '(none)'} (known: {', '.join(SUITES)})")
    return suites


def cmd_tasks(args) -> int:
    from mixquant.tasks import run as tasks

    positive(args.limit, "--limit")
    positive(args.parallel, "--parallel")
    suites = _suites(args.suite, "--suite")
    if (args.model is None) == (args.server is None):
        raise MixquantError("tasks: give a MODEL folder or --server URL (one of them)")
    inputs = _paths(args.model, args.reference)
    for flag in ("json", "markdown", "plot"):
        if getattr(args, flag):
            check_file_output(Path(getattr(args, flag)), inputs, "--" + flag)

    def responder(spec):
        if spec is None:
            return None
        if spec.startswith(("http://", "https://")):
            return tasks.ServerResponder(spec, args.server_model, parallel=args.parallel)
        return tasks.LocalResponder(Path(spec))

    candidate = responder(args.server or args.model)
    reference = responder(args.reference)
    bar = {}

    def progress(suite, role, i, n):
        if (suite, role) not in bar:
            bar[(suite, role)] = _progress(f"{suite} ({role})")
        if bar[(suite, role)]:
            bar[(suite, role)](i, n)

    report = tasks.run(candidate, reference, suites, args.limit, progress)
    print(tasks.markdown(report))
    if args.json:
        write_json(Path(args.json), report)
    if args.markdown:
        from mixquant.io.atomic import atomic_write

        text = tasks.markdown(report) + "\n"
        atomic_write(Path(args.markdown), lambda tmp: tmp.write_text(text))
    if args.plot:
        from mixquant.io.atomic import atomic_write

        atomic_write(Path(args.plot), lambda tmp: tasks.plot(report, tmp))
    return 0


def cmd_demo(args) -> int:
    """The whole job on the bundled model: plan, convert with the Unsloth-Dynamic recipe, eval, generate, chat."""
    from mixquant.convert import ConvertOptions, build_plan, convert
    from mixquant.quant.recipe import unsloth
    from mixquant.runtime.generate import generate_text

    model = Path(args.model) if args.model else DEMO_MODEL
    if not model.is_dir():
        raise MixquantError(f"{model}: demo model not found (run from a source checkout or pass --model)")
    out = Path(args.out)
    options = ConvertOptions(recipe=unsloth(args.q_bits), force=True)
    _, plan = build_plan(model, options)
    print(f"== plan: {model} with {plan.recipe.name}\n")
    print(plan.format_table())
    convert(model, out, options)
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"\n== converted to {out}: {on_disk / 1e6:.2f} MB on disk\n")
    print("== eval against the unquantized model (KL divergence, 8 windows of 512 tokens)\n")
    from mixquant.eval.kld import compute_reference, evaluate, format_report

    reference = compute_reference(model, None, 512, 8, topk=0)
    print(format_report(evaluate(out, reference)))
    print(f"\n== generate: {args.prompt!r}\n")
    print(args.prompt, end="")
    for piece in generate_text(out, args.prompt, args.max_tokens):
        print(piece, end="", flush=True)
    print("\n\n== chat (the model's own chat template; thinking off)\n")
    import mixquant

    chat_model = mixquant.load(out)
    question = "import os"
    result = chat_model.chat([{"role": "user", "content": question}], max_new_tokens=32, temperature=0.0,
                             enable_thinking=False)
    print(f"user: {question}\nassistant: {result.text}\n[{result.num_tokens} tokens, "
          f"{result.timings['decode_tok_s']:.1f} tok/s decode]")
    return 0


SHARD_HELP = ("under mlx.launch: split the model over the processes by layers (pipeline) or within "
              "layers (tensor); rank 0 prints")


def add_shard_arg(p) -> None:
    p.add_argument("--shard", choices=("pipeline", "tensor"), default=None, help=SHARD_HELP)


def add_kv_args(p) -> None:
    p.add_argument("--kv-bits", default=None, help="keep the attention layers' KV cache at 4 or 8 bits "
                   "(mlx-lm's quantized cache), or 'auto': the widths per layer measured by convert --kv-bits auto "
                   "(Gated DeltaNet state stays float)")
    p.add_argument("--kv-group-size", type=int, default=None, help="with --kv-bits: values per scale (default 64)")
    p.add_argument("--kv-start", type=int, default=None,
                   help="with --kv-bits: quantize once the cache holds this many tokens (default 0)")


NATIVE_HELP = ("use the quantized kernels even on MLX's CPU backend (default there: the weights dequantized to "
               "float32 when they fit in half the memory, which decodes, batches and verifies drafts faster)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage mistakes reported as one line, like every other error."""

    def error(self, message):
        self.exit(2, f"mixquant: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mixquant", description="Mixed-precision MLX quants of Qwen3.5 models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="convert a checkpoint to an MLX model folder")
    p.add_argument("-i", "--input", required=True, help="Hugging Face model folder, or a GGUF file")
    p.add_argument("-o", "--output", required=True,
                   help="output folder (must not exist unless --force; missing parent folders are created)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder that mixquant wrote")
    p.add_argument("--resume", action="store_true",
                   help="stage in .OUTPUT.resume.partial, which a failure leaves behind, and continue an earlier "
                        "interrupted run of the same plan from its last complete shard")
    p.add_argument("--force-delete-any", action="store_true",
                   help="replace the output path whatever it holds: its contents are deleted")
    p.add_argument("--config-dir", default=None,
                   help="GGUF input: take config.json and tokenizer files from this HF folder instead")
    _add_recipe_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plan", help="print the per-tensor plan and sizes without converting")
    p.add_argument("-i", "--input", required=True, help="Hugging Face model folder, or a GGUF file")
    p.add_argument("--config-dir", default=None, help="GGUF input: config and tokenizer from this HF folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_recipe_flags(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="KL divergence and perplexity of a model against a reference")
    p.add_argument("--model", default=None, help="the model folder to measure")
    p.add_argument("--reference", required=True,
                   help="unquantized model folder (HF or MLX), or a file saved with --save-reference")
    p.add_argument("--text", default=None, help="UTF-8 text to evaluate on (default: the bundled held-out text)")
    p.add_argument("--ctx", type=int, default=None, help=f"window length in tokens (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, default=None, help="number of windows (default: all the text gives)")
    p.add_argument("--topk", default="auto",
                   help="reference log-probs kept: 0 = full, K = top-K + tail mass, auto = full up to 1 GiB")
    p.add_argument("--save-reference", default=None, help="save the reference's log-probs here (.npz)")
    p.add_argument("--native", action="store_true",
                   help="use the quantized kernels even on CPU (default there: dequantize to float32)")
    p.add_argument("--json", default=None, help="write the report here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="evaluate many models against one reference; JSON, Markdown, Pareto plot")
    p.add_argument("reference", help="unquantized model folder, or a saved reference file")
    p.add_argument("candidates", nargs="*", help="model folders to evaluate")
    p.add_argument("--recipes", default=None,
                   help="our quants to make and evaluate, e.g. unsloth:2-6,uniform:4,auto:3.5,auto:4.5")
    p.add_argument("--sensitivity", default=None, help="auto recipes: a `mixquant sensitivity` file "
                                                        "(default: a proxy on --calib, saved in --out)")
    p.add_argument("--calib", default=None,
                   help="auto recipes without --sensitivity: auto (default), mix, self or FILE")
    p.add_argument("--baselines", choices=("mlx-lm",), default=None,
                   help="also make mlx_lm.convert's uniform 2/3/4/5/6/8-bit and mixed_* quants")
    p.add_argument("--q-group-size", type=int, default=64, choices=(32, 64, 128))
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--keep-models", action="store_true", help="keep the made models under OUT/models")
    p.add_argument("--text", default=None)
    p.add_argument("--ctx", type=int, default=None, help=f"window length (default {DEFAULT_CTX})")
    p.add_argument("--chunks", type=int, default=None, help="windows (default 32)")
    p.add_argument("--topk", default="auto")
    p.add_argument("--tasks", default=None, metavar="SUITES",
                   help="also score each model on these task suites against the reference (tools,bfcl,humaneval)")
    p.add_argument("--tasks-limit", type=int, default=None, help="--tasks: at most N items per suite")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="prefill/decode speed, multi-turn decode with cache reuse, peak memory")
    p.add_argument("model")
    p.add_argument("--compare", default=None, help="a second model, run alternately in the same process")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=64, help="new tokens per later turn (default 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding against plain decoding")
    p.add_argument("--mtp-depths", default="1,2,3", help="with --mtp: the draft depths to measure (default 1,2,3)")
    p.add_argument("--sample", action="store_true",
                   help="with --mtp: sample with the model's generation_config instead of decoding greedily")
    p.add_argument("--native", action="store_true", help=NATIVE_HELP)
    p.add_argument("--json", default=None)
    add_kv_args(p)
    add_shard_arg(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("imatrix", help="compute an importance matrix (llama.cpp's GGUF format) on calibration text")
    p.add_argument("-m", "--model", required=True, help="unquantized model: HF folder, GGUF file or MLX folder")
    p.add_argument("-o", "--output", required=True, help="imatrix.gguf (or .dat for the legacy format)")
    p.add_argument("--calib", default=DEFAULT_CALIB, help=CALIB_HELP)
    p.add_argument("--tokens", type=int, default=None, help="at most this many calibration tokens")
    p.add_argument("--ctx", type=int, default=512)
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("sensitivity", help="each tensor's cost in KL divergence per bits and group size (for auto)")
    p.add_argument("-m", "--model", required=True, help="unquantized model: HF folder or GGUF file")
    p.add_argument("-o", "--output", required=True, help="sensitivity file (.json); a measured run resumes it")
    p.add_argument("--mode", default="proxy", choices=("measured", "proxy"),
                   help="measured: one forward per tensor and option; proxy: a Fisher-weighted estimate from one "
                        "backward pass per window (default)")
    p.add_argument("--calib", default=DEFAULT_CALIB, help=CALIB_HELP)
    p.add_argument("--rounding", default="nearest", choices=("nearest", "gptq"),
                   help="proxy: the rounding the conversion will use; gptq prices each linear after GPTQ, from its "
                        "input Hessian (default nearest)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"calibration windows (default {DEFAULT_WINDOWS})")
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="the float dtype of the quant's scales and biases (default bfloat16)")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("chat", help="interactive chat (/reset, /system, /think on|off, /exit)")
    p.add_argument("model")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=None, help="default: the model's generation_config")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the model's MTP head")
    p.add_argument("--mtp-depth", type=int, default=None,
                   help="the most tokens drafted per step (default 2); fewer, or none, while that decodes faster")
    p.add_argument("--native", action="store_true", help=NATIVE_HELP)
    add_kv_args(p)
    add_shard_arg(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI- and Anthropic-compatible HTTP server with continuous batching")
    p.add_argument("model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None,
                   help="require this key on every endpoint but /health (default: $MIXQUANT_API_KEY, else none)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-prompt-tokens", type=int, default=32768)
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most (default: what the descriptor limit allows, less a reserve); "
                        "past it the longest-waiting connection without a request is closed")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most tokens a request may generate")
    p.add_argument("--mtp", action="store_true",
                   help="speculative decoding with the model's MTP head (requests then run one at a time)")
    p.add_argument("--mtp-depth", type=int, default=None)
    p.add_argument("--native", action="store_true", help=NATIVE_HELP)
    add_kv_args(p)
    add_shard_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="greedy-decode a continuation of a prompt")
    p.add_argument("model", help="converted model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--native", action="store_true", help=NATIVE_HELP)
    add_kv_args(p)
    add_shard_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tasks", help="task scores (tool calling, BFCL, HumanEval) of a model or server, "
                       "side by side with a reference, with intervals and paired differences")
    p.add_argument("model", nargs="?", default=None, help="the model folder (or GGUF file) to score")
    p.add_argument("--reference", default=None, help="a model folder or server URL scored on the same items")
    p.add_argument("--server", default=None, metavar="URL", help="score an OpenAI-compatible server instead of MODEL")
    p.add_argument("--server-model", default=None, help="the model name sent to --server (default: none, the server's own)")
    p.add_argument("--suite", default="tools,bfcl,humaneval", help="comma-separated: tools, bfcl, humaneval")
    p.add_argument("--limit", type=int, default=None, help="at most N items per suite (bfcl: N/4 per category)")
    p.add_argument("--parallel", type=int, default=1,
                   help="servers: items in flight at once (default 1; a batching server answers several together)")
    p.add_argument("--json", default=None, help="write the full report (every item) here")
    p.add_argument("--markdown", default=None, help="write the table here")
    p.add_argument("--plot", default=None, help="write a bar chart of the scores with their intervals here (.png)")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("demo", help="plan, convert, evaluate and chat with the bundled demo model")
    p.add_argument("--model", default=None, help="model folder (default: the bundled qwen35-tiny)")
    p.add_argument("--out", default="demo-out/qwen35-tiny-unsloth3", help="where the quant goes (replaced)")
    p.add_argument("--q-bits", type=int, default=3, help="unsloth base bits (default 3)")
    p.add_argument("--prompt", default="def fibonacci(n):\n")
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    return parser


class _WarningLine(logging.Handler):
    """mixquant's library warnings and notes, one line each on stderr."""

    def emit(self, record):
        if _rank():
            return  # under mlx.launch every rank would say the same: rank 0 says it
        kind = "warning" if record.levelno >= logging.WARNING else "note"
        print(f"mixquant: {kind}: {record.getMessage()}", file=sys.stderr)


def _group():
    """The mlx.launch group this process belongs to, or None (alone, MLX not loaded yet, or the
    group could not be formed)."""
    if "mlx.core" not in sys.modules:
        return None
    from mixquant.distributed import world

    try:
        return world()
    except RuntimeError:
        return None


def _rank() -> int:
    """This process's rank under mlx.launch (0 alone), as the launcher numbered it where the group
    could not be formed."""
    group = _group()
    return group.rank() if group is not None else int(os.environ.get("MLX_RANK", "0"))


def _error(text: str) -> None:
    r = _rank()
    print(f"mixquant: error: {f'rank {r}: ' if r else ''}{text}", file=sys.stderr)


NOTE_LEVEL = 25  # mixquant.loading.NOTE, without importing MLX before the BLAS is chosen


def _terminate(signum, frame):
    if launched():
        _stopped()
    raise SystemExit(128 + signum)  # unwinds like an interrupt: staging folders are removed


def _stopped() -> None:
    _error("stopped by SIGTERM (mlx.launch sends it once another process of the group has ended)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from mixquant import cpu_blas

    cpu_blas.enable()  # before anything imports MLX
    logger = logging.getLogger("mixquant")
    handler = _WarningLine(NOTE_LEVEL)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(NOTE_LEVEL)
    logger.propagate = False
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    if previous is not None and launched():
        stop_on_terminate(_stopped)
    try:
        return args.func(args)
    except MixquantError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        print("mixquant: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except RuntimeError as e:
        if _group() is None:
            raise
        _error(f"the process group failed ({e}); is every rank still running?")
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _error(f"{where}{e.strerror or e}")
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
