"""Qwen3, dense and MoE (`qwen3`, `qwen3_moe`): plain GQA attention with per-head q/k RMSNorm.

Source: a Hugging Face checkpoint (`model.layers.*`, MoE experts per expert or fused) or a
llama.cpp GGUF (`qwen3`, `qwen3moe`; rope is NEOX-style, so llama.cpp leaves q/k rows alone).
Output: mlx-lm's `qwen3` / `qwen3_moe` names, experts stacked into `switch_mlp`. Norms are stored
as plain multipliers, as MLX uses them. mlx-lm's qwen3_moe needs a top-level `rope_theta` and
`num_experts` (transformers 5 writes `rope_parameters` and `num_local_experts`): the output config
carries both.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from mixquant.arch.gguf_layout import EXPERTS, GGUFSpec, Layout, field
from mixquant.arch.roles import Role
from mixquant.arch.tensors import (SCOPE_MODEL, ArchPlan, Attention, Claims, Family, NormGroup, Structure, rows_to_tensors,
                                   stacked_experts)
from mixquant.errors import MixquantError

MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class Geometry:
    hidden: int
    vocab: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    n_experts: int
    moe_intermediate: int
    sparse_step: int
    mlp_only_layers: tuple[int, ...]
    tie_embeddings: bool

    def is_moe(self, layer: int) -> bool:
        # mlx-lm's qwen3_moe places its MoE blocks by exactly this rule
        return self.n_experts > 0 and layer not in self.mlp_only_layers and (layer + 1) % self.sparse_step == 0


def geometry(config: dict, where: str) -> Geometry:
    def need(key, default=None):
        value = config.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MixquantError(f"{where}: config lacks a non-negative integer {key!r}")
        return value

    hidden, n_heads = need("hidden_size"), need("num_attention_heads")
    if n_heads == 0:
        raise MixquantError(f"{where}: 'num_attention_heads' must be positive")
    if config.get("attention_bias"):
        raise MixquantError(f"{where}: attention_bias is not supported (mlx-lm's qwen3 has no biases)")
    if config.get("use_sliding_window"):
        raise MixquantError(f"{where}: use_sliding_window is not supported (mlx-lm's qwen3 attends globally)")
    n_experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    moe = config.get("model_type") == "qwen3_moe"
    if moe and not n_experts:
        raise MixquantError(f"{where}: qwen3_moe config lacks num_experts")
    return Geometry(hidden, need("vocab_size"), need("num_hidden_layers"), n_heads,
                    need("num_key_value_heads", n_heads), need("head_dim", hidden // n_heads),
                    need("intermediate_size"), n_experts if moe else 0,
                    need("moe_intermediate_size") if moe else 0, max(1, need("decoder_sparse_step", 1)),
                    tuple(config.get("mlp_only_layers") or ()), bool(config.get("tie_word_embeddings", False)))


def _layer_rows(g: Geometry, layer: int):
    q, kv = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    rows = [
        ("input_layernorm.weight", Role.INPUT_NORM, (g.hidden,)),
        ("post_attention_layernorm.weight", Role.POST_ATTN_NORM, (g.hidden,)),
        ("self_attn.q_proj.weight", Role.ATTN_Q, (q, g.hidden)),
        ("self_attn.k_proj.weight", Role.ATTN_K, (kv, g.hidden)),
        ("self_attn.v_proj.weight", Role.ATTN_V, (kv, g.hidden)),
        ("self_attn.o_proj.weight", Role.ATTN_O, (g.hidden, q)),
        ("self_attn.q_norm.weight", Role.ATTN_Q_NORM, (g.head_dim,)),
        ("self_attn.k_norm.weight", Role.ATTN_K_NORM, (g.head_dim,)),
    ]
    if g.is_moe(layer):
        return rows + [("mlp.gate.weight", Role.MOE_ROUTER, (g.n_experts, g.hidden))]
    return rows + [
        ("mlp.gate_proj.weight", Role.FFN_GATE, (g.intermediate, g.hidden)),
        ("mlp.up_proj.weight", Role.FFN_UP, (g.intermediate, g.hidden)),
        ("mlp.down_proj.weight", Role.FFN_DOWN, (g.hidden, g.intermediate)),
    ]


def _expert_projections(g: Geometry):
    return [
        ("gate_proj", Role.MOE_GATE_EXPS, (g.moe_intermediate, g.hidden)),
        ("up_proj", Role.MOE_UP_EXPS, (g.moe_intermediate, g.hidden)),
        ("down_proj", Role.MOE_DOWN_EXPS, (g.hidden, g.moe_intermediate)),
    ]


def build(source, keep_vision: bool = True, keep_mtp: bool = True) -> ArchPlan:
    config = source.config
    g = geometry(config, source.config_path)
    claims = Claims(source)
    claims.claimed.update(n for n in source.tensors if n.endswith("rotary_emb.inv_freq"))  # derived, not weights
    tensors = rows_to_tensors(claims, [("embed_tokens.weight", Role.EMBED, (g.vocab, g.hidden))], "model.", "model.",
                              SCOPE_MODEL)
    for i in range(g.n_layers):
        prefix = f"model.layers.{i}."
        tensors += rows_to_tensors(claims, _layer_rows(g, i), prefix, prefix, SCOPE_MODEL, i)
        if g.is_moe(i):
            tensors += stacked_experts(claims, g.n_experts, _expert_projections(g), prefix, prefix, SCOPE_MODEL, i)
    tensors += rows_to_tensors(claims, [("norm.weight", Role.FINAL_NORM, (g.hidden,))], "model.", "model.",
                               SCOPE_MODEL)
    dropped = []
    if not g.tie_embeddings:
        tensors += rows_to_tensors(claims, [("lm_head.weight", Role.LM_HEAD, (g.vocab, g.hidden))], "", "",
                                   SCOPE_MODEL)
    elif claims.has("lm_head.weight"):
        claims.claimed.add("lm_head.weight")
        dropped.append("lm_head.weight")
    claims.check_all_claimed(f"model_type {config.get('model_type')}")
    return ArchPlan(tensors, output_config(config, g), dropped)


def output_config(config: dict, g: Geometry) -> dict:
    out = copy.deepcopy(config)
    rope = out.get("rope_parameters") or {}
    out.setdefault("rope_theta", rope.get("rope_theta", 1e6))
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    out["head_dim"] = g.head_dim
    out.setdefault("max_position_embeddings", 32768)
    if out.get("model_type") == "qwen3_moe":
        out["num_experts"] = g.n_experts
        out.setdefault("decoder_sparse_step", g.sparse_step)
        out.setdefault("mlp_only_layers", list(g.mlp_only_layers))
        out.setdefault("norm_topk_prob", True)
    return out


# --- llama.cpp's GGUF -------------------------------------------------------------------------

GGUF_BLOCK = [
    (r"attn_norm\.weight", "input_layernorm.weight", None),
    (r"ffn_norm\.weight", "post_attention_layernorm.weight", None),
    (r"attn_q\.weight", "self_attn.q_proj.weight", None),
    (r"attn_k\.weight", "self_attn.k_proj.weight", None),
    (r"attn_v\.weight", "self_attn.v_proj.weight", None),
    (r"attn_output\.weight", "self_attn.o_proj.weight", None),
    (r"attn_q_norm\.weight", "self_attn.q_norm.weight", None),
    (r"attn_k_norm\.weight", "self_attn.k_norm.weight", None),
    (r"ffn_gate\.weight", "mlp.gate_proj.weight", None),
    (r"ffn_up\.weight", "mlp.up_proj.weight", None),
    (r"ffn_down\.weight", "mlp.down_proj.weight", None),
    (r"ffn_gate_inp\.weight", "mlp.gate.weight", None),
    (r"ffn_gate_exps\.weight", "mlp.experts.{E}.gate_proj.weight", EXPERTS),
    (r"ffn_up_exps\.weight", "mlp.experts.{E}.up_proj.weight", EXPERTS),
    (r"ffn_down_exps\.weight", "mlp.experts.{E}.down_proj.weight", EXPERTS),
]
GGUF_GLOBAL = [
    (r"token_embd\.weight", "model.embed_tokens.weight", None),
    (r"output_norm\.weight", "model.norm.weight", None),
    (r"output\.weight", "lm_head.weight", None),
]
GGUF_IGNORED = re.compile(r"rope_freqs\.weight")


def gguf_layout(op: str | None, config: dict) -> Layout:
    return Layout()


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
    config = {
        "architectures": ["Qwen3MoeForCausalLM" if arch == "qwen3moe" else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if arch == "qwen3moe" else "qwen3",
        "vocab_size": int(raw["token_embd.weight"].shape[0]),
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": f("attention.head_count_kv", n_heads),
        "head_dim": f("attention.key_length", hidden // n_heads),
        "rms_norm_eps": f("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": f("context_length", 32768),
        "rope_theta": f("rope.freq_base", 1e6, float),
        "tie_word_embeddings": "output.weight" not in raw,
        "intermediate_size": f("feed_forward_length", 0),
        "hidden_act": "silu",
        "attention_bias": False,
    }
    if arch == "qwen3moe":
        config.update(num_experts=f("expert_count"), num_experts_per_tok=f("expert_used_count"),
                      moe_intermediate_size=f("expert_feed_forward_length"), decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True)
    return config


def gguf_arch_for(config: dict) -> str:
    return "qwen3moe" if config.get("model_type") == "qwen3_moe" else "qwen3"


def hf_name_of(output_name: str) -> str:
    return output_name.replace(".mlp.switch_mlp.", ".mlp.experts.0.")


GGUF = GGUFSpec(("qwen3", "qwen3moe"), GGUF_GLOBAL, GGUF_BLOCK, [], GGUF_IGNORED, gguf_layout, gguf_config,
                gguf_main_layers, gguf_arch_for, hf_name_of)

STRUCTURE = Structure(
    norm_groups=(NormGroup("attn", Role.INPUT_NORM, (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V)),
                 NormGroup("mlp", Role.POST_ATTN_NORM, (Role.FFN_GATE, Role.FFN_UP, Role.MOE_ROUTER,
                                                        Role.MOE_GATE_EXPS, Role.MOE_UP_EXPS))),
    up_down=((Role.FFN_UP, Role.FFN_DOWN), (Role.MOE_UP_EXPS, Role.MOE_DOWN_EXPS)),
    mlp=(Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN),
)

def attention(config: dict, where: str) -> Attention:
    g = geometry(config, where)
    return Attention(g.n_layers, g.n_heads, g.n_kv_heads, g.head_dim)


FAMILY = Family("qwen3", MODEL_TYPES, build, STRUCTURE, GGUF, attention=attention)
