"""`--q-recipe auto`: sensitivities, a byte budget met within 1%, constraints, MoE expert stacks as
units, and a measured run that resumes without recomputing what it finished."""

import json

import numpy as np
import pytest

from conftest import run_cli, save_tiny_qwen35


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return save_tiny_qwen35(tmp_path_factory.mktemp("auto") / "moe", ratio=2, moe=True, vocab_size=8192, seed=31)


@pytest.fixture(scope="module")
def proxy_file(tiny_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("sens") / "proxy.json"
    assert run_cli("sensitivity", "-m", tiny_moe, "-o", out, "--windows", 2, "--ctx", 64) == 0
    return out


def _plan(capsys, *argv):
    capsys.readouterr()
    assert run_cli("plan", *argv, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_sensitivity_file_covers_every_unit_and_option(tiny_moe, proxy_file, capsys):
    data = json.loads(proxy_file.read_text())
    plan = _plan(capsys, "-i", tiny_moe, "-q", "--q-recipe", "uniform", "--q-group-size", "32")
    quantizable = [t["name"] for t in plan["tensors"] if t["bits"] and t["scope"] == "model"]
    assert sorted(data["units"]) == sorted(quantizable)
    stack = data["units"]["language_model.model.layers.0.mlp.switch_mlp.down_proj.weight"]
    assert stack["role"] == "moe_down_exps" and stack["shape"] == [4, 64, 32]
    assert set(stack["options"]) == {"2b32", "3b32", "4b32", "5b32", "6b32", "8b32", "keep"}
    for unit in data["units"].values():
        opts = unit["options"]
        coarse = [opts[k] for k in ("2b32", "3b32", "4b32", "5b32", "6b32", "8b32") if k in opts]
        assert all(a >= b for a, b in zip(coarse, coarse[1:])), unit  # fewer bits never cost less
        assert all(v >= 0 for v in opts.values())


def test_the_default_proxy_prices_on_the_models_own_text(tiny_moe, proxy_file):
    """Under the default calibration the proxy's windows are text the model samples from its start
    token (calibration `self`), the same for the same model and request."""
    from mixquant.calib import data
    from mixquant.calib.sensitivity import windows_hash
    from mixquant.loading import load_tokenizer

    info = json.loads(proxy_file.read_text())["calib"]
    assert (info["spec"], info["text"], info["windows"], info["ctx"]) == ("auto", "self", 2, 64)
    data._SAMPLED.clear()
    own = data.calibration_set(data.SELF, None, load_tokenizer(tiny_moe), 2 * 64, 64, 8192, source=tiny_moe)
    assert windows_hash(own[data.spread(len(own), 2)]) == info["tokens_hash"]
    start = load_tokenizer(tiny_moe).bos_token_id or load_tokenizer(tiny_moe).eos_token_id
    assert (own[:, 0] == start).all()


@pytest.mark.parametrize("target", [3.0, 4.25, 6.0])
def test_size_within_one_percent_of_the_target(tiny_moe, proxy_file, capsys, target):
    plan = _plan(capsys, "-i", tiny_moe, "--q-recipe", "auto", "--target-bpw", target, "--sensitivity", proxy_file)
    s = plan["summary"]
    assert abs(s["bits_per_weight"] - target) <= 0.01 * target
    assert s["allocation"]["target"] == f"{target:.2f} bpw" and s["allocation"]["predicted_kld"] > 0
    rows = {t["name"]: t for t in plan["tensors"]}
    for t in rows.values():
        if t["role"] in ("moe_router", "shexp_router"):
            assert t["bits"] in (8, None), t
    stacks = [t for t in rows.values() if t["role"] == "moe_down_exps"]
    assert len(stacks) == 4  # one unit per layer's expert stack, each with its own setting


def test_auto_quant_loads_in_mlx_lm_and_predicts_its_kld(tiny_moe, proxy_file, tmp_path):
    from mlx_lm import load

    out = tmp_path / "auto"
    assert run_cli("convert", "-i", tiny_moe, "-o", out, "--q-recipe", "auto", "--target-bpw", 4.5,
                   "--sensitivity", proxy_file) == 0
    model, _ = load(str(out))
    import mlx.core as mx

    logits = model(mx.array([[1, 2, 3, 4]]))
    assert np.isfinite(np.array(logits.astype(mx.float32))).all()
    card = (out / "README.md").read_text()
    assert "| allocation | target 4.50 bpw" in card and "predicted mean KL divergence" in card


def test_constraints_from_a_rules_file(tiny_moe, proxy_file, tmp_path, capsys):
    rules = tmp_path / "r.toml"
    rules.write_text('recipe = "auto"\n[[rules]]\nrole = "ffn_down"\nmin_bits = 6\n'
                     '[[rules]]\nrole = "shexp_down"\nmin_bits = 6\n'
                     '[[rules]]\nname = "*.embed_tokens.weight"\nbits = 3\ngroup_size = 32\n')
    plan = _plan(capsys, "-i", tiny_moe, "--q-recipe", rules, "--target-bpw", 5.0, "--sensitivity", proxy_file)
    for t in plan["tensors"]:
        if t["role"] == "shexp_down":
            assert t["bits"] is None or t["bits"] >= 6
        if t["role"] == "embed":
            assert (t["bits"], t["group_size"]) == (3, 32)


def test_target_below_what_the_constraints_allow(tiny_moe, proxy_file, capsys):
    capsys.readouterr()
    assert run_cli("plan", "-i", tiny_moe, "--q-recipe", "auto", "--target-bpw", 1.5, "--sensitivity",
                   proxy_file) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the target is below what the constraints allow" in err[0]


def test_a_sensitivity_of_another_model_is_an_error(fixture_dir, proxy_file, capsys):
    capsys.readouterr()
    assert run_cli("plan", "-i", fixture_dir, "--q-recipe", "auto", "--target-bpw", 4, "--sensitivity",
                   proxy_file) == 2
    assert "it was measured on another model" in capsys.readouterr().err


def test_an_interrupted_measured_run_resumes(tiny_moe, tmp_path, monkeypatch):
    """Kill the run after three units; the second run measures only the others (one save each, and
    a last one) and keeps the three as they were saved."""
    import mixquant.quant.sensitivity as sens

    out = tmp_path / "measured.json"
    saves = []
    real_save = sens.Sensitivity.save

    def counting_save(self, path, stop_after=None):
        real_save(self, path)
        saves.append(len(self.units))
        if len(saves) == 3 and dying["on"]:
            raise KeyboardInterrupt

    dying = {"on": True}
    monkeypatch.setattr(sens.Sensitivity, "save", counting_save)
    argv = ("sensitivity", "-m", tiny_moe, "-o", out, "--mode", "measured", "--windows", 1, "--ctx", 32)
    assert run_cli(*argv) == 130
    first = json.loads(out.read_text())["units"]
    assert len(first) == 3
    saves.clear()
    dying["on"] = False
    assert run_cli(*argv) == 0
    second = json.loads(out.read_text())["units"]
    assert saves == list(range(4, len(second) + 1)) + [len(second)]  # one new unit per save, then the last
    for name, entry in first.items():
        assert second[name]["options"] == entry["options"]


def test_one_flag_picks_auto_and_the_default_preset_and_plan_shows_it(tiny_moe, proxy_file, capsys):
    plan = _plan(capsys, "-i", tiny_moe, "--target-bpw", 4.25, "--sensitivity", proxy_file)
    assert plan["summary"]["recipe"] == "auto-4.25bpw" and plan["preset"] == "balanced"
    assert plan["preset_note"].startswith("preset balanced: allocation by the proxy sensitivity, GPTQ, on 16384 "
                                          "calibration tokens (auto); about ")
    capsys.readouterr()
    assert run_cli("plan", "-i", tiny_moe, "--target-bpw", 4.25, "--quality", "best", "--sensitivity",
                   proxy_file) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith(
        "preset best: allocation by the proxy sensitivity, GPTQ, then 256 steps of distillation, on 16384 ")
    assert _plan(capsys, "-i", tiny_moe, "--q-recipe", "auto", "--target-bpw", 4.25, "--q-rounding", "nearest",
                 "--sensitivity", proxy_file)["preset"] is None  # explicit steps: no preset


def test_the_chosen_preset_is_in_the_model_card(tiny_moe, proxy_file, tmp_path):
    from mixquant.convert import ConvertOptions, convert
    from mixquant.quant.auto import Target
    from mixquant.quant.recipe import auto_base

    out = tmp_path / "fast"
    assert run_cli("convert", "-i", tiny_moe, "-o", out, "--target-bpw", 4.5, "--quality", "fast",
                   "--sensitivity", proxy_file) == 0
    card = (out / "README.md").read_text()
    assert "| preset | `--quality fast`: allocation by the proxy sensitivity, rounding to nearest |" in card
    same = tmp_path / "flags"  # the preset is the flags it names: the same files
    convert(tiny_moe, same, ConvertOptions(recipe=auto_base(), target=Target(bpw=4.5), sensitivity=proxy_file,
                                           progress=False))
    for f in ("model.safetensors", "config.json"):
        assert (out / f).read_bytes() == (same / f).read_bytes()


def test_a_proxy_for_gptq_prices_each_linear_after_it(tiny_moe, proxy_file, tmp_path):
    """Same windows, priced after GPTQ: each linear's quantized options scaled by one factor below 1
    (its Hessian's), the embedding and expert stacks (rounded otherwise) and `keep` as they were."""
    out = tmp_path / "gptq.json"
    assert run_cli("sensitivity", "-m", tiny_moe, "-o", out, "--windows", 2, "--ctx", 64, "--rounding", "gptq") == 0
    near, after = (json.loads(p.read_text()) for p in (proxy_file, out))
    assert near["calib"]["tokens_hash"] == after["calib"]["tokens_hash"]
    assert (near["calib"]["priced_after"], after["calib"]["priced_after"]) == ("nearest", "gptq")
    scaled = 0
    for name, unit in near["units"].items():
        ratios = {k: after["units"][name]["options"][k] / v for k, v in unit["options"].items() if v > 0}
        assert ratios.get("keep", 1.0) == pytest.approx(1.0, rel=1e-9)
        quantized = [r for k, r in ratios.items() if k != "keep"]
        assert max(quantized) == pytest.approx(min(quantized), rel=1e-9)
        if unit["role"] in ("embed",) or unit["role"].startswith("moe_") and "exps" in unit["role"]:
            assert quantized[0] == pytest.approx(1.0, rel=1e-9), name
        else:
            assert quantized[0] < 1.0, name
            scaled += 1
    assert scaled >= 8
