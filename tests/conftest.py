"""Shared test helpers: the bundled fixture, tiny random Qwen3.5 models saved by transformers,
and a float32 transformers reference for logits."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "qwen35-tiny"
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (conftest, llamacpp_tools) importable from subfolders


def pytest_configure(config):
    import os

    import mixquant

    # Under pytest-xdist every worker gets one core: OpenBLAS and torch threads that wait for a
    # core another worker holds cost more than they bring (and decode is latency-bound anyway).
    worker = bool(os.environ.get("PYTEST_XDIST_WORKER"))
    if worker:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when the library loads
    mixquant.enable_cpu_blas()  # before anything imports MLX, as the mixquant command does
    # transformers' CPU Gated DeltaNet crawls on subnormal floats without this.
    import torch

    torch.set_flush_denormal(True)
    torch.set_num_threads(1 if worker else 2)


def tiny_text_config(ratio: int = 2, moe: bool = False, **overrides) -> dict:
    """A tiny Qwen3.5 text config; `ratio` = linear_num_value_heads / linear_num_key_heads."""
    cfg = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=2 * ratio,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        full_attention_interval=2,
        layer_types=["linear_attention", "full_attention"] * 2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if moe:
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    cfg.update(overrides)
    return cfg


def randomize_(model, seed: int) -> None:
    """Give every parameter non-trivial values (transformers initialises norms to 0 and A_log to
    a fixed pattern, which would hide a missing +1 shift or a permutation)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(1, 16, generator=g)))
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 / p.shape[-1] ** 0.5))


def save_tiny_qwen35(path: Path, ratio: int = 2, moe: bool = False, vlm: bool = False, seed: int = 0,
                     dtype: str = "float32", **overrides) -> Path:
    import torch
    import transformers as tf

    text = tiny_text_config(ratio, moe, **overrides)
    if vlm:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=64, patch_size=16)
        cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
        config_cls = tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config
        config = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False)
    else:
        cls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
        config = (tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig)(**text)
    torch.manual_seed(seed)
    model = cls(config)
    randomize_(model, seed)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURE / name, path / name)
    return path


def reference_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' logits for one sequence, computed in float64 so that the reference's own
    rounding (2e-4 in float32 on some tiny MoE models) does not eat the 1e-4 budget."""
    import torch
    import transformers as tf

    config = json.loads((Path(path) / "config.json").read_text())
    cls = tf.AutoModelForImageTextToText if "vision_config" in config else tf.AutoModelForCausalLM
    text = config.get("text_config", config)
    moe = text.get("num_experts") or text.get("num_local_experts")
    extra = {"experts_implementation": "eager"} if moe else {}  # grouped_mm has no float64
    model = cls.from_pretrained(path, dtype=torch.float64, **extra)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids[None])).logits[0].numpy()


def mlx_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    out = model(mx.array(ids[None]))
    return np.array(out.astype(mx.float32))[0]


def token_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n)


def run_cli(*argv) -> int:
    from mixquant.cli import main

    return main([str(a) for a in argv])


def run_cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting a one-line error and exit code 2; returns that line."""
    capsys.readouterr()
    try:
        code = run_cli(*argv)
    except SystemExit as e:  # argparse's own exit
        code = e.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("mixquant: error: "), captured.err
    return lines[0]


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random Qwen3.5 checkpoints as transformers saves them, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    specs = {
        "text-r1": dict(ratio=1),
        "text-r2": dict(ratio=2),
        "text-r3": dict(ratio=3),
        "vlm-r2": dict(ratio=2, vlm=True),
        "moe-text": dict(ratio=2, moe=True),
        "moe-vlm": dict(ratio=3, moe=True, vlm=True),
    }
    return {name: save_tiny_qwen35(root / name, seed=i, **kw) for i, (name, kw) in enumerate(specs.items())}


def assert_loads_as_it_is(out: Path) -> None:
    """mlx_lm.load reads a uniform 3-bit quant of the fixture as it is (no side files); its quantized
    forward agrees with the same weights dequantized."""
    import json

    import mlx.core as mx
    import numpy as np

    from mixquant.loading import load

    ids = mx.array(np.random.default_rng(0).integers(0, 8000, size=(1, 48)))
    native = np.array(load(out, dtype="float32", dequantize=False).model(ids))  # MLX's quantized kernels
    dequantized = np.array(load(out, dequantize=True).model(ids))
    assert np.abs(native - dequantized).max() < 1e-3
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["language_model.model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 3, "mode": "affine"}
