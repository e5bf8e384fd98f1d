"""A Hugging Face model folder as a source: its config and a name -> tensor map over all shards."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError
from mixquant.io.safetensors import TensorInfo, read_header, read_tensor

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


def load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MixquantError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixquantError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise MixquantError(f"{path}: expected a JSON object")
    return data


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
    shards = _shard_files(root)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(shard).items():
            if name in tensors:
                raise MixquantError(f"{shard}: tensor {name} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return HFSource(root, config, tensors)


def _shard_files(root: Path) -> list[Path]:
    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = load_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MixquantError(f"{index_path}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (root / name).is_file():
                raise MixquantError(f"{index_path}: shard {name} is missing")
        return [root / n for n in files]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise MixquantError(f"{root}: no .safetensors files")
    return files
