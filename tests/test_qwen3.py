"""Qwen3 and Qwen3-MoE, added as one family file: conversion matches transformers, the unsloth
recipe gives each role its bits, AWQ keeps the float function, and llama.cpp's GGUF converts back."""

import json
import shutil

import numpy as np
import pytest

import llamacpp_tools
from conftest import FIXTURE, mlx_logits, randomize_, reference_logits, run_cli, token_ids

VOCAB = 8192


def save_tiny_qwen3(path, moe: bool, seed: int, **overrides):
    import torch
    import transformers as tf

    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if moe:
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    cfg.update(overrides)
    config = (tf.Qwen3MoeConfig if moe else tf.Qwen3Config)(**cfg)
    torch.manual_seed(seed)
    model = (tf.Qwen3MoeForCausalLM if moe else tf.Qwen3ForCausalLM)(config)
    randomize_(model, seed)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, path / name)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    return {"dense": save_tiny_qwen3(root / "dense", moe=False, seed=21),
            "moe": save_tiny_qwen3(root / "moe", moe=True, seed=22),
            "moe-mixed": save_tiny_qwen3(root / "moe-mixed", moe=True, seed=23, mlp_only_layers=[1])}


@pytest.mark.parametrize("name", ["dense", "moe", "moe-mixed"])
def test_float32_conversion_matches_transformers(tiny, tmp_path, name):
    out = tmp_path / "mlx"
    assert run_cli("convert", "-i", tiny[name], "-o", out, "--dtype", "float32") == 0
    ids = token_ids(48, VOCAB, seed=5)
    diff = np.abs(mlx_logits(out, ids) - reference_logits(tiny[name], ids)).max()
    assert diff <= 1e-4, f"{name}: max abs logit difference {diff}"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen3" if name == "dense" else "qwen3_moe")


def test_moe_layers_follow_mlp_only_layers(tiny, capsys):
    assert run_cli("plan", "-i", tiny["moe-mixed"], "--json") == 0
    roles = {(r["name"], r["role"]) for r in json.loads(capsys.readouterr().out)["tensors"]}
    assert ("model.layers.0.mlp.switch_mlp.gate_proj.weight", "moe_gate_exps") in roles
    assert ("model.layers.1.mlp.gate_proj.weight", "ffn_gate") in roles  # a dense layer among MoE ones
    assert ("model.layers.2.mlp.gate.weight", "moe_router") in roles


@pytest.mark.parametrize("name", ["dense", "moe-mixed"])
def test_unsloth_recipe_gives_each_role_its_bits(tiny, tmp_path, name):
    from mlx_lm import load

    out = tmp_path / "q"
    assert run_cli("convert", "-i", tiny[name], "-o", out, "-q", "--q-recipe", "unsloth", "--q-bits", "3",
                   "--q-group-size", "32") == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    expected = {"self_attn.q_proj": 5, "self_attn.k_proj": 5, "self_attn.v_proj": 5, "self_attn.o_proj": None,
                "mlp.gate_proj": 3, "mlp.up_proj": 3, "mlp.down_proj": 4, "mlp.gate": 8,
                "mlp.switch_mlp.gate_proj": 3, "mlp.switch_mlp.up_proj": 3, "mlp.switch_mlp.down_proj": 4}
    seen = 0
    for module, value in q.items():
        rel = module.split(".", 3)[-1] if module.startswith("model.layers.") else module
        if rel in expected:
            seen += 1
            assert value == (False if expected[rel] is None else {"group_size": 32, "bits": expected[rel],
                                                                  "mode": "affine"}), module
    assert q["model.embed_tokens"]["bits"] == 5 and q["lm_head"]["bits"] == 6
    assert seen == (3 * 7 if name == "dense" else 2 * 8 + 7)
    load(str(out))


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_awq_keeps_the_float_function(tiny, tmp_path, name):
    plain, scaled = tmp_path / "plain", tmp_path / "awq"
    assert run_cli("convert", "-i", tiny[name], "-o", plain, "--dtype", "float32") == 0
    assert run_cli("convert", "-i", tiny[name], "-o", scaled, "--dtype", "float32", "--calib", "mix",
                   "--awq-alpha", "0.5") == 0
    ids = token_ids(48, VOCAB, seed=6)
    assert np.abs(mlx_logits(scaled, ids) - mlx_logits(plain, ids)).max() <= 1e-4
    assert "## AWQ" in (scaled / "README.md").read_text()


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_llama_cpp_gguf_matches_transformers(tiny, tmp_path, name):
    gguf_file = llamacpp_tools.hf_to_gguf(tiny[name], tmp_path / f"{name}.gguf")
    out = tmp_path / "mlx"
    assert run_cli("convert", "-i", gguf_file, "-o", out, "--dtype", "float32") == 0
    ids = token_ids(48, 8166, seed=7)
    diff = np.abs(mlx_logits(out, ids) - reference_logits(tiny[name], ids)).max()
    assert diff <= 1e-3, f"{name}: max abs logit difference {diff}"
