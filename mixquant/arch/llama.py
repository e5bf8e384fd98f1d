"""Llama (SmolLM2 and friends): the HF layout, which is also mlx-lm's `llama` layout.

Only the config needs care: mlx-lm's llama reads a top-level `rope_theta` and silently ignores a
transformers-5 `rope_parameters`, so the output config always carries it at the top level.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from mixquant.arch.tensors import ArchPlan, LogicalTensor, Part, Role
from mixquant.errors import MixquantError

ROLES = {
    r.name: r
    for r in (
        Role("embed", "embedding"),
        Role("lm_head", "linear"),
        Role("final_norm", "norm"),
        Role("input_norm", "norm"),
        Role("post_attn_norm", "norm"),
        Role("attn_q", "linear"),
        Role("attn_k", "linear"),
        Role("attn_v", "linear"),
        Role("attn_o", "linear"),
        Role("ffn_gate", "linear"),
        Role("ffn_up", "linear"),
        Role("ffn_down", "linear"),
    )
}


@dataclass(frozen=True)
class Geometry:
    hidden: int
    vocab: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    tie_embeddings: bool


def geometry(config: dict, where: str) -> Geometry:
    def need(key):
        if not isinstance(config.get(key), int):
            raise MixquantError(f"{where}: config lacks integer {key!r}")
        return config[key]

    hidden, n_heads = need("hidden_size"), need("num_attention_heads")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise MixquantError(f"{where}: llama with biases is not supported")
    return Geometry(hidden, need("vocab_size"), need("num_hidden_layers"), n_heads,
                    int(config.get("num_key_value_heads") or n_heads),
                    int(config.get("head_dim") or hidden // n_heads), need("intermediate_size"),
                    bool(config.get("tie_word_embeddings", False)))


def _layer_rows(g: Geometry):
    q, kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    return [
        ("input_layernorm.weight", "input_norm", (g.hidden,)),
        ("post_attention_layernorm.weight", "post_attn_norm", (g.hidden,)),
        ("self_attn.q_proj.weight", "attn_q", (q, g.hidden)),
        ("self_attn.k_proj.weight", "attn_k", (kv, g.hidden)),
        ("self_attn.v_proj.weight", "attn_v", (kv, g.hidden)),
        ("self_attn.o_proj.weight", "attn_o", (g.hidden, q)),
        ("mlp.gate_proj.weight", "ffn_gate", (g.intermediate, g.hidden)),
        ("mlp.up_proj.weight", "ffn_up", (g.intermediate, g.hidden)),
        ("mlp.down_proj.weight", "ffn_down", (g.hidden, g.intermediate)),
    ]


def build(source, keep_vision: bool = True, keep_mtp: bool = True) -> ArchPlan:
    g = geometry(source.config, source.config_path)
    names = set(source.tensors)
    claimed: set[str] = set()

    def take(name, role, shape, layer=None):
        info = source.tensors.get(name)
        if info is None:
            raise MixquantError(f"{source.where}: missing tensor {name}")
        if tuple(info.shape) != tuple(shape):
            raise MixquantError(f"{source.where}: tensor {name} has shape {list(info.shape)}, "
                                f"the config implies {list(shape)}")
        claimed.add(name)
        return LogicalTensor(name, ROLES[role], tuple(shape), [Part(name)], "model", layer)

    tensors = [take("model.embed_tokens.weight", "embed", (g.vocab, g.hidden))]
    for i in range(g.n_layers):
        tensors += [take(f"model.layers.{i}.{rel}", role, shape, i) for rel, role, shape in _layer_rows(g)]
    tensors.append(take("model.norm.weight", "final_norm", (g.hidden,)))
    dropped = []
    if not g.tie_embeddings:
        tensors.append(take("lm_head.weight", "lm_head", (g.vocab, g.hidden)))
    elif "lm_head.weight" in names:
        claimed.add("lm_head.weight")
        dropped.append("lm_head.weight")
    extra = sorted(n for n in names - claimed if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise MixquantError(f"{source.where}: unexpected tensor {extra[0]} for model_type llama")
    return ArchPlan(tensors, output_config(source.config), dropped)


def output_config(config: dict) -> dict:
    out = copy.deepcopy(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in out:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out
