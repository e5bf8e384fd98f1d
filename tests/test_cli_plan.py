"""`mixquant plan`: the table and JSON describe every tensor without converting anything."""

import json

from conftest import run_cli


def test_plan_json_lists_every_tensor(fixture_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("plan", "-i", fixture_dir, "-q", "--q-bits", "4", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in data["tensors"]}
    assert len(rows) == 145
    head = rows["language_model.lm_head.weight"]
    assert head == {
        "name": "language_model.lm_head.weight", "role": "lm_head", "scope": "model", "shape": [8192, 256],
        "bits": 8, "group_size": 64, "dtype": "U32",
        "bytes": 8192 * 256 * 8 // 8 + 2 * 8192 * (256 // 64) * 2,
    }
    conv = rows["language_model.model.layers.0.linear_attn.conv1d.weight"]
    assert conv["shape"] == [512, 4, 1] and conv["bits"] is None
    assert rows["language_model.model.layers.0.linear_attn.A_log"]["dtype"] == "F32"
    s = data["summary"]
    assert s["recipe"] == "unsloth-4" and s["files"] == ["model.safetensors", "mtp.safetensors"]
    assert s["bits_per_weight"] == round(8 * s["model_bytes"] / s["model_params"], 4)
    assert not list(tmp_path.iterdir())  # plan writes nothing


def test_plan_reads_no_weight(fixture_dir, tmp_path, capsys):
    """The plan of a copy whose tensor data is all zeros is the plan of the real model: only headers
    are read."""
    import shutil
    import struct

    zeroed = tmp_path / "zeroed"
    shutil.copytree(fixture_dir, zeroed)
    for shard in zeroed.glob("*.safetensors"):
        data = bytearray(shard.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        data[8 + n :] = bytes(len(data) - 8 - n)
        shard.write_bytes(bytes(data))
    plans = []
    for folder in (fixture_dir, zeroed):
        assert run_cli("plan", "-i", folder, "-q", "--json") == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0] == plans[1]


def test_plan_table_has_totals(fixture_dir, capsys):
    assert run_cli("plan", "-i", fixture_dir, "--q-recipe", "uniform", "--q-bits", "4") == 0
    out = capsys.readouterr().out
    assert "language_model.model.layers.3.self_attn.o_proj.weight" in out
    assert "recipe: uniform-4" in out and "bits per weight" in out and "GB on disk" in out


def test_unquantized_plan(fixture_dir, capsys):
    assert run_cli("plan", "-i", fixture_dir, "--json") == 0
    s = json.loads(capsys.readouterr().out)["summary"]
    assert s["recipe"] == "none" and 16.0 < s["bits_per_weight"] < 16.01  # A_log stays float32
