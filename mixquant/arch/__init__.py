"""Per-architecture tables: which source tensor is which role, its output name, shape and layout."""

from __future__ import annotations

from pathlib import Path

from mixquant.arch import llama, qwen35
from mixquant.errors import MixquantError

# config model_type -> module with `build(source, options) -> ArchPlan`
ARCHITECTURES = {
    "qwen3_5": qwen35,
    "qwen3_5_text": qwen35,
    "qwen3_5_moe": qwen35,
    "qwen3_5_moe_text": qwen35,
    "llama": llama,
}


def architecture_for(config: dict, config_path: Path):
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise MixquantError(f"{config_path}: unsupported model_type {model_type!r} (supported: {supported})")
    return ARCHITECTURES[model_type]
