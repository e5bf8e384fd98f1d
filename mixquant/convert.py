"""Convert a source checkpoint to an MLX model folder by following a plan, tensor by tensor.

Memory stays bounded: each source tensor is read in row blocks of at most ROW_BLOCK_BYTES (as
float32), transformed, cast or quantized, and appended to its place in a safetensors file whose
header was written from the plan before any data. Output goes to a temporary folder beside OUT
that is renamed at the end, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mixquant.arch import architecture_for
from mixquant.arch.tensors import TRANSFORMS, Part
from mixquant.errors import MixquantError
from mixquant.io.atomic import default_mode
from mixquant.io.hf import open_hf_folder
from mixquant.io.safetensors import StreamingWriter
from mixquant.modelcard import model_card
from mixquant.quant import fit
from mixquant.quant.plan import SAFETENSORS_METADATA, Plan, TensorPlan, make_plan
from mixquant.quant.recipe import Recipe

ROW_BLOCK_BYTES = 64 * 1024 * 1024
MX_DTYPES = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32}
# MLX has no numpy bfloat16: such arrays leave MLX viewed as their raw 16-bit words.
MX_RAW_VIEW = {"BF16": mx.uint16, "F16": mx.float16, "F32": mx.float32}


@dataclass
class ConvertOptions:
    recipe: Recipe | None = None
    dtype: str = "bfloat16"
    max_shard_bytes: int = 5 * 10**9
    keep_vision: bool = True
    keep_mtp: bool = True
    force: bool = False
    progress: bool | None = None  # None: only on a terminal
    config_dir: Path | None = None  # GGUF input: HF config/tokenizer files to use instead of synthesising
    awq: "AwqOptions | None" = None


@dataclass
class AwqOptions:
    imatrix_path: Path | None = None  # importance from this file; else from calibration
    calib: str = "mix"  # calibration text for the importance (without a file) and the alpha search
    alpha: float | None = None  # fixed exponent; None: searched per group
    strict: bool = False  # a group the imatrix does not cover is an error, not a warning
    tokens: int | None = None
    ctx: int = 512
    judge_windows: int = 4  # searched alpha: calibration windows for the end-to-end check; 0: none


def open_source(path: Path, config_dir: Path | None = None):
    """A Hugging Face folder, or a GGUF file (the first part of a split one)."""
    path = Path(path)
    if not path.exists():
        raise MixquantError(f"{path}: no such file or folder")
    if path.is_file():
        from mixquant.io.gguf import open_gguf

        return open_gguf(path, config_dir)
    if config_dir is not None:
        raise MixquantError(f"--config-dir: only for GGUF input; {path} is a folder")
    return open_hf_folder(path)


def build_plan(src: Path, options: ConvertOptions) -> tuple[object, Plan]:
    source = open_source(src, options.config_dir)
    arch = architecture_for(source.config, source.config_path)
    arch_plan = arch.build(source, keep_vision=options.keep_vision, keep_mtp=options.keep_mtp)
    return source, make_plan(arch_plan, options.recipe, options.dtype)


def source_name(path: Path) -> str:
    """The model's name for the card: the folder, or the GGUF file without its split suffix."""
    from mixquant.io.gguf import SPLIT_NAME

    m = SPLIT_NAME.match(path.name)
    return f"{m.group('stem')}.gguf" if m else path.name


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    s = text.strip().upper()
    digits = s.rstrip("KMGTB")
    unit = s[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise MixquantError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB)")
    return int(value * units[unit])


def convert(src: Path, out: Path, options: ConvertOptions) -> Plan:
    out = Path(out)
    if out.exists() and not options.force:
        raise MixquantError(f"{out}: already exists (use --force to replace it)")
    source, plan = build_plan(src, options)
    awq_result = run_awq(Path(src), source, plan, options.awq) if options.awq else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, default_mode(0o777))  # mkdtemp makes it private; the result should look like any folder
    try:
        write_weights(source, plan, tmp, options, awq_result)
        with open(tmp / "config.json", "w") as f:
            json.dump(plan.output_config(), f, indent=2)
            f.write("\n")
        source.write_side_files(tmp)
        (tmp / "README.md").write_text(model_card(plan, source_name(Path(src)), options.max_shard_bytes,
                                                  awq_summary(options.awq, awq_result)))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan


def run_awq(src: Path, source, plan: Plan, opts: AwqOptions):
    from mixquant.arch.gguf_names import gguf_name_for
    from mixquant.calib.imatrix import calibrate, gguf_arch
    from mixquant.io.imatrix import read_imatrix
    from mixquant.quant import awq

    stats = judge = None
    if opts.alpha is None or opts.imatrix_path is None:  # the search needs activations
        judge_windows = opts.judge_windows if opts.alpha is None else 0
        stats, _, _, judge = calibrate(src, opts.calib, opts.tokens, opts.ctx, judge_windows)
    if opts.imatrix_path is not None:
        imatrix = read_imatrix(opts.imatrix_path)
        arch = gguf_arch(source.config)
        in_features = {e.tensor.module: e.tensor.in_features for e in plan.entries}

        @functools.lru_cache(maxsize=None)  # MoE: one call per expert, one importance per tensor
        def importance_rows(module):
            entry = imatrix.entries.get(gguf_name_for(arch, module) or "")
            if entry is None:
                return None
            rows, n_in = entry.importance(), in_features[module]
            return rows.reshape(-1, n_in) if rows.size % n_in == 0 else rows

        def importance_of(module, mat):
            rows = importance_rows(module)
            return rows[mat] if rows is not None and mat < rows.shape[0] else None
    else:
        def importance_of(module, mat):
            s = stats.get(module)
            if s is None or s.counts[mat] == 0:
                return None
            return s.sum2[mat] / s.counts[mat]

    def samples_of(module, mat):
        return stats[module].sample(mat) if stats is not None and module in stats else None

    return awq.compute(source, plan, importance_of, samples_of, opts.alpha, opts.strict, judge)


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


def write_weights(source, plan: Plan, folder: Path, options: ConvertOptions, awq_result=None) -> None:
    shards = plan.shards(options.max_shard_bytes)
    progress = _Progress(plan, options.progress)
    weight_map = {}
    try:
        for file_name, entries in shards.items():
            specs = [s for e in entries for s in e.out_specs()]
            writer = StreamingWriter(folder / file_name, specs, SAFETENSORS_METADATA)
            for entry in entries:
                _write_entry(source, entry, writer, awq_result)
                progress.advance(entry)
                mx.clear_cache()
            writer.close()
            if file_name.startswith("model"):
                weight_map.update({s.name: file_name for s in specs})
    finally:
        progress.stop()
    model_files = [f for f in shards if f.startswith("model")]
    if len(model_files) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in plan.entries if e.file_kind == "model")},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(folder / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=2)


def _write_entry(source, entry: TensorPlan, writer: StreamingWriter, awq_result=None) -> None:
    """Append every part of the tensor, block of rows by block of rows, to its output tensors."""
    from mixquant.quant import awq

    specs = entry.out_specs()
    transform = TRANSFORMS[entry.tensor.role.transform]
    for i, part in enumerate(entry.tensor.parts):
        ops = awq_result.for_part(entry.tensor.name, i) if awq_result else []
        fit_importance = awq_result.fit_for(entry.tensor.name, i) if awq_result else None
        for r0, block in _row_blocks(source, part):
            block = transform(block)
            if ops:
                block = awq.apply(ops, block, r0)
            for spec, arr in zip(specs, _encode(block, entry, fit_importance)):
                writer.write(spec.name, arr)


def _row_blocks(source, part: Part):
    """(first row, float32 block) over consecutive row ranges of the part (axis 0 after indexing)."""
    info = source.tensors[part.source]
    shape = _index_shape(info.shape, part.index)
    if len(shape) < 2:
        yield 0, source.read(part.source, part.index)
        return
    row_bytes = 4 * int(np.prod(shape[1:]))
    step = max(1, ROW_BLOCK_BYTES // max(row_bytes, 1))
    for r0 in range(0, shape[0], step):
        yield r0, source.read(part.source, _compose(part.index, r0, min(shape[0], r0 + step)))


def _index_shape(shape, index) -> tuple[int, ...]:
    if index is None:
        return tuple(shape)
    index = index if isinstance(index, tuple) else (index,)
    out = []
    for dim, ix in zip(shape, index):
        if isinstance(ix, slice):
            out.append(len(range(*ix.indices(dim))))
    return (*out, *shape[len(index):])


def _compose(index, r0: int, r1: int):
    """`index` followed by rows r0:r1 of what it selects."""
    if index is None:
        return (slice(r0, r1),)
    index = index if isinstance(index, tuple) else (index,)
    lead = tuple(i for i in index if not isinstance(i, slice))
    rest = [i for i in index if isinstance(i, slice)]
    if rest:
        start = rest[0].start or 0
        return (*lead, slice(start + r0, start + r1), *rest[1:])
    return (*lead, slice(r0, r1))


def _encode(block: np.ndarray, entry: TensorPlan, fit_importance: np.ndarray | None = None) -> list[np.ndarray]:
    if not entry.quantized:
        x = mx.array(np.ascontiguousarray(block, dtype=np.float32)).astype(MX_DTYPES[entry.dtype])
        out = [x.view(MX_RAW_VIEW[entry.dtype])]
    else:
        w, scales, biases = fit.quantize(block, entry.bits, entry.group_size, MX_DTYPES[entry.dtype], fit_importance)
        view = MX_RAW_VIEW[entry.dtype]
        out = [w, scales.view(view), biases.view(view)]
    mx.eval(out)
    return [np.array(a, copy=False) for a in out]


class _Progress:
    """A rich progress bar (tensors, GB, ETA) on a terminal; silent otherwise."""

    def __init__(self, plan: Plan, enabled: bool | None):
        self.bar = None
        if enabled is None:
            enabled = sys.stderr.isatty()
        if not enabled:
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("converting"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
            DownloadColumn(binary_units=False),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.bar.add_task("convert", total=plan.total_tensor_bytes, done=0, count=len(plan.entries))
        self.done = 0
        self.bar.start()

    def advance(self, entry: TensorPlan) -> None:
        if self.bar is not None:
            self.done += 1
            self.bar.update(self.task, advance=entry.nbytes, done=self.done)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
