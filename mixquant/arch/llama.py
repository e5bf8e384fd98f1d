"""Llama (SmolLM2 and friends): the HF layout, which is also mlx-lm's `llama` layout.

The config needs care: mlx-lm's llama reads a top-level `rope_theta` and silently ignores a
transformers-5 `rope_parameters`, so the output config always carries it at the top level. In a
GGUF, llama.cpp permutes the rows of attn_q / attn_k for its rope layout; that is undone here.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from mixquant.arch.gguf_layout import GGUFSpec, Layout, field, rope_unpermute
from mixquant.arch.roles import Role
from mixquant.arch.tensors import (SCOPE_MODEL, ArchPlan, Attention, Claims, Family, NormGroup, Structure,
                                   rows_to_tensors)
from mixquant.errors import MixquantError

MODEL_TYPES = ("llama",)


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
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MixquantError(f"{where}: config lacks a non-negative integer {key!r}")
        return value

    hidden, n_heads = need("hidden_size"), need("num_attention_heads")
    if n_heads == 0:
        raise MixquantError(f"{where}: 'num_attention_heads' must be positive")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise MixquantError(f"{where}: llama with biases is not supported")
    return Geometry(hidden, need("vocab_size"), need("num_hidden_layers"), n_heads,
                    int(config.get("num_key_value_heads") or n_heads),
                    int(config.get("head_dim") or hidden // n_heads), need("intermediate_size"),
                    bool(config.get("tie_word_embeddings", False)))


def _layer_rows(g: Geometry):
    q, kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    return [
        ("input_layernorm.weight", Role.INPUT_NORM, (g.hidden,)),
        ("post_attention_layernorm.weight", Role.POST_ATTN_NORM, (g.hidden,)),
        ("self_attn.q_proj.weight", Role.ATTN_Q, (q, g.hidden)),
        ("self_attn.k_proj.weight", Role.ATTN_K, (kv, g.hidden)),
        ("self_attn.v_proj.weight", Role.ATTN_V, (kv, g.hidden)),
        ("self_attn.o_proj.weight", Role.ATTN_O, (g.hidden, q)),
        ("mlp.gate_proj.weight", Role.FFN_GATE, (g.intermediate, g.hidden)),
        ("mlp.up_proj.weight", Role.FFN_UP, (g.intermediate, g.hidden)),
        ("mlp.down_proj.weight", Role.FFN_DOWN, (g.hidden, g.intermediate)),
    ]


def build(source, keep_vision: bool = True, keep_mtp: bool = True) -> ArchPlan:
    g = geometry(source.config, source.config_path)
    claims = Claims(source)
    claims.claimed.update(n for n in source.tensors if n.endswith("rotary_emb.inv_freq"))  # derived, not weights
    tensors = rows_to_tensors(claims, [("embed_tokens.weight", Role.EMBED, (g.vocab, g.hidden))], "model.", "model.",
                              SCOPE_MODEL)
    for i in range(g.n_layers):
        tensors += rows_to_tensors(claims, _layer_rows(g), f"model.layers.{i}.", f"model.layers.{i}.", SCOPE_MODEL, i)
    tensors += rows_to_tensors(claims, [("norm.weight", Role.FINAL_NORM, (g.hidden,))], "model.", "model.", SCOPE_MODEL)
    dropped = []
    if not g.tie_embeddings:
        tensors += rows_to_tensors(claims, [("lm_head.weight", Role.LM_HEAD, (g.vocab, g.hidden))], "", "", SCOPE_MODEL)
    elif claims.has("lm_head.weight"):
        claims.claimed.add("lm_head.weight")
        dropped.append("lm_head.weight")
    claims.check_all_claimed("model_type llama")
    return ArchPlan(tensors, output_config(source.config), dropped)


def output_config(config: dict) -> dict:
    out = copy.deepcopy(config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in out:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


# --- llama.cpp's GGUF -------------------------------------------------------------------------

GGUF_BLOCK = [
    (r"attn_norm\.weight", "input_layernorm.weight", None),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight", None),
    (r"attn_q\.weight", "self_attn.q_proj.weight", "rope_unpermute_q"),
    (r"attn_k\.weight", "self_attn.k_proj.weight", "rope_unpermute_k"),
    (r"attn_v\.weight", "self_attn.v_proj.weight", None),
    (r"attn_output\.weight", "self_attn.o_proj.weight", None),
    (r"ffn_gate\.weight", "mlp.gate_proj.weight", None),
    (r"ffn_up\.weight", "mlp.up_proj.weight", None),
    (r"ffn_down\.weight", "mlp.down_proj.weight", None),
]
GGUF_GLOBAL = [
    (r"token_embd\.weight", "model.embed_tokens.weight", None),
    (r"output_norm\.weight", "model.norm.weight", None),
    (r"output\.weight", "lm_head.weight", None),
]
GGUF_IGNORED = re.compile(r"rope_freqs\.weight")


def gguf_layout(op: str | None, config: dict) -> Layout:
    if op is None:
        return Layout()
    heads = config["num_attention_heads"] if op == "rope_unpermute_q" else config["num_key_value_heads"]
    return Layout(rows=lambda a: rope_unpermute(a, heads))


def gguf_main_layers(arch: str, meta) -> int:
    return field(meta, f"{arch}.block_count")


def gguf_config(arch: str, meta, raw: dict, n_layers: int) -> dict:
    def f(key, default=None, kind=int):
        return field(meta, f"{arch}.{key}", default, kind)

    if "token_embd.weight" not in raw:
        raise MixquantError(f"{meta.path}: missing tensor token_embd.weight")
    hidden, n_heads = f("embedding_length"), f("attention.head_count")
    if min(hidden, n_heads) <= 0:
        raise MixquantError(f"{meta.path}: metadata embedding_length and head_count must be positive")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(raw["token_embd.weight"].shape[0]),
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": f("attention.head_count_kv", n_heads),
        "rms_norm_eps": f("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": f("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in raw,
        "intermediate_size": f("feed_forward_length"),
        "head_dim": f("attention.key_length", hidden // n_heads),
        "rope_theta": f("rope.freq_base", 10000.0, float),  # top level: mlx-lm's llama reads only this
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }


GGUF = GGUFSpec(("llama",), GGUF_GLOBAL, GGUF_BLOCK, [], GGUF_IGNORED, gguf_layout, gguf_config, gguf_main_layers,
                lambda config: "llama")

STRUCTURE = Structure(
    norm_groups=(NormGroup("attn", Role.INPUT_NORM, (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)),
                 NormGroup("mlp", Role.POST_ATTN_NORM, (Role.FFN_GATE, Role.FFN_UP))),
    up_down=((Role.FFN_UP, Role.FFN_DOWN),),
    mlp=(Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN),
)

def attention(config: dict, where: str) -> Attention:
    g = geometry(config, where)
    return Attention(g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim)


FAMILY = Family("llama", MODEL_TYPES, build, STRUCTURE, GGUF, attention=attention)
