"""Acceptance: each bad input gives one clear line, exit code 2, and leaves nothing behind."""

import json
import shutil
import struct

from conftest import run_cli


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _expect_error(capsys, tmp_path, argv, *fragments):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli("convert", *argv, "-o", out) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mixquant: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "a partial output folder was left behind"
    return lines[0]


def test_missing_config(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    (src / "config.json").unlink()
    _expect_error(capsys, tmp_path, ["-i", src], str(src), "missing config.json")


def test_unknown_model_type(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    _edit_config(src, model_type="gpt2")
    _expect_error(capsys, tmp_path, ["-i", src], "config.json", "unsupported model_type 'gpt2'", "qwen3_5")


def test_corrupt_safetensors_header(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json at!"
    shard.write_bytes(bytes(data))
    _expect_error(capsys, tmp_path, ["-i", src], str(shard), "corrupt safetensors header")


def test_absurd_header_length(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    shard.write_bytes(bytes(data))
    _expect_error(capsys, tmp_path, ["-i", src], str(shard), "corrupt safetensors header")


def test_truncated_safetensors(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _expect_error(capsys, tmp_path, ["-i", src], str(shard), "truncated")


def test_shape_does_not_match_config(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    _edit_config(src, intermediate_size=96)
    _expect_error(
        capsys, tmp_path, ["-i", src],
        "tensor model.layers.0.mlp.gate_proj.weight has shape [128, 64], the config implies [96, 64]",
    )


def test_missing_tensor(tiny_models, tmp_path, capsys):
    src = _copy(tiny_models["text-r2"], tmp_path / "src")
    _edit_config(src, num_hidden_layers=6, layer_types=["linear_attention", "full_attention"] * 3)
    _expect_error(capsys, tmp_path, ["-i", src], "missing tensor model.layers.4.input_layernorm.weight")


def test_group_size_does_not_divide(tiny_models, tmp_path, capsys):
    _expect_error(
        capsys, tmp_path, ["-i", tiny_models["text-r2"], "-q", "--q-group-size", "128"],
        "group size 128 does not divide the input dimension 64 of",
    )


def test_unsupported_bits_uniform(tiny_models, tmp_path, capsys):
    _expect_error(
        capsys, tmp_path, ["-i", tiny_models["text-r2"], "--q-recipe", "uniform", "--q-bits", "7"],
        "unsupported bits 7",
    )


def test_unsupported_bits_unsloth(tiny_models, tmp_path, capsys):
    _expect_error(
        capsys, tmp_path, ["-i", tiny_models["text-r2"], "-q", "--q-bits", "9"], "unsloth base bits must be 2..8"
    )


def test_bad_rules_file(tiny_models, tmp_path, capsys):
    rules = tmp_path / "rules.toml"
    rules.write_text('recipe = "unsloth"\n[[rules]]\nname = "*.mlp.*"\nbitz = 4\n')
    _expect_error(
        capsys, tmp_path, ["-i", tiny_models["text-r2"], "--q-recipe", rules], str(rules), "unknown key 'bitz'"
    )


def test_missing_input(tmp_path, capsys):
    _expect_error(capsys, tmp_path, ["-i", tmp_path / "nope"], "nope", "no such file or folder")


def test_existing_output_refused_without_force(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", out) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", out, "--force") == 2  # not ours: kept
    assert "is not a mixquant output; --force replaces only those" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", out, "--force-delete-any") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", out, "--force", "-q") == 0  # ours: replaced
    (out / "extra.txt").write_text("made later")
    capsys.readouterr()
    assert run_cli("convert", "-i", tiny_models["text-r2"], "-o", out, "--force", "-q") == 2  # someone's file in it
    assert "holds files mixquant did not write (extra.txt)" in capsys.readouterr().err
    assert (out / "extra.txt").read_text() == "made later"
