"""Model families. Each `arch/<family>.py` holds all that is known about one family and exposes it as
`FAMILY` (a mixquant.arch.tensors.Family): the config model types it reads, the tensor table that
turns a source into output tensors with roles, its llama.cpp GGUF names and layouts, and the
structure channel-scale folding relies on. Adding a family is one file and one line below.
"""

from __future__ import annotations

from mixquant.arch import llama, qwen3, qwen35
from mixquant.arch.tensors import Family
from mixquant.errors import MixquantError

FAMILIES: tuple[Family, ...] = (qwen35.FAMILY, llama.FAMILY, qwen3.FAMILY)


def family_for_config(config: dict, config_path) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise MixquantError(f"{config_path}: unsupported model_type {model_type!r} (supported: {supported})")


def family_for_gguf(arch, path) -> Family:
    for family in FAMILIES:
        if family.gguf is not None and arch in family.gguf.archs:
            return family
    supported = ", ".join(a for f in FAMILIES if f.gguf is not None for a in f.gguf.archs)
    raise MixquantError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {supported})")


def gguf_arch_of(config: dict, config_path) -> str:
    """The llama.cpp architecture name of a model (what its imatrix belongs to)."""
    family = family_for_config(config, config_path)
    if family.gguf is None:
        raise MixquantError(f"{config_path}: llama.cpp has no architecture for {family.name}")
    return family.gguf.arch_for(config)
