"""Acceptance: unsloth recipes give each role its bits; plans predict bytes on disk."""

import json
import re

import pytest
from safetensors import safe_open

from conftest import run_cli

# Expected bits by module-name pattern for the published Qwen3.5 UD tables (None: not quantized).
UD_TABLES = {
    3: {"embed": 5, "lm_head": 6, "qkv": 5, "ssm_in": 5, "down": 4, "gate_up": 3, "out": None, "ssm_ab": None},
    4: {"embed": 6, "lm_head": 8, "qkv": 6, "ssm_in": 6, "down": 5, "gate_up": 4, "out": None, "ssm_ab": None},
}
MODULE_KIND = [
    (r"language_model\.model\.embed_tokens$", "embed"),
    (r"language_model\.lm_head$", "lm_head"),
    (r"\.self_attn\.[qkv]_proj$", "qkv"),
    (r"\.linear_attn\.in_proj_(qkv|z)$", "ssm_in"),
    (r"\.mlp\.down_proj$", "down"),
    (r"\.mlp\.(gate|up)_proj$", "gate_up"),
    (r"\.(self_attn\.o_proj|linear_attn\.out_proj)$", "out"),
    (r"\.linear_attn\.in_proj_[ab]$", "ssm_ab"),
]


def _kind(module: str) -> str:
    kinds = [k for pattern, k in MODULE_KIND if re.search(pattern, module)]
    assert len(kinds) == 1, module
    return kinds[0]


@pytest.fixture(scope="module", params=[3, 4])
def unsloth_out(request, fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"ud{request.param}") / "model"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--q-recipe", "unsloth", "--q-bits", request.param) == 0
    return request.param, out


def test_every_role_gets_its_bits(unsloth_out):
    base, out = unsloth_out
    q = json.loads((out / "config.json").read_text())["quantization"]
    modules = {k: v for k, v in q.items() if k not in ("group_size", "bits", "mode") and not k.startswith("mtp.")}
    mtp = {k: v for k, v in q.items() if k.startswith("mtp.")}
    # fc + one layer's q,k,v,o,gate,up,down: at the recipe's attention bits (B + 2)
    assert len(mtp) == 1 + 7
    assert all(v == {"group_size": 64, "bits": UD_TABLES[base]["qkv"], "mode": "affine"} for v in mtp.values()), mtp
    assert json.loads((out / "config.json").read_text())["mixquant"]["mtp"] == {"file": "mtp.safetensors"}
    seen = set()
    for module, value in modules.items():
        kind = _kind(module)
        seen.add(kind)
        expected = UD_TABLES[base][kind]
        if expected is None:
            assert value is False, module
        else:
            assert value == {"group_size": 64, "bits": expected, "mode": "affine"}, module
    assert seen == set(UD_TABLES[base])
    # 8 layers: 6 Gated DeltaNet (qkv, z, a, b, out) + 2 attention (q, k, v, o) + 3 MLP each + embed + head
    assert len(modules) == 6 * 5 + 2 * 4 + 8 * 3 + 2


def test_unquantized_roles_have_no_scales(unsloth_out):
    _, out = unsloth_out
    with safe_open(out / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("language_model.model.layers.0.linear_attn.A_log").dtype.name == "float32"
    for never in ("conv1d", "A_log", "dt_bias", "norm", "in_proj_a", "in_proj_b", "o_proj", "out_proj"):
        assert not any(never in k and k.endswith(".scales") for k in keys), never
    assert "language_model.model.layers.3.self_attn.q_proj.scales" in keys


def test_loads_in_mlx_lm_and_generates(unsloth_out):
    import mlx.nn as nn
    from mlx_lm import generate, load

    base, out = unsloth_out
    model, tokenizer = load(str(out))
    head = model.language_model.lm_head
    assert isinstance(head, nn.QuantizedLinear) and head.bits == UD_TABLES[base]["lm_head"]
    assert isinstance(model.language_model.model.layers[3].self_attn.o_proj, nn.Linear)
    text = generate(model, tokenizer, prompt="import os\nimport sys\n", max_tokens=16)
    assert len(tokenizer.encode(text)) >= 8


def test_bytes_on_disk_match_the_plan(unsloth_out, fixture_dir, capsys):
    base, out = unsloth_out
    capsys.readouterr()
    assert run_cli("plan", "-i", fixture_dir, "-q", "--q-recipe", "unsloth", "--q-bits", base, "--json") == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert on_disk == summary["file_bytes"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(summary["files"])


def test_sharded_output_has_index_and_loads(fixture_dir, tmp_path):
    from mlx_lm import load

    out = tmp_path / "sharded"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--max-shard-size", "3MB") == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    load(str(out))


def test_model_card_lists_every_tensor(unsloth_out):
    base, out = unsloth_out
    card = (out / "README.md").read_text()
    assert f"unsloth-{base}" in card
    assert "| `language_model.lm_head.weight` | lm_head |" in card
    assert card.count("\n| `") == 145


def test_side_files_copied(unsloth_out, fixture_dir):
    _, out = unsloth_out
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (fixture_dir / name).read_bytes()


def test_mtp_bf16_keeps_the_head_unquantized(fixture_dir, tmp_path):
    out = tmp_path / "model"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "-q", "--q-recipe", "uniform", "--q-bits", "4",
                   "--mtp-bf16", "--drop-vision") == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    mtp = {k: v for k, v in q.items() if k.startswith("mtp.")}
    assert len(mtp) == 8 and not any(mtp.values())
    assert q["language_model.lm_head"]["bits"] == 4
    with safe_open(out / "mtp.safetensors", "np") as f:
        assert not any(k.endswith(".scales") for k in f.keys())
