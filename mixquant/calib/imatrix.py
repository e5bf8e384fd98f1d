"""`mixquant imatrix`: our own importance matrix, in llama.cpp's GGUF imatrix format."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixquant.arch import gguf_names
from mixquant.arch.qwen35 import text_config
from mixquant.calib.collect import ModuleStats, collect
from mixquant.calib.data import calibration_documents, calibration_windows
from mixquant.errors import MixquantError
from mixquant.io.imatrix import Imatrix, ImatrixEntry

GGUF_ARCH = {"qwen3_5": "qwen35", "qwen3_5_text": "qwen35", "qwen3_5_moe": "qwen35moe",
             "qwen3_5_moe_text": "qwen35moe", "llama": "llama"}


def gguf_arch(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise MixquantError(f"imatrix: unsupported model_type {model_type!r}")
    return GGUF_ARCH[model_type]


def to_llama_cpp_order(module: str, values: np.ndarray, config: dict) -> np.ndarray:
    """ssm_out's input channels are V-head ordered, which llama.cpp tiles: index them its way."""
    if module.endswith("linear_attn.out_proj"):
        c = text_config(config)
        return gguf_names.tile_v(values, 1, c["linear_num_key_heads"], c["linear_value_head_dim"])
    return values


def stats_to_imatrix(stats: dict[str, ModuleStats], config: dict, dataset: str, chunks: int,
                     chunk_size: int) -> Imatrix:
    arch = gguf_arch(config)
    out = Imatrix(datasets=[dataset], chunk_count=chunks, chunk_size=chunk_size)
    for module, s in stats.items():
        name = gguf_names.gguf_name_for(arch, module)
        if name is None:
            continue
        sum2 = to_llama_cpp_order(module, s.sum2, config)
        out.entries[name] = ImatrixEntry(sum2.astype(np.float32), s.counts.astype(np.float32))
    return out


def compute_imatrix(model_path: Path, calib: str, tokens: int | None, ctx: int, progress=None):
    """(Imatrix, per-module stats with input samples) for an unquantized model (HF, GGUF or MLX)."""
    stats, config, windows, _ = calibrate(model_path, calib, tokens, ctx, progress=progress)
    dataset = "mixquant calibration mix" if calib == "mix" else Path(calib).name
    return stats_to_imatrix(stats, config, dataset, len(windows), windows.shape[1]), stats, config


def calibrate(model_path: Path, calib: str, tokens: int | None, ctx: int, judge_windows: int = 0, progress=None):
    """(per-module stats, config, calibration windows, Judge or None). The judge, on up to
    `judge_windows` windows spread over the calibration text, keeps the float model alive."""
    import json

    import mlx.core as mx

    from mixquant.calib.judge import Judge
    from mixquant.eval.models import load_model, mlx_folder

    with mlx_folder(Path(model_path), "float32") as folder:
        model, tokenizer = load_model(folder, dequantize=True)
        mx.eval(model.parameters())  # in memory before the temporary folder goes
        config = json.loads((folder / "config.json").read_text())
        docs = calibration_documents(calib, tokenizer)
        windows = calibration_windows(docs, tokenizer, tokens, ctx)
        stats = collect(model, windows, progress)
    judge = None
    if judge_windows > 0:
        picks = np.unique(np.linspace(0, len(windows) - 1, min(judge_windows, len(windows))).round().astype(int))
        judge = Judge(model, windows[picks])
    return stats, config, windows, judge
