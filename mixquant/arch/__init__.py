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


INT_LIMITS = {  # config integers every family reads, and the most any real model has by a wide margin
    "num_hidden_layers": 4096, "hidden_size": 1 << 20, "vocab_size": 1 << 22, "num_attention_heads": 4096,
    "num_key_value_heads": 4096, "head_dim": 1 << 16, "intermediate_size": 1 << 22, "num_experts": 1 << 16,
    "num_experts_per_tok": 1 << 16, "moe_intermediate_size": 1 << 22, "shared_expert_intermediate_size": 1 << 22,
    "linear_num_key_heads": 4096, "linear_num_value_heads": 4096, "linear_key_head_dim": 1 << 16,
    "linear_value_head_dim": 1 << 16, "linear_conv_kernel_dim": 64, "full_attention_interval": 4096,
    "mtp_num_hidden_layers": 64, "max_position_embeddings": 1 << 26,
}
POSITIVE_FLOATS = {"rms_norm_eps": 1.0, "rope_theta": 1e12, "partial_rotary_factor": 1.0}  # (0, limit]
DICT_OR_NULL = ("rope_parameters", "rope_scaling", "text_config", "quantization")


def check_config_values(config: dict, where) -> None:
    """The config's numbers, where present, of the type and range every loader assumes (a string
    rms_norm_eps or a billion layers converts and then fails everywhere else)."""
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in DICT_OR_NULL:
            if section.get(key) is not None and not isinstance(section[key], dict):
                raise MixquantError(f"{where}: {key!r} must be an object, got {section[key]!r}")
        for key, limit in INT_LIMITS.items():
            value = section.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                raise MixquantError(f"{where}: {key!r} must be an integer within 0..{limit}, got {value!r}")
            if value == 0 and key in ("num_hidden_layers", "hidden_size", "vocab_size", "head_dim"):
                raise MixquantError(f"{where}: {key!r} must be positive, got 0")
        for sub in (section, section.get("rope_parameters") or {}):
            for key, limit in POSITIVE_FLOATS.items():
                value = sub.get(key)
                if value is None:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= limit:
                    raise MixquantError(f"{where}: {key!r} must be a number within (0, {limit:g}], got {value!r}")


def family_for_config(config: dict, config_path) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            check_config_values(config, config_path)
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
