"""Acceptance: unquantized float32 conversion reproduces transformers' logits (max abs <= 1e-4)."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from conftest import mlx_logits, reference_logits, run_cli, token_ids

TOL = 1e-4


@pytest.mark.parametrize("name", ["fixture", "text-r1", "text-r2", "text-r3", "vlm-r2", "moe-text", "moe-vlm"])
def test_float32_conversion_matches_transformers(tiny_models, fixture_dir, tmp_path, name):
    """The trained fixture and tiny random models (head ratios 1-3, text-only and VLM-wrapped, MoE)."""
    src, vocab = (fixture_dir, 8166) if name == "fixture" else (tiny_models[name], 512)
    out = tmp_path / "mlx"
    assert run_cli("convert", "-i", src, "-o", out, "--dtype", "float32") == 0
    ids = token_ids(64, vocab, seed=1)
    diff = np.abs(mlx_logits(out, ids) - reference_logits(src, ids)).max()
    assert diff <= TOL, f"{name}: max abs logit difference {diff}"


def test_text_only_config_becomes_wrapped_qwen3_5(tiny_models, tmp_path):
    out = tmp_path / "mlx"
    run_cli("convert", "-i", tiny_models["moe-text"], "-o", out, "--dtype", "float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe"
    assert config["text_config"]["model_type"] == "qwen3_5_moe_text"
    assert config["text_config"]["num_experts"] == 4


def test_moe_experts_are_stacked_in_mlx_names(tiny_models, tmp_path):
    out = tmp_path / "mlx"
    run_cli("convert", "-i", tiny_models["moe-text"], "-o", out, "--dtype", "float32")
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
        gate = f.get_tensor("language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight")
    with safe_open(tiny_models["moe-text"] / "model.safetensors", "np") as f:
        expert2 = f.get_tensor("model.layers.0.mlp.experts.2.gate_proj.weight")
    assert gate.shape == (4, 32, 64)
    np.testing.assert_array_equal(gate[2], expert2)
    assert not any(".experts." in k for k in keys)
    assert "language_model.model.layers.0.mlp.shared_expert_gate.weight" in keys


def test_vlm_keeps_vision_and_mtp_sidecar(fixture_dir, tmp_path):
    out = tmp_path / "mlx"
    run_cli("convert", "-i", fixture_dir, "-o", out)
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
    with safe_open(out / "mtp.safetensors", "np") as f:
        mtp_keys = set(f.keys())
    assert "model.visual.patch_embed.proj.weight" in keys
    assert not any(k.startswith("mtp.") for k in keys)
    assert len(mtp_keys) == 15 and "mtp.fc.weight" in mtp_keys
    config = json.loads((out / "config.json").read_text())
    assert "vision_config" in config


def test_drop_vision_and_mtp(fixture_dir, tmp_path):
    out = tmp_path / "mlx"
    run_cli("convert", "-i", fixture_dir, "-o", out, "--drop-vision", "--drop-mtp")
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert not any(k.startswith("model.visual") for k in keys)
    assert not (out / "mtp.safetensors").exists()
    assert "vision_config" not in json.loads((out / "config.json").read_text())


def test_fused_expert_layout_converts_like_per_expert(tiny_models, tmp_path):
    """Checkpoints with fused `experts.gate_up_proj` / `experts.down_proj` stack to the same tensors."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_models["moe-text"]
    fused_dir = tmp_path / "fused"
    shutil.copytree(src, fused_dir)
    tensors = load_file(str(src / "model.safetensors"))
    for layer in range(4):
        p = f"model.layers.{layer}.mlp.experts."
        gate = [tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(4)]
        up = [tensors.pop(f"{p}{e}.up_proj.weight") for e in range(4)]
        down = [tensors.pop(f"{p}{e}.down_proj.weight") for e in range(4)]
        tensors[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        tensors[p + "down_proj"] = torch.stack(down)
    save_file(tensors, str(fused_dir / "model.safetensors"))

    assert run_cli("convert", "-i", src, "-o", tmp_path / "a", "-q", "--q-group-size", "32") == 0
    assert run_cli("convert", "-i", fused_dir, "-o", tmp_path / "b", "-q", "--q-group-size", "32") == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_config_with_layer_types_only(tmp_path):
    """transformers >= 5.2 writes `layer_types` without `full_attention_interval`: the interval is
    derived (and written for mlx-lm) when the pattern is periodic; otherwise a one-line error."""
    from conftest import save_tiny_qwen35

    src = save_tiny_qwen35(tmp_path / "src", ratio=2, moe=True, seed=5, num_hidden_layers=6,
                           full_attention_interval=3,
                           layer_types=["linear_attention", "linear_attention", "full_attention"] * 2)
    config = json.loads((src / "config.json").read_text())
    del config["full_attention_interval"]
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "mlx"
    assert run_cli("convert", "-i", src, "-o", out, "--dtype", "float32") == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["full_attention_interval"] == 3
    ids = token_ids(32, 512, seed=2)
    assert np.abs(mlx_logits(out, ids) - reference_logits(src, ids)).max() <= TOL

    config["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "linear_attention",
                             "full_attention", "full_attention"]
    (src / "config.json").write_text(json.dumps(config))
    assert run_cli("convert", "-i", src, "-o", tmp_path / "bad") == 2
