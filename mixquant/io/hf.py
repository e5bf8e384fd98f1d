"""A Hugging Face model folder as a source: its config and a name -> tensor map over all shards."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError
from mixquant.io.safetensors import TensorInfo, read_header, read_tensor
from mixquant.io.textfile import MAX_JSON_BYTES, read_json_object, read_text

# Files a converted folder carries over unchanged (tokenizer, template, generation defaults).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer


def check_tokenizer_files(folder: Path) -> None:
    """The folder has a tokenizer, and its JSON files parse (within size and nesting limits)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MixquantError(f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}: none of them is there)")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                 "added_tokens.json", "generation_config.json", "chat_template.json"):
        if (folder / name).exists():
            read_json_object(folder / name)


def load_json(path: Path) -> dict:
    return read_json_object(path)


@dataclass
class HFSource:
    """Tensors are read on demand; nothing but headers is touched when the source is opened."""

    root: Path
    config: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def read(self, name: str, index=None) -> np.ndarray:
        return read_tensor(self.tensors[name], index)

    @property
    def where(self) -> str:
        return str(self.root)

    @property
    def config_path(self) -> str:
        return str(self.root / "config.json")

    @property
    def name(self) -> str:
        return self.root.name

    def write_side_files(self, dest: Path) -> None:
        for name in SIDE_FILES:
            if (self.root / name).is_file():
                shutil.copy(self.root / name, dest / name)


def open_hf_folder(root: Path) -> HFSource:
    root = Path(root)
    if not root.is_dir():
        raise MixquantError(f"{root}: not a folder")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise MixquantError(f"{root}: missing config.json")
    config = load_json(config_path)
    weight_map = _weight_map(root)
    shards = sorted(set(weight_map.values())) if weight_map else sorted(root.glob("*.safetensors"))
    if not shards:
        raise MixquantError(f"{root}: no .safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(shard).items():
            if name in tensors:
                raise MixquantError(f"{shard}: tensor {name} also appears in {tensors[name].file.name}")
            if weight_map is not None and weight_map.get(name) != shard:
                raise MixquantError(f"{shard}: holds tensor {name}, which {INDEX_FILE} does not place there")
            tensors[name] = info
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise MixquantError(f"{root / INDEX_FILE}: lists tensor {missing[0]}, which {weight_map[missing[0]].name} "
                                "does not hold")
    return HFSource(root, config, tensors)


INDEX_FILE = "model.safetensors.index.json"


def _weight_map(root: Path) -> dict[str, Path] | None:
    """tensor name -> shard path from the index, or None without an index."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        return None
    weight_map = load_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise MixquantError(f"{index_path}: no weight_map")
    for name in sorted(set(weight_map.values())):
        if "/" in name or name.startswith("."):
            raise MixquantError(f"{index_path}: shard name {name!r} is not a file in the folder")
        if not (root / name).is_file():
            raise MixquantError(f"{index_path}: shard {name} is missing")
    return {k: root / v for k, v in weight_map.items()}


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_chat_template(folder: Path) -> tuple[str | None, dict]:
    """(chat template source or None, special token strings) from chat_template.jinja or
    tokenizer_config.json."""
    folder = Path(folder)
    config = load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    specials = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja", MAX_JSON_BYTES), specials
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template if isinstance(template, str) and template else None), specials
