"""Recipes are data: each decision is checked without touching a weight."""

import pytest

from mixquant.arch.roles import Role
from mixquant.arch.tensors import LogicalTensor, Part
from mixquant.errors import MixquantError
from mixquant.quant.recipe import auto_base, recipe_from_options, snap_bits, uniform, unsloth


def tensor(role, name=None, scope="model", shape=(128, 256)):
    return LogicalTensor(name or f"x.{role}.weight", Role(role), shape, [Part("src")], scope)


def bits(recipe, role, **kw):
    return recipe.decide(tensor(role, **kw)).bits


def test_snap_bits():
    assert [snap_bits(b) for b in range(1, 12)] == [2, 2, 3, 4, 5, 6, 8, 8, 8, 8, 8]


@pytest.mark.parametrize(
    "base, expected",
    [
        (2, dict(ffn_gate=2, ffn_down=3, attn_q=4, ssm_in_qkv=4, embed=4, lm_head=5)),
        (3, dict(ffn_gate=3, ffn_down=4, attn_q=5, ssm_in_qkv=5, embed=5, lm_head=6)),
        (4, dict(ffn_gate=4, ffn_down=5, attn_q=6, ssm_in_qkv=6, embed=6, lm_head=8)),
        (5, dict(ffn_gate=5, ffn_down=6, attn_q=8, ssm_in_qkv=8, embed=8, lm_head=8)),
        (6, dict(ffn_gate=6, ffn_down=8, attn_q=8, ssm_in_qkv=8, embed=8, lm_head=8)),
        (8, dict(ffn_gate=8, ffn_down=8, attn_q=8, ssm_in_qkv=8, embed=8, lm_head=8)),
    ],
)
def test_unsloth_table(base, expected):
    r = unsloth(base)
    for role, b in expected.items():
        assert bits(r, role) == b, role
    for role in ("attn_k", "attn_v", "ssm_in_z"):
        assert bits(r, role) == expected["attn_q"]
    assert bits(r, "ffn_up") == bits(r, "moe_gate_exps") == bits(r, "shexp_up") == expected["ffn_gate"]
    assert bits(r, "moe_down_exps") == bits(r, "shexp_down") == expected["ffn_down"]
    assert bits(r, "moe_router") == bits(r, "shexp_router") == 8
    for never in ("attn_o", "ssm_out", "ssm_in_a", "ssm_in_b", "input_norm", "ssm_conv1d", "ssm_a_log", "ssm_dt_bias"):
        assert bits(r, never) is None, never


def test_unsloth_pins_out_proj_to_8bit():
    r = unsloth(3, out_proj_8bit=True)
    assert bits(r, "attn_o") == bits(r, "ssm_out") == 8


def test_builtin_recipes_give_the_mtp_head_attention_bits_and_leave_vision_alone():
    for r, attention in ((uniform(4), 4), (unsloth(3), 5), (unsloth(4), 6)):
        for role in ("mtp_fc", "attn_q", "attn_o", "ffn_gate", "ffn_down"):
            assert bits(r, role, scope="mtp") == attention, (r.name, role)
        assert bits(r, "moe_router", scope="mtp") == 8
        assert bits(r, "mtp_norm", scope="mtp") is None
        assert bits(r, "vision_tower", scope="vision") is None
    for r in (uniform(4, mtp_bits=None), unsloth(3, mtp_bits=None), auto_base(mtp_bf16=True)):
        assert bits(r, "mtp_fc", scope="mtp") is None and bits(r, "attn_q", scope="mtp") is None
    assert bits(auto_base(), "mtp_fc", scope="mtp") == bits(auto_base(), "ffn_down", scope="mtp") == 8


def test_uniform():
    r = uniform(3, 32)
    for role in ("embed", "lm_head", "attn_q", "attn_o", "ssm_out", "ssm_in_a", "ffn_down", "moe_up_exps"):
        assert r.decide(tensor(role)).bits == 3
        assert r.decide(tensor(role)).group_size == 32
    assert bits(r, "moe_router") == 8
    assert bits(r, "final_norm") is None


def test_rules_file_overrides_in_order(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        """
recipe = "unsloth"
bits = 4
[[rules]]
name = "*.layers.0.*"
bits = 8
group_size = 32
[[rules]]
role = "attn_o"
bits = 6
[[rules]]
regex = 'layers\\.0\\.mlp\\.up_proj'
keep = true
[[rules]]
name = "mtp.*"
scope = "mtp"
bits = 4
"""
    )
    r = recipe_from_options(str(path), None, 64)
    d = r.decide(tensor("ffn_gate", "m.layers.0.mlp.gate_proj.weight"))
    assert (d.bits, d.group_size) == (8, 32)
    assert bits(r, "ffn_gate", name="m.layers.1.mlp.gate_proj.weight") == 4
    assert bits(r, "attn_o", name="m.layers.3.self_attn.o_proj.weight") == 6
    assert bits(r, "ffn_up", name="m.layers.0.mlp.up_proj.weight") is None
    assert bits(r, "mtp_fc", name="mtp.fc.weight", scope="mtp") == 4
    assert bits(r, "input_norm", name="m.layers.0.input_layernorm.weight") is None  # never quantizable


def test_rules_file_without_base_quantizes_only_matches(tmp_path):
    path = tmp_path / "only.toml"
    path.write_text('bits = 5\n[[rules]]\nrole = "lm_head"\nbits = 6\n[[rules]]\nroles = ["ffn_down"]\ngroup_size = 128\n')
    r = recipe_from_options(str(path), None, 64)
    assert bits(r, "lm_head") == 6
    assert r.decide(tensor("ffn_down")).bits == 5 and r.decide(tensor("ffn_down")).group_size == 128
    assert bits(r, "attn_q") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("bits = 7\n[[rules]]\nrole='embed'\nbits=4\n", "unsupported bits 7"),
        ("[[rules]]\nrole='embed'\nbits=1\n", "rules[0]: bits: unsupported bits 1"),
        ("[[rules]]\nbits=4\n", "needs one of name (glob), regex or role"),
        ("[[rules]]\nrole='embed'\n", "says neither bits, group_size, keep nor min_bits/max_bits"),
        ("[[rules]]\nregex='('\nbits=4\n", "bad regex"),
        ("[[rules]]\nrole='embed'\nbits=4\nscope='everything'\n", "scope must be one of"),
        ("recipe = 'magic'\n", "unknown base recipe 'magic'"),
        ("colour = 'red'\n", "unknown key 'colour'"),
        ("[[rules]\n", "invalid TOML"),
    ],
)
def test_rules_file_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MixquantError) as e:
        recipe_from_options(str(path), None, 64)
    assert str(path) in str(e.value) and message in str(e.value)


def test_unknown_recipe_name():
    with pytest.raises(MixquantError, match="neither uniform, unsloth, auto nor a .toml"):
        recipe_from_options("fancy", None, 64)


def test_unknown_role_is_an_error(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[[rules]]\nroles = ["ffn_down", "mlp_down"]\nbits = 4\n')
    with pytest.raises(MixquantError, match=r"rules\[0\]: unknown role 'mlp_down' \(known: "):
        recipe_from_options(str(path), None, 64)


def test_a_rule_matching_nothing_is_a_plan_warning(fixture_dir, tmp_path, capsys):
    import json

    from conftest import run_cli

    path = tmp_path / "r.toml"
    path.write_text('recipe = "unsloth"\n[[rules]]\nname = "*.layers.99.*"\nbits = 8\n'
                    '[[rules]]\nrole = "moe_router"\nbits = 8\n[[rules]]\nrole = "ffn_down"\nbits = 6\n')
    assert run_cli("plan", "-i", fixture_dir, "--q-recipe", path, "--json") == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert warnings == [f"{path}: rules[0] matches no quantizable tensor", f"{path}: rules[1] matches no quantizable tensor"]
    assert run_cli("plan", "-i", fixture_dir, "--q-recipe", path) == 0
    assert f"warning: {path}: rules[0] matches no quantizable tensor" in capsys.readouterr().out
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "q", "--q-recipe", path) == 0
    err = capsys.readouterr().err
    assert f"mixquant: warning: {path}: rules[1] matches no quantizable tensor" in err
