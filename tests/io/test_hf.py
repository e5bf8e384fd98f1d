"""A Hugging Face folder as a source: the index and the shards must agree."""

import json
import shutil

import pytest

from mixquant.errors import MixquantError
from mixquant.io.hf import open_hf_folder


def _copy(fixture_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(fixture_dir, src)
    return src


def test_index_listing_a_tensor_its_shard_lacks(fixture_dir, tmp_path):
    src = _copy(fixture_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.language_model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MixquantError, match=r"index.json: lists tensor model.language_model.layers.9.mlp.up_proj"
                                            r".weight, which model-00001-of-00002.safetensors does not hold"):
        open_hf_folder(src)


def test_shard_holding_a_tensor_the_index_places_elsewhere(fixture_dir, tmp_path):
    src = _copy(fixture_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = "model-00002-of-00002.safetensors" if shard.startswith("model-00001") else \
        "model-00001-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MixquantError, match=f"holds tensor {name}, which model.safetensors.index.json does not place"):
        open_hf_folder(src)


def test_index_naming_a_file_outside_the_folder(fixture_dir, tmp_path):
    src = _copy(fixture_dir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MixquantError, match="is not a file in the folder"):
        open_hf_folder(src)
