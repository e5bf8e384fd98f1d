"""GGUF -> MLX, on GGUF files written by llama.cpp's own converter and on a real Q4_1 GGUF."""

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

import llamacpp_tools
from conftest import mlx_logits, reference_logits, run_cli, save_tiny_qwen35, token_ids

TINY = {
    "r1": dict(ratio=1),
    "r2": dict(ratio=2),
    "r3": dict(ratio=3),
    "r4": dict(ratio=4),
    "moe": dict(ratio=2, moe=True),
}


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    """Tiny random Qwen3.5 models saved by transformers and converted to f32 GGUF by llama.cpp."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for i, (name, kw) in enumerate(TINY.items()):
        hf = save_tiny_qwen35(root / name, seed=10 + i, vocab_size=8192, **kw)
        out[name] = (hf, llamacpp_tools.hf_to_gguf(hf, root / f"{name}.gguf", "--no-nextn"))
    return out


@pytest.mark.parametrize("name", list(TINY))
def test_llama_cpp_gguf_matches_transformers(tiny_ggufs, tmp_path, name):
    hf, gguf_file = tiny_ggufs[name]
    out = tmp_path / "mlx"
    assert run_cli("convert", "-i", gguf_file, "-o", out, "--dtype", "float32") == 0
    ids = token_ids(64, 8166, seed=3)
    diff = np.abs(mlx_logits(out, ids) - reference_logits(hf, ids)).max()
    assert diff <= 1e-3, f"{name}: max abs logit difference {diff}"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen3_5_moe" if name == "moe" else "qwen3_5")


def test_split_gguf_converts_byte_identical(tiny_ggufs, tmp_path):
    hf, single = tiny_ggufs["r3"]
    split = llamacpp_tools.hf_to_gguf(hf, tmp_path / "split" / "r3.gguf", "--no-nextn", "--split-max-tensors", "20")
    parts = sorted(split.parent.glob("r3-*.gguf"))
    assert [p.name for p in parts] == [f"r3-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert run_cli("convert", "-i", parts[0], "-o", tmp_path / "a", "-q") == 0
    assert run_cli("convert", "-i", single, "-o", tmp_path / "b", "-q") == 0
    for f in sorted(p.name for p in (tmp_path / "b").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_fixture_gguf_with_mtp_equals_direct_conversion(fixture_dir, tmp_path):
    """The trained fixture (ratio 4, MTP head) through llama.cpp's GGUF gives our direct conversion's tensors."""
    gguf_file = llamacpp_tools.hf_to_gguf(fixture_dir, tmp_path / "fixture.gguf")
    assert run_cli("convert", "-i", gguf_file, "-o", tmp_path / "via_gguf", "--dtype", "float32") == 0
    assert run_cli("convert", "-i", fixture_dir, "-o", tmp_path / "direct", "--dtype", "float32",
                   "--drop-vision") == 0
    for file in ("model.safetensors", "mtp.safetensors"):
        with safe_open(tmp_path / "via_gguf" / file, "np") as a, safe_open(tmp_path / "direct" / file, "np") as b:
            assert set(a.keys()) == set(b.keys()), file
            for k in b.keys():
                np.testing.assert_allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-6, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def smollm2():
    return llamacpp_tools.smollm2_gguf()


def test_smollm2_q4_1_gguf_alone_becomes_a_runnable_model(smollm2, tmp_path, capsys):
    import torch
    import transformers as tf
    from mlx_lm import generate, load

    out = tmp_path / "smol"
    assert run_cli("convert", "-i", smollm2, "-o", out, "--dtype", "float32") == 0
    assert "already lossy" in capsys.readouterr().err
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True

    model, tokenizer = load(str(out))
    ids = np.array(tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of"))[:32]
    import mlx.core as mx

    ours = np.array(model(mx.array(ids[None]))[0].astype(mx.float32))
    ref_model = tf.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids[None])).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-2

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    reply = generate(model, tokenizer, prompt=prompt, max_tokens=24)
    print(f"\nSmolLM2 (from Q4_1 GGUF) says: {reply!r}")
    assert "Paris" in reply


def test_quantized_gguf_requantizes(smollm2, tmp_path):
    out = tmp_path / "smol4"
    assert run_cli("convert", "-i", smollm2, "-o", out, "-q", "--q-recipe", "uniform", "--q-bits", "4") == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_config_dir_overrides_synthesised_files(tiny_ggufs, tmp_path):
    hf, gguf_file = tiny_ggufs["r2"]
    out = tmp_path / "o"
    assert run_cli("convert", "-i", gguf_file, "-o", out, "--config-dir", hf) == 0
    assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_size"] == 64


# --- bad input ---------------------------------------------------------------------------------

def _expect(capsys, tmp_path, src, *fragments):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli("convert", "-i", src, "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixquant: error:"), err
    for f in fragments:
        assert f in err[0], err[0]
    assert not out.exists()


def test_not_a_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00" * 64)
    _expect(capsys, tmp_path, bad, str(bad), "not a GGUF file")


def test_wrong_version(tiny_ggufs, tmp_path, capsys):
    bad = tmp_path / "v9.gguf"
    data = bytearray(tiny_ggufs["r1"][1].read_bytes())
    data[4:8] = struct.pack("<I", 9)
    bad.write_bytes(bytes(data))
    _expect(capsys, tmp_path, bad, "unsupported GGUF version 9")


def test_truncated(tiny_ggufs, tmp_path, capsys):
    bad = tmp_path / "cut.gguf"
    data = tiny_ggufs["r1"][1].read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    _expect(capsys, tmp_path, bad, str(bad), "truncated or corrupt GGUF")


def test_missing_split_part(tiny_ggufs, tmp_path, capsys):
    hf, _ = tiny_ggufs["r1"]
    split = llamacpp_tools.hf_to_gguf(hf, tmp_path / "s" / "m.gguf", "--no-nextn", "--split-max-tensors", "30")
    parts = sorted(split.parent.glob("m-*.gguf"))
    parts[-1].unlink()
    _expect(capsys, tmp_path, parts[0], f"split GGUF part {parts[-1].name} is missing")


def _small_gguf(path, arch, row_length=None):
    """A one-tensor GGUF written with gguf-py; `row_length` then patches the header's first dimension."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32),
                 raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if row_length is not None:
        data = bytearray(path.read_bytes())
        at = data.index(b"token_embd.weight") + len("token_embd.weight")
        n_dims = struct.unpack_from("<I", data, at)[0]
        assert n_dims == 2 and struct.unpack_from("<Q", data, at + 4)[0] == 64
        struct.pack_into("<Q", data, at + 4, row_length)
        struct.pack_into("<I", data, at + 4 + 16, int(gguf.GGMLQuantizationType.Q8_0))
        path.write_bytes(bytes(data))
    return path


def test_unsupported_architecture(tmp_path, capsys):
    bad = _small_gguf(tmp_path / "bert.gguf", "bert")
    _expect(capsys, tmp_path, bad, "unsupported GGUF architecture 'bert'", "qwen35, qwen35moe, llama")


def test_tensor_size_does_not_match_type(tmp_path, capsys):
    bad = _small_gguf(tmp_path / "short.gguf", "llama", row_length=48)
    _expect(capsys, tmp_path, bad, str(bad), "tensor token_embd.weight rows of 48 values do not fit Q8_0 blocks of 32")


def test_a_split_gguf_converts_one_row_block_at_a_time(tiny_ggufs, tmp_path, monkeypatch):
    """Writing a split GGUF's tiny MoE holds about one row block (plus its encoding and a read buffer)
    at a time: with 16 KiB blocks the peak of Python/numpy and MLX allocations stays under 32 blocks,
    a quarter of the largest tensor in float32 (the embedding, 2 MiB)."""
    import tracemalloc

    import mlx.core as mx

    from mixquant import blocks
    from mixquant.convert import ConvertOptions, _encoder, build_plan
    from mixquant.quant.recipe import uniform
    from mixquant.writer import write_weights

    hf, _ = tiny_ggufs["moe"]
    split = llamacpp_tools.hf_to_gguf(hf, tmp_path / "split" / "moe.gguf", "--no-nextn", "--split-max-tensors", "20")
    parts = sorted(split.parent.glob("moe-*.gguf"))
    assert len(parts) > 1
    source, plan = build_plan(parts[0], ConvertOptions(recipe=uniform(4, 32), progress=False))
    block = 16 * 1024
    monkeypatch.setattr(blocks, "ROW_BLOCK_BYTES", block)
    largest = max(4 * int(np.prod(t.shape)) for t in source.tensors.values())
    total = sum(4 * int(np.prod(t.shape)) for t in source.tensors.values())
    assert largest >= 64 * block and total >= 2 * largest  # holding a tensor, let alone the model, would show

    encode = _encoder(None, {}, {})
    write_weights(source, plan, tmp_path, encode, progress=False)  # first use: imports, caches, file handles
    out = tmp_path / "out"
    out.mkdir()
    mx.clear_cache()
    mx.reset_peak_memory()
    held = mx.get_active_memory()  # arrays other tests of this worker keep (a session's loaded model)
    tracemalloc.start()
    try:
        write_weights(source, plan, out, encode, progress=False)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak = python_peak + mx.get_peak_memory() - held
    assert peak <= 32 * block < largest // 2, (peak, block, largest)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


def _metadata_gguf(path, arch, add):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    add(w)
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_number_stored_as_text_is_refused(tmp_path, capsys):
    bad = _metadata_gguf(tmp_path / "s.gguf", "llama", lambda w: w.add_string("llama.block_count", "1"))
    _expect(capsys, tmp_path, bad, "metadata llama.block_count is not a number ('1')")
    bad = _metadata_gguf(tmp_path / "f.gguf", "llama", lambda w: w.add_float32("llama.block_count", 1.5))
    _expect(capsys, tmp_path, bad, "metadata llama.block_count is not a whole number (1.5)")


def test_a_tokenizer_array_past_any_real_vocabulary_is_refused(tmp_path, capsys):
    n = (1 << 20) + 1
    bad = _metadata_gguf(tmp_path / "v.gguf", "llama", lambda w: (w.add_block_count(1), w.add_token_list(["a"] * n)))
    _expect(capsys, tmp_path, bad, f"tokenizer.ggml.tokens has {n} entries, more than the 1048576")


def test_config_dir_of_another_architecture_is_refused(smollm2, fixture_dir, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli("convert", "-i", smollm2, "-o", out, "--config-dir", fixture_dir) == 2
    assert capsys.readouterr().err.strip() == (
        f"mixquant: error: {fixture_dir}/config.json: model_type 'qwen3_5' is not a llama model, which "
        f"{smollm2.name} (llama) is")
    assert not out.exists()
