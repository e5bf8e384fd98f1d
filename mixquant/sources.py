"""Opening a checkpoint to convert or load: a Hugging Face folder or a GGUF file (the first part of
a split one). Both present their tensors under Hugging Face names, in Hugging Face layouts."""

from __future__ import annotations

from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.io.gguf_source import GGUFSource
from mixquant.io.hf import HFSource, open_hf_folder


def open_source(path: Path, config_dir: Path | None = None) -> HFSource | GGUFSource:
    path = Path(path)
    if not path.exists():
        raise MixquantError(f"{path}: no such file or folder")
    if path.is_file():
        return GGUFSource(path, config_dir)
    if config_dir is not None:
        raise MixquantError(f"--config-dir: only for GGUF input; {path} is a folder")
    return open_hf_folder(path)


def arch_plan_of(path: Path, config_dir: Path | None = None, keep_vision: bool = True, keep_mtp: bool = True):
    """(source, its family's ArchPlan): every output tensor of the checkpoint, without reading a weight."""
    from mixquant.arch import family_for_config

    source = open_source(path, config_dir)
    family = family_for_config(source.config, source.config_path)
    return source, family.build(source, keep_vision=keep_vision, keep_mtp=keep_mtp)
