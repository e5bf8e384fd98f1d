"""Synthetic Qwen3.5-MoE-shaped checkpoints of any size, for measuring conversion at scale.

    python benchmarks/synthetic.py OUT --gb 20 [--layout per-expert|fused] [--shard-gb 2]

Random bf16 weights with trained-like statistics (rows of each matrix at scales spread over a
decade, a few outlier input channels; norms near their trained values, zero-centred as Qwen3.5
stores them; A_log, dt_bias and conv1d in their usual ranges), written shard by shard with an
index, in the VLM-wrapped layout of the published checkpoints; experts per expert
(`experts.E.gate_proj`) or fused (`experts.gate_up_proj`). The fixture's tokenizer and template.
Geometry: hidden 2048, 64 experts of 512 (top 8) plus a shared expert, 4 layers per full-attention
layer; the number of layers sets the size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
sys.path.insert(0, str(ROOT))


def moe_config(layers: int, experts: int = 64) -> dict:
    text = dict(
        model_type="qwen3_5_moe_text", vocab_size=8192, hidden_size=2048, num_hidden_layers=layers,
        full_attention_interval=4,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        num_experts=experts, num_experts_per_tok=8, moe_intermediate_size=512, shared_expert_intermediate_size=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attn_output_gate=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_section": [11, 11, 10], "mrope_interleaved": True},
    )
    return {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
            "text_config": text, "tie_word_embeddings": False}


def layer_bytes(config: dict) -> int:
    t = config["text_config"]
    h, e, m = t["hidden_size"], t["num_experts"], t["moe_intermediate_size"]
    experts = 3 * e * m * h + 3 * t["shared_expert_intermediate_size"] * h
    attn = (2 * 16 * 128 + 32 * 128) * h * 2  # about the same for either kind of layer
    return 2 * (experts + attn)


def rows_of(config: dict, layout: str) -> list[tuple[str, tuple, str]]:
    """(HF name, shape, kind) of every tensor; kind picks the statistics."""
    from mixquant.arch import qwen35

    g = qwen35.geometry(config, "synthetic")
    root = "model.language_model."
    rows = [(root + "embed_tokens.weight", (g.vocab, g.hidden), "embed")]
    for i in range(g.n_layers):
        block = qwen35._norms_block(g)
        block += qwen35._attention_block(g) if g.is_full_attention(i) else qwen35._linear_attention_block(g)
        block += qwen35._moe_dense_part_block(g)
        rows += [(f"{root}layers.{i}.{rel}", shape, rel) for rel, _, shape in block]
        prefix = f"{root}layers.{i}.mlp.experts."
        if layout == "fused":
            rows += [(prefix + "gate_up_proj", (g.n_experts, 2 * g.moe_intermediate, g.hidden), "experts"),
                     (prefix + "down_proj", (g.n_experts, g.hidden, g.moe_intermediate), "experts")]
        else:
            rows += [(f"{prefix}{e}.{proj}.weight", shape, "experts") for e in range(g.n_experts)
                     for proj, _, shape in qwen35._expert_projections(g)]
    rows.append((root + "norm.weight", (g.hidden,), "norm.weight"))
    rows.append(("lm_head.weight", (g.vocab, g.hidden), "lm_head"))
    return rows


def values(shape: tuple, kind: str, rng) -> np.ndarray:
    """float32 values with trained-like statistics for a tensor of this kind."""
    if kind.endswith("norm.weight") and len(shape) == 1:
        base = 0.0 if "linear_attn.norm" not in kind else 1.0  # Qwen3.5 stores RMSNorm weights zero-centred
        return (base + rng.normal(0.05, 0.1, shape)).astype(np.float32)
    if kind.endswith("A_log"):
        return np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    if kind.endswith("dt_bias"):
        return rng.uniform(-4, 0, shape).astype(np.float32)
    if "conv1d" in kind:
        return rng.normal(0, 0.3, shape).astype(np.float32)
    fan_in = shape[-1]
    w = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
    rows = np.exp(rng.uniform(np.log(0.3), np.log(3.0), shape[:-1] + (1,))).astype(np.float32)
    w *= rows
    outliers = rng.choice(fan_in, size=max(1, fan_in // 256), replace=False)
    w[..., outliers] *= 8.0
    return w.astype(np.float32)


def to_bf16(a: np.ndarray) -> np.ndarray:
    return ((a.view(np.uint32) + 0x8000) >> 16).astype(np.uint16)  # rounded, not truncated


def write(folder: Path, gb: float, layout: str = "per-expert", shard_gb: float = 2.0, experts: int = 64,
          seed: int = 0) -> float:
    """Write the checkpoint; returns its size in GB."""
    from mixquant.io.safetensors import OutSpec, StreamingWriter

    layers = max(4, int(round(gb * 1e9 / layer_bytes(moe_config(4, experts)) / 4)) * 4)
    config = moe_config(layers, experts)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(FIXTURE / name, folder / name)
    rows = rows_of(config, layout)
    shards, size = [[]], 0
    for row in rows:
        nbytes = 2 * int(np.prod(row[1]))
        if shards[-1] and size + nbytes > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = StreamingWriter(folder / name, [OutSpec(n, "BF16", s) for n, s, _ in shard])
        for n, shape, kind in shard:
            if len(shape) == 3:  # an expert stack: one expert at a time
                for _ in range(shape[0]):
                    writer.write(n, to_bf16(values(shape[1:], kind, rng)))
            else:
                for start in range(0, shape[0], max(1, (1 << 24) // int(np.prod(shape[1:])))):
                    count = min(max(1, (1 << 24) // int(np.prod(shape[1:]))), shape[0] - start)
                    writer.write(n, to_bf16(values((count, *shape[1:]), kind, rng)))
            weight_map[n] = name
        writer.close()
        total += (folder / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--gb", type=float, default=5)
    parser.add_argument("--layout", choices=("per-expert", "fused"), default="per-expert")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    args = parser.parse_args()
    print(f"{write(Path(args.out), args.gb, args.layout, args.shard_gb):.2f} GB written to {args.out}")


if __name__ == "__main__":
    main()
