"""Convert a checkpoint to an MLX model folder: source -> plan -> transforms -> writer.

The source presents tensors under Hugging Face names; the family's table turns them into output
tensors with roles; the recipe decides each one's bits, and the plan fixes the files they go to.
Optional transforms (AWQ channel scales and clipping fits) are computed next, from calibration.
The writer then streams every tensor through the source's row blocks, the transforms and the
encoder into a staging folder beside the output that is renamed when complete, so memory stays
bounded and a failed run leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mixquant.arch import family_for_config
from mixquant.arch.tensors import SCOPE_MODEL
from mixquant.calib.data import BUILTIN_CALIB, DEFAULT_CALIB
from mixquant.errors import MixquantError
from mixquant.io.hf import check_tokenizer_files
from mixquant.io.output import check_not_inputs, check_output, file_stats, resumable, staged
from mixquant.loading import NOTE
from mixquant.modelcard import model_card
from mixquant.quant.auto import Target
from mixquant.quant.encode import encode, encode_floats, mx_dtype
from mixquant.quant.plan import DEFAULT_SHARD_BYTES, Plan, make_plan
from mixquant.quant.recipe import SCOPE_ANY, Recipe, Rule
from mixquant.sources import arch_plan_of
from mixquant.vocab import embedding_rows
from mixquant.writer import nonfinite_tensors, write_config, write_weights

log = logging.getLogger(__name__)

NEAREST, GPTQ, LEARNED = "nearest", "gptq", "learned"
ROUNDINGS = (NEAREST, GPTQ, LEARNED)
CALIB_CTX = 512


@dataclass
class AwqOptions:
    imatrix_path: Path | None = None  # importance from this file; else from calibration
    calib: str = DEFAULT_CALIB  # calibration text for the importance (without a file) and the alpha search
    alpha: float | None = None  # fixed exponent; None: searched per group
    strict: bool = False  # a group the imatrix does not cover is an error, not a warning
    tokens: int | None = None
    ctx: int = 512
    judge_windows: int = 4  # searched alpha: calibration windows for the end-to-end check; 0: none


@dataclass
class ConvertOptions:
    recipe: Recipe | None = None
    dtype: str = "bfloat16"
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    keep_vision: bool = True
    keep_mtp: bool = True
    force: bool = False  # replace an existing output folder that mixquant wrote
    replace_any: bool = False  # ... or any existing output (--force-delete-any)
    progress: bool | None = None  # None: only on a terminal
    config_dir: Path | None = None  # GGUF input: HF config/tokenizer files to use instead of synthesising
    awq: AwqOptions | None = None
    target: Target | None = None  # auto recipes: the size to reach
    sensitivity: Path | None = None  # auto recipes: a `mixquant sensitivity` file (else a proxy is estimated)
    calib: str = DEFAULT_CALIB  # calibration text of auto's proxy, GPTQ and distillation (AWQ has its own)
    calib_tokens: int | None = None  # how much (None: AUTO_TOKENS of auto, all of a file or the mix, 8 windows of self)
    rounding: str = "nearest"  # nearest | gptq | learned
    learn_steps: int = 0  # learned rounding: steps per decoder layer (0: mixquant.quant.learned.STEPS)
    distill_steps: int = 0  # > 0: tune scales and biases on the KL to the unquantized model (DWQ)
    distill_norms: bool = False  # ... and the norm multipliers with them
    distill_floats: bool = False  # ... and every unquantized float tensor of the text model (norms included)
    distill_anneal: bool = False  # ... with the learning rate falling toward zero over the second half of the steps
    distill_lr: float | None = None  # ... Adam's learning rate (None: mixquant.quant.distill.LEARNING_RATE)
    allow_nonfinite: bool = False  # tensors with inf/NaN kept unquantized, as they are (else an error)
    resume: bool = False  # stage in a folder a failure leaves behind; continue an earlier run of the same plan
    rounding_cache: Path | None = None  # a folder: GPTQ / learned rounding kept there and reused by a later run
    preset: str | None = None  # the --quality preset that chose rounding and distillation (for the model card)
    kv_auto: bool = False  # measure a per-layer KV cache allocation on the written model (--kv-bits auto)


def build_plan(src: Path, options: ConvertOptions, group=None):
    """(source, plan): every output tensor with its bits, bytes and file. Reads no weight, except
    that an auto recipe without a sensitivity file estimates one first (a calibration pass; under a
    group, every rank calls: its windows split over the ranks)."""
    source, arch_plan = arch_plan_of(src, options.config_dir, options.keep_vision, options.keep_mtp)
    recipe = options.recipe
    if recipe is not None and recipe.auto:
        recipe = _auto_recipe(src, arch_plan, options, group)
    plan = make_plan(arch_plan, recipe, options.dtype, options.max_shard_bytes)
    if options.allow_nonfinite and recipe is not None:
        bad = nonfinite_tensors(source, plan)
        if bad:
            recipe = replace(recipe, rules=[*recipe.rules, *(Rule(glob=n, scope=SCOPE_ANY, keep=True,
                                                                  note="holds inf or NaN") for n in bad)])
            plan = make_plan(arch_plan, recipe, options.dtype, options.max_shard_bytes)
            plan.warnings.append(f"{len(bad)} tensor(s) hold inf or NaN and stay unquantized: {', '.join(bad)}")
    plan.warnings[:0] = source.warnings if hasattr(source, "warnings") else []
    return source, plan


def _auto_recipe(src: Path, arch_plan, options: ConvertOptions, group=None):
    from mixquant.calib.sensitivity import compute_sensitivity
    from mixquant.quant.auto import auto_recipe
    from mixquant.quant.sensitivity import PROXY, Sensitivity

    if options.target is None:
        raise MixquantError("--q-recipe auto: give the size to reach with --target-bpw or --target-size")
    if options.sensitivity is not None:
        sens = Sensitivity.load(options.sensitivity)
        where = options.sensitivity
    else:
        sens = compute_sensitivity(Path(src), PROXY, options.calib, dtype=options.dtype,
                                   config_dir=options.config_dir, group=group)
        where = f"{src} (proxy sensitivity on {options.calib})"
    recipe, _ = auto_recipe(make_plan(arch_plan, None, options.dtype), sens, options.target, options.recipe.rules,
                            options.recipe.group_size, where)
    return recipe


def parse_size(text: str, flag: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    s = text.strip().upper()
    digits = s.rstrip("KMGTB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1
    if unit not in units or not 0 < value < float("inf"):
        raise MixquantError(f"{flag}: cannot read {text!r} (e.g. 5GB, 500MB)")
    if value * units[unit] > MAX_SIZE:
        raise MixquantError(f"{flag}: {text!r} is more than {MAX_SIZE // 10**15} PB")
    if value * units[unit] < 1:
        raise MixquantError(f"{flag}: {text!r} is less than one byte")
    return int(value * units[unit])


MAX_SIZE = 10**18


def input_paths(src: Path, options: ConvertOptions) -> list[Path]:
    """Every file or folder the conversion reads: none of them may be touched by the output."""
    from mixquant.io.gguf_source import split_parts

    src = Path(src)
    paths = split_parts(src) if src.is_file() else [src]
    if options.config_dir is not None:
        paths.append(Path(options.config_dir))
    if options.sensitivity is not None:
        paths.append(Path(options.sensitivity))
    if options.awq is not None and options.awq.imatrix_path is not None:
        paths.append(Path(options.awq.imatrix_path))
    for calib in {options.calib, options.awq.calib if options.awq else options.calib}:
        if calib not in BUILTIN_CALIB:
            paths.append(Path(calib))
    return paths


def convert(src: Path, out: Path, options: ConvertOptions, group=None) -> Plan:
    """Convert `src` into the folder `out`. group (mixquant.distributed; every rank calls with the
    same arguments): GPTQ's, learned rounding's and distillation's work is split over the ranks,
    rank 0 alone writes (the others return the plan once their part is done)."""
    from mixquant.distributed import barrier, is_main

    out = Path(out)
    if not Path(src).exists():
        raise MixquantError(f"{src}: no such file or folder")
    note = preset_note(src, options)
    if note and is_main(group):
        log.log(NOTE, note)
    # the cache folder is guarded like an input but is not one of input_paths: the keys hash those
    cache = [Path(options.rounding_cache)] if options.rounding_cache is not None else []
    check_not_inputs([("--q-rounding-cache folder", c) for c in cache], input_paths(src, options))
    check_output(out, input_paths(src, options) + cache, options.force, options.replace_any)
    if group is not None:
        barrier(group)  # every rank has checked the output before rank 0 starts to write it
        if options.rounding == NEAREST and options.distill_steps == 0 and not is_main(group):
            return build_plan(src, options, group)[1]
        options = replace(options, progress=options.progress if is_main(group) else False)
    source, plan = build_plan(src, options, group)
    if getattr(source, "root", None) is not None:
        check_tokenizer_files(source.root)
    for warning in plan.warnings:
        log.warning(warning)
    if options.distill_steps > 0 and not fits_in_memory(plan):
        raise MixquantError(distill_too_big(src, plan, options))
    awq_result = run_awq(Path(src), source, plan, options.awq) if options.awq else None
    rounded = cached_rounding(Path(src), plan, options, awq_result, group) if options.rounding != NEAREST else {}
    distilled = None
    if options.distill_steps > 0:
        distilled = run_distill(Path(src), source, plan, options, awq_result, rounded, group)
        rounded = distilled.encodings
    if not is_main(group):
        return plan
    encoder = _encoder(awq_result, rounded, distilled.floats if distilled else {})

    def write(tmp: Path, done=frozenset(), completed=None) -> None:
        write_weights(source, plan, tmp, encoder, options.progress, done, completed, options.allow_nonfinite)
        write_config(plan, tmp)
        source.write_side_files(tmp)
        kv = None
        if options.kv_auto:
            from mixquant import kvplan

            kv = kvplan.measure_folder(tmp, options.calib, plan.dtype, progress=None)
            kvplan.store(tmp, kv)
        (tmp / "README.md").write_text(model_card(plan, source.name, awq_summary(options.awq, awq_result),
                                                  methods_summary(options, distilled), kv))

    try:
        if options.resume:
            with resumable(out, fingerprint(src, plan, options), options.force, options.replace_any) as state:
                write(state.folder, state.done, state.complete)
        else:
            with staged(out, options.force, options.replace_any) as tmp:
                write(tmp)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise MixquantError(f"{out}: cannot write the output: {e.strerror or e}{where}") from None
    return plan


def preset_note(src: Path, options: ConvertOptions) -> str | None:
    """The --quality preset in one line, with its projected time on this model (None: no preset)."""
    from mixquant.calib.data import AUTO_TOKENS, needs_model
    from mixquant.quant.presets import PRESETS, expected_seconds

    if options.preset is None:
        return None
    p = PRESETS[options.preset]
    _, arch_plan = arch_plan_of(Path(src), options.config_dir, False, False)
    params = make_plan(arch_plan, None, options.dtype).summary()["model_params"]
    tokens = options.calib_tokens or AUTO_TOKENS
    minutes = expected_seconds(p, params, tokens, needs_model(options.calib)) / 60
    return (f"preset {p.name}: {p.summary}, on {tokens} calibration tokens ({options.calib}); about {minutes:.0f} "
            f"min on a 2-core x86_64 CPU (projected from measured rates; a GPU takes less)")


def fingerprint(src: Path, plan: Plan, options: ConvertOptions, steps: dict | None = None) -> str:
    """What a resumed conversion must share with the run it continues: the inputs as they are on disk
    (names, sizes, modification times), the plan's every tensor, and the steps that change weights
    (or only `steps`)."""
    import hashlib

    files = file_stats(input_paths(src, options))
    if steps is None:
        steps = {**rounding_steps(options), "distill_steps": options.distill_steps,
                 "distill_norms": options.distill_norms, "distill_floats": options.distill_floats,
                 "distill_anneal": options.distill_anneal,
                 "distill_lr": distill_lr(options)}
    text = json.dumps({"files": files, "plan": plan.rows(), "steps": steps}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def rounding_steps(options: ConvertOptions) -> dict:
    """The settings GPTQ's or learned rounding's result depends on, besides the inputs and the plan."""
    return {"awq": repr(options.awq), "rounding": options.rounding, "learn_steps": learn_steps(options),
            "calib": options.calib, "calib_tokens": options.calib_tokens}


def _encoder(awq_result, rounded: dict, floats: dict):
    """The block transform of this conversion: rows already rounded (GPTQ) as they were; otherwise
    AWQ's channel scales, then the (possibly clipping-fit) rounding to nearest. `floats` (tensor name
    -> float32 array) replaces an unquantized tensor's source values (distilled norm multipliers)."""
    from mixquant.quant import awq

    def encode_block(entry, part, r0, block):
        if entry.tensor.name in floats:
            block = floats[entry.tensor.name][r0 : r0 + len(block)]
        if entry.tensor.name in rounded:
            packed, scales, biases = rounded[entry.tensor.name][part][:3]
            rows = slice(r0, r0 + len(block))
            return [packed[rows], *encode_floats([scales[rows], biases[rows]], entry.dtype)]
        if awq_result is None:
            return encode(block, entry)
        ops = awq_result.for_part(entry.tensor.name, part)
        if ops:
            block = awq.apply(ops, block, r0)
        return encode(block, entry, awq_result.fit_for(entry.tensor.name, part))

    return encode_block


def run_rounding(src: Path, plan: Plan, options: ConvertOptions, awq_result, group=None) -> dict:
    """GPTQ (or with LEARNED, learned rounding of the decoder layers and GPTQ for the head) for every
    quantized linear and expert stack: tensor name -> per part (codes, scales, biases). The float
    model runs one decoder layer at a time (read from the source as its turn comes), except MLX
    folders, which mlx-lm loads whole; calibration text the model samples is sampled before (under
    a group: by rank 0, whose windows every rank then shares)."""
    from mixquant.calib.data import calibration_set
    from mixquant.calib.rounding import run_gptq
    from mixquant.calib.streamed import float_model
    from mixquant.distributed import is_main, rank0_windows
    from mixquant.progress import callback

    model, tokenizer, config, streamed = float_model(src, options.config_dir)
    windows = None
    if is_main(group):
        windows = calibration_set(options.calib, None if streamed else model, tokenizer, options.calib_tokens,
                                  CALIB_CTX, embedding_rows(config, src), source=src, config_dir=options.config_dir)
    windows = rank0_windows(windows, group, str(src), "--calib-tokens")
    steps = learn_steps(options)
    label = "learned rounding" if steps else "GPTQ"
    return run_gptq(model, windows, plan, mx_dtype(plan.entries[0].dtype), awq_result,
                    progress=callback(label) if options.progress is not False else None, streamed=streamed,
                    learn_steps=steps, group=group)


def cached_rounding(src: Path, plan: Plan, options: ConvertOptions, awq_result, group=None) -> dict:
    """run_rounding's result, read from options.rounding_cache where an earlier run with the same
    inputs, plan and rounding settings left it (and left there for the next, by rank 0)."""
    from mixquant.distributed import all_sum, is_main
    from mixquant.io.rounding_cache import cache_file, load_rounded, save_rounded

    if options.rounding_cache is None:
        return run_rounding(src, plan, options, awq_result, group)
    path = cache_file(options.rounding_cache, fingerprint(src, plan, options, rounding_steps(options)))
    rounded = load_rounded(path)
    hits = int(all_sum(np.array([rounded is not None], np.int64), group)[0])
    if 0 < hits < (1 if group is None else group.size()):
        raise MixquantError(f"{path}: --q-rounding-cache holds this rounding for {hits} of the {group.size()} "
                            f"processes only; give every process the same cache folder")
    if rounded is not None:
        log.info("rounding: reusing %s", path)
        return rounded
    rounded = run_rounding(src, plan, options, awq_result, group)
    if is_main(group):
        save_rounded(path, rounded)
    return rounded


def learn_steps(options: ConvertOptions) -> int:
    """Learned rounding's steps per decoder layer in this conversion (0: it rounds otherwise)."""
    from mixquant.quant.learned import STEPS

    return (options.learn_steps or STEPS) if options.rounding == LEARNED else 0


def nearest_encodings(source, plan: Plan, awq_result, skip: dict) -> dict:
    """(codes, scales, biases) per part of every quantized text-model tensor not in `skip`, rounded
    to nearest as the writer would (AWQ's scales and clipping fits included)."""
    from mixquant.blocks import read_part
    from mixquant.quant import awq

    out = {}
    for e in plan.entries:
        t = e.tensor
        if not e.quantized or t.scope != SCOPE_MODEL or t.name in skip:
            continue
        parts = []
        for p in range(len(t.parts)):
            _, (q, s, b) = awq.nearest(awq_result, t.name, p, read_part(source, t, p), e.bits, e.group_size,
                                       mx_dtype(e.dtype))
            parts.append((np.array(q), *[np.array(a.astype(mx_dtype("F32"))) for a in (s, b)]))
        out[t.name] = parts
    return out


def run_distill(src: Path, source, plan: Plan, options: ConvertOptions, awq_result, rounded: dict, group=None):
    """Distillation of the rounded quant on the calibration windows (under a group: rank 0's, its
    held-out checks split over the ranks)."""
    from mixquant.calib.data import calibration_set
    from mixquant.distributed import is_main, rank0_windows
    from mixquant.loading import load
    from mixquant.progress import callback
    from mixquant.quant.distill import distill

    loaded = load(src, dtype="float32", dequantize=True, config_dir=options.config_dir)
    windows = None
    if is_main(group):
        windows = calibration_set(options.calib, loaded.model, loaded.tokenizer, options.calib_tokens, CALIB_CTX,
                                  embedding_rows(loaded.config, src), source=src, config_dir=options.config_dir)
    windows = rank0_windows(windows, group, str(src), "--calib-tokens")
    encodings = {**nearest_encodings(source, plan, awq_result, rounded), **rounded}
    result = distill(loaded.model, windows, plan, encodings, mx_dtype(plan.entries[0].dtype), options.distill_steps,
                     awq_result, progress=callback("distilling") if options.progress is not False else None,
                     norms=options.distill_norms, floats=options.distill_floats, anneal=options.distill_anneal,
                     lr=distill_lr(options), group=group)
    if not result.kept and is_main(group):
        log.warning("distillation did not lower the held-out KL divergence (%.5f): the quant keeps its rounding",
                    result.before)
    return result


def methods_summary(options: ConvertOptions, distilled) -> dict:
    out = {"rounding": options.rounding}
    if options.preset is not None:
        out["preset"] = options.preset
    if options.rounding == LEARNED:
        out["learn_steps"] = learn_steps(options)
    if options.rounding != NEAREST or distilled is not None:
        out["calibration"] = options.calib
    if distilled is not None:
        out["distillation"] = {"steps": distilled.steps, "kept": distilled.kept, "heldout_before": distilled.before,
                               "heldout_after": distilled.after, "best_step": distilled.best_step,
                               "heldout_checks": [[s, kl] for s, kl in distilled.checks],
                               "norms": options.distill_norms,
                               "floats": options.distill_floats,
                               "anneal": options.distill_anneal, "lr": distill_lr(options)}
    return out


def distill_lr(options: ConvertOptions) -> float:
    from mixquant.quant.distill import LEARNING_RATE

    return options.distill_lr if options.distill_lr is not None else LEARNING_RATE


def run_awq(src: Path, source, plan: Plan, opts: AwqOptions):
    """AWQ's decisions. The searched alpha's end-to-end judge holds the float model in memory; without
    it (fixed alpha, --awq-judge-windows 0, or a model whose float32 weights would take more than half
    the machine's memory) the activations are recorded one decoder layer at a time and each layer's
    groups are decided before the next layer runs."""
    from mixquant.calib.imatrix import calibrate, match_imatrix
    from mixquant.calib.streamed import streamable
    from mixquant.io.imatrix import read_imatrix
    from mixquant.quant import awq

    rows_by_module = None
    if opts.imatrix_path is not None:
        rows_by_module = match_imatrix(read_imatrix(opts.imatrix_path), plan, source.config, opts.imatrix_path)
    stats: dict = {}

    def importance_of(module, mat):
        if rows_by_module is not None:
            rows = rows_by_module.get(module)
            if rows is None:
                return None
            return rows[mat] if len(rows) > 1 else rows[0]
        s = stats.get(module)
        if s is None or s.counts[mat] == 0:
            return None
        return s.sum2[mat] / s.counts[mat]

    def samples_of(module, mat):
        return stats[module].sample(mat) if module in stats else None

    structure = family_for_config(source.config, source.config_path).structure
    config_dir = getattr(source, "config_dir", None)
    if opts.alpha is not None and opts.imatrix_path is not None:  # nothing to measure
        return awq.compute(source, plan, structure, importance_of, samples_of, opts.alpha, opts.strict)
    judged = opts.alpha is None and opts.judge_windows > 0
    if judged and not fits_in_memory(plan):
        log.warning("AWQ: the float model (%.1f GB in float32) does not fit in half this machine's memory, so "
                    "no end-to-end judge: each group's alpha is checked on held-out calibration rows",
                    float_bytes(plan) / 1e9)
        judged = False
    if judged or not streamable(src):
        got, _, _, judge = calibrate(src, opts.calib, opts.tokens, opts.ctx, opts.judge_windows if judged else 0,
                                     config_dir=config_dir)
        stats.update(got)
        return awq.compute(source, plan, structure, importance_of, samples_of, opts.alpha, opts.strict, judge)
    return _awq_streamed(src, config_dir, source, plan, structure, opts, stats, importance_of, samples_of)


def _awq_streamed(src, config_dir, source, plan, structure, opts, stats, importance_of, samples_of):
    from mixquant.calib.data import calibration_set
    from mixquant.calib.streamed import StreamedModel, collect_streamed
    from mixquant.quant import awq

    search = awq.Search(source, plan, opts.alpha, opts.strict)
    by_layer: dict[int, list] = {}
    for g in awq.groups(plan, structure):
        by_layer.setdefault(g.layer, []).append(g)

    def after_layer(layer, recorded):
        stats.update(recorded)
        for g in by_layer.pop(layer, []):
            search.decide(g, importance_of, samples_of)
        for s in recorded.values():  # a layer's input rows serve only its own groups
            s.samples = [None] * len(s.samples)

    streamed = StreamedModel(src, config_dir)
    windows = calibration_set(opts.calib, None, streamed.tokenizer, opts.tokens, opts.ctx,
                              embedding_rows(streamed.config, src), source=src, config_dir=config_dir)
    collect_streamed(streamed, windows, samples=opts.alpha is None, after_layer=after_layer)
    if by_layer:
        raise MixquantError(f"{src}: the model has no decoder layer {min(by_layer)}, which the plan has")
    return search.finish()


def float_bytes(plan: Plan) -> int:
    """The text model's weights in float32: what holding the unquantized model in memory takes."""
    return 4 * sum(e.params for e in plan.entries if e.tensor.scope == SCOPE_MODEL)


def fits_in_memory(plan: Plan) -> bool:
    from mixquant.loading import memory_bytes

    return float_bytes(plan) <= memory_bytes() // 2


def distill_too_big(src: Path, plan: Plan, options: ConvertOptions) -> str:
    from mixquant.loading import memory_bytes

    asked = f"--quality {options.preset}" if options.preset else "--q-distill"
    return (f"{src}: {asked}: distillation holds the whole unquantized model ({float_bytes(plan) / 1e9:.1f} GB in "
            f"float32), more than half of this machine's memory ({memory_bytes() / 1e9:.1f} GB); use --q-rounding "
            f"learned, which rounds a layer at a time in bounded memory")


def awq_summary(opts: AwqOptions | None, result) -> dict | None:
    if opts is None or result is None:
        return None
    alphas = list(result.alphas.values())
    return {
        "importance": str(opts.imatrix_path) if opts.imatrix_path else f"calibration ({opts.calib})",
        "alpha": "searched per group" if opts.alpha is None else opts.alpha,
        "groups": len(alphas),
        "mean_alpha": float(np.mean(alphas)) if alphas else 0.0,
        "clipped": len(result.fits),
        "judged": result.judged,
        "skipped": result.skipped,
    }
