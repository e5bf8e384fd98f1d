"""`mixquant imatrix`: our own importance matrix, in llama.cpp's GGUF imatrix format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixquant.arch import family_for_config
from mixquant.arch.tensors import SCOPE_MODEL, weight_name
from mixquant.calib.collect import ModuleStats, collect
from mixquant.calib.data import calibration_set, spread
from mixquant.errors import MixquantError
from mixquant.io.imatrix import Imatrix, ImatrixEntry
from mixquant.vocab import embedding_rows


def _imatrix_names(config: dict, where):
    """(GGUF architecture, output name -> llama.cpp name, channel reorder) of the model's family."""
    family = family_for_config(config, where)
    if family.gguf is None:
        raise MixquantError(f"{where}: llama.cpp has no architecture for {family.name}, so no imatrix names")

    def order(name, values, inverse=False):
        return family.imatrix_order(name, values, config, inverse) if family.imatrix_order else values

    return family.gguf.arch_for(config), family.gguf.name_of, order


def match_imatrix(imatrix: Imatrix, plan, config: dict, path) -> dict[str, np.ndarray]:
    """module path -> importance rows [1 or n_experts, in_features] for every quantizable tensor the
    imatrix covers. An imatrix of another architecture, one whose entry does not fit its tensor, or
    one that covers no tensor at all is an error naming the file."""
    arch, gguf_name, order = _imatrix_names(config, path)
    if imatrix.architecture and imatrix.architecture != arch:
        raise MixquantError(f"{path}: computed on a {imatrix.architecture} model; this model is {arch}")
    out = {}
    for e in plan.entries:
        t = e.tensor
        if not t.role.quantizable or t.scope != SCOPE_MODEL:
            continue
        name = gguf_name(t.name)
        entry = imatrix.entries.get(name or "")
        if entry is None:
            continue
        n_mat, n_in = (len(t.parts) if t.stacked else 1), t.in_features
        rows = entry.importance()
        if rows.shape[-1] != n_in and rows.shape[0] == 1 and rows.size == n_mat * n_in and n_mat > 1:
            rows = rows.reshape(n_mat, n_in)  # legacy .dat: an expert stack as one flat vector
        if rows.shape[-1] != n_in:
            raise MixquantError(f"{path}: entry {name} has rows of {rows.shape[-1]} values, but {t.name} has "
                                f"{n_in} inputs: the imatrix is of another model")
        if rows.shape[0] not in (1, n_mat):
            raise MixquantError(f"{path}: entry {name} has {rows.shape[0]} rows, {t.name} has {n_mat} matrices")
        out[t.module] = order(t.name, rows, inverse=True)
    if not out:
        raise MixquantError(f"{path}: no entry matches a tensor of this model: the imatrix is of another model")
    return out


def stats_to_imatrix(stats: dict[str, ModuleStats], config: dict, dataset: str, chunks: int,
                     chunk_size: int) -> Imatrix:
    arch, gguf_name, order = _imatrix_names(config, "imatrix")
    out = Imatrix(datasets=[dataset], chunk_count=chunks, chunk_size=chunk_size, architecture=arch)
    for module, s in stats.items():
        name = gguf_name(weight_name(module))
        if name is None:
            continue
        sum2 = order(weight_name(module), s.sum2)
        out.entries[name] = ImatrixEntry(sum2.astype(np.float32), s.counts.astype(np.float32))
    return out


def compute_imatrix(model_path: Path, calib: str, tokens: int | None, ctx: int, progress=None, group=None):
    """(Imatrix, per-module stats) for an unquantized model (HF, GGUF or MLX). The model runs one
    decoder layer at a time (its memory: one layer and the calibration states), except MLX folders
    (mlx-lm loads those whole); calibration text the model samples is sampled first, by the whole
    model. group (mixquant.distributed): rank 0's windows are dealt to the ranks in blocks, each
    rank runs its own and the sums are added, so every rank returns the whole imatrix."""
    from mixquant.calib.collect import sum_over_ranks
    from mixquant.calib.streamed import StreamedModel, collect_streamed, streamable
    from mixquant.distributed import owned, rank0_windows

    def share(windows):
        windows = rank0_windows(windows, group, str(model_path), "--tokens")
        mine = owned(len(windows), group)
        return windows, windows[mine.start : mine.stop]

    if not streamable(model_path):
        stats, config, windows, _ = calibrate(model_path, calib, tokens, ctx, progress=progress, share=share)
    else:
        streamed = StreamedModel(Path(model_path))
        config = streamed.config
        windows, mine = share(calibration_set(calib, None, streamed.tokenizer, tokens, ctx,
                                              embedding_rows(config, model_path), source=Path(model_path)))
        stats = collect_streamed(streamed, mine, progress, samples=False)
    stats = sum_over_ranks(stats, group)
    dataset = {"mix": "mixquant calibration mix", "self": "sampled from the model",
               "auto": "mixquant calibration mix and samples of the model"}.get(calib, Path(calib).name)
    return stats_to_imatrix(stats, config, dataset, len(windows), windows.shape[1]), stats, config


def calibrate(model_path: Path, calib: str, tokens: int | None, ctx: int, judge_windows: int = 0, progress=None,
              config_dir: Path | None = None, share=None):
    """(per-module stats, config, calibration windows, Judge or None). The judge, on up to
    `judge_windows` windows spread over the calibration text, keeps the float model alive.
    share(windows) -> (windows, this process's windows), when the statistics are split."""
    from mixquant.calib.judge import Judge
    from mixquant.loading import load

    loaded = load(Path(model_path), dtype="float32", dequantize=True, config_dir=config_dir)
    model, tokenizer, config = loaded.model, loaded.tokenizer, loaded.config
    windows = calibration_set(calib, model, tokenizer, tokens, ctx, embedding_rows(config, model_path),
                              source=Path(model_path), config_dir=config_dir)
    windows, mine = share(windows) if share else (windows, windows)
    stats = collect(model, mine, progress)
    judge = None
    if judge_windows > 0:
        judge = Judge(model, windows[spread(len(windows), judge_windows)])
    return stats, config, windows, judge
