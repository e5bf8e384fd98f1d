"""Qwen3.5, dense and MoE: hybrid Gated DeltaNet + gated full attention.

Source: a Hugging Face checkpoint, text-only (`model.layers.*`) or VLM-wrapped
(`model.language_model.*`, `model.visual.*`, `mtp.*`), or a llama.cpp GGUF (`qwen35`,
`qwen35moe`). Output: the names and layout of mlx-lm's `qwen3_5` / `qwen3_5_moe` model, already
sanitized (norms shifted, conv1d transposed, experts stacked), so mlx-lm's own sanitize leaves the
weights alone.

Every tensor the model has is listed below from the config's geometry; a source tensor that is
missing, extra, or of another shape is an error naming it.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import numpy as np

from mixquant.arch.gguf_layout import (EXPERTS, EXPERTS_GATE_UP, GGUFSpec, Layout, field, tile_v, untile_v)
from mixquant.arch.roles import Role
from mixquant.arch.tensors import (CONV1D_TO_MLX, NORM_SHIFT, SCOPE_MODEL, SCOPE_MTP, SCOPE_VISION, ArchPlan, Attention,
                                   Claims, Family, LogicalTensor, NormGroup, Part, Structure, rows_to_tensors, stacked_experts)
from mixquant.errors import MixquantError

MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
TEXT_ROOT = {True: "model.language_model.", False: "model."}  # keyed by "VLM-wrapped"
VISION_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
OUT_ROOT = "language_model.model."
OUT_LM_HEAD = "language_model.lm_head.weight"
# how each role's tensor is stored in the source beyond its plain values
TRANSFORM = {Role.FINAL_NORM: NORM_SHIFT, Role.INPUT_NORM: NORM_SHIFT, Role.POST_ATTN_NORM: NORM_SHIFT,
             Role.ATTN_Q_NORM: NORM_SHIFT, Role.ATTN_K_NORM: NORM_SHIFT, Role.MTP_NORM: NORM_SHIFT,
             Role.SSM_CONV1D: CONV1D_TO_MLX}  # linear_attn.norm's weight is used as it is: no +1


@dataclass(frozen=True)
class Geometry:
    hidden: int
    vocab: int
    n_layers: int
    full_attention_interval: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attention_bias: bool
    lin_k_heads: int
    lin_v_heads: int
    lin_k_dim: int
    lin_v_dim: int
    conv_kernel: int
    intermediate: int
    n_experts: int
    moe_intermediate: int
    shared_intermediate: int
    tie_embeddings: bool
    mtp_layers: int

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_full_attention(self, layer: int) -> bool:
        # mlx-lm builds the layer pattern from full_attention_interval alone.
        return (layer + 1) % self.full_attention_interval == 0


def text_config(config: dict) -> dict:
    """The text model's config, whether wrapped (VLM) or not."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def geometry(config: dict, where: str) -> Geometry:
    tc = text_config(config)

    def need(key):
        if key not in tc:
            raise MixquantError(f"{where}: text config lacks {key!r}")
        value = tc[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MixquantError(f"{where}: {key!r} must be a non-negative integer, got {value!r}")
        return value

    n_experts = int(tc.get("num_experts") or 0)
    hidden = need("hidden_size")
    n_heads = need("num_attention_heads")
    n_layers = need("num_hidden_layers")
    if n_heads == 0:
        raise MixquantError(f"{where}: 'num_attention_heads' must be positive")
    g = Geometry(
        hidden=hidden,
        vocab=need("vocab_size"),
        n_layers=n_layers,
        full_attention_interval=need("full_attention_interval") if "full_attention_interval" in tc
        else _interval_from_layer_types(tc.get("layer_types"), n_layers, where),
        n_heads=n_heads,
        n_kv_heads=need("num_key_value_heads"),
        head_dim=int(tc.get("head_dim") or hidden // n_heads),
        attention_bias=bool(tc.get("attention_bias", False)),
        lin_k_heads=need("linear_num_key_heads"),
        lin_v_heads=need("linear_num_value_heads"),
        lin_k_dim=need("linear_key_head_dim"),
        lin_v_dim=need("linear_value_head_dim"),
        conv_kernel=need("linear_conv_kernel_dim"),
        intermediate=0 if n_experts else need("intermediate_size"),
        n_experts=n_experts,
        moe_intermediate=need("moe_intermediate_size") if n_experts else 0,
        shared_intermediate=need("shared_expert_intermediate_size") if n_experts else 0,
        tie_embeddings=bool(tc.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        mtp_layers=int(tc.get("mtp_num_hidden_layers") or 0),
    )
    if g.full_attention_interval < 1 or g.lin_k_heads < 1:
        raise MixquantError(f"{where}: full_attention_interval and linear_num_key_heads must be positive")
    if g.lin_v_heads % g.lin_k_heads:
        raise MixquantError(
            f"{where}: linear_num_value_heads {g.lin_v_heads} is not a multiple of linear_num_key_heads {g.lin_k_heads}"
        )
    if tc.get("attn_output_gate", True) is not True:
        raise MixquantError(f"{where}: attn_output_gate false is not supported (mlx-lm's qwen3_5 always gates)")
    layer_types = tc.get("layer_types")
    if layer_types is not None:
        expected = ["full_attention" if g.is_full_attention(i) else "linear_attention" for i in range(g.n_layers)]
        if list(layer_types) != expected:
            raise MixquantError(
                f"{where}: layer_types do not follow full_attention_interval {g.full_attention_interval}, "
                "which is all mlx-lm reads"
            )
    if g.is_moe and tc.get("mlp_only_layers"):
        raise MixquantError(f"{where}: mlp_only_layers is not supported (mlx-lm makes every layer MoE)")
    return g


def _interval_from_layer_types(layer_types, n_layers: int, where: str) -> int:
    """transformers >= 5.2 saves `layer_types` alone; mlx-lm reads only `full_attention_interval`, so a
    periodic pattern (every k-th layer full attention) becomes that interval."""
    if layer_types is None:
        raise MixquantError(f"{where}: text config lacks 'full_attention_interval' (and 'layer_types')")
    if not isinstance(layer_types, list) or len(layer_types) != n_layers:
        raise MixquantError(f"{where}: layer_types must list {n_layers} layer types")
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    if not full:
        raise MixquantError(f"{where}: layer_types has no full_attention layer, which mlx-lm's qwen3_5 cannot express")
    interval = full[0] + 1
    expected = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    if layer_types != expected:
        raise MixquantError(f"{where}: layer_types are not periodic (every k-th layer full attention), which is all "
                            "mlx-lm's qwen3_5 can express")
    return interval


# --- the table: (name relative to a layer, role, shape) for each block kind -----------------

def _attention_block(g: Geometry):
    q_out, kv_out = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    rows = [
        ("self_attn.q_proj.weight", Role.ATTN_Q, (2 * q_out, g.hidden)),  # queries and their output gate
        ("self_attn.k_proj.weight", Role.ATTN_K, (kv_out, g.hidden)),
        ("self_attn.v_proj.weight", Role.ATTN_V, (kv_out, g.hidden)),
        ("self_attn.o_proj.weight", Role.ATTN_O, (g.hidden, q_out)),
        ("self_attn.q_norm.weight", Role.ATTN_Q_NORM, (g.head_dim,)),
        ("self_attn.k_norm.weight", Role.ATTN_K_NORM, (g.head_dim,)),
    ]
    if g.attention_bias:
        rows += [
            ("self_attn.q_proj.bias", Role.ATTN_BIAS, (2 * q_out,)),
            ("self_attn.k_proj.bias", Role.ATTN_BIAS, (kv_out,)),
            ("self_attn.v_proj.bias", Role.ATTN_BIAS, (kv_out,)),
            ("self_attn.o_proj.bias", Role.ATTN_BIAS, (g.hidden,)),
        ]
    return rows


def _linear_attention_block(g: Geometry):
    key_dim, value_dim = g.lin_k_heads * g.lin_k_dim, g.lin_v_heads * g.lin_v_dim
    conv_dim = 2 * key_dim + value_dim
    return [
        ("linear_attn.in_proj_qkv.weight", Role.SSM_IN_QKV, (conv_dim, g.hidden)),
        ("linear_attn.in_proj_z.weight", Role.SSM_IN_Z, (value_dim, g.hidden)),
        ("linear_attn.in_proj_a.weight", Role.SSM_IN_A, (g.lin_v_heads, g.hidden)),
        ("linear_attn.in_proj_b.weight", Role.SSM_IN_B, (g.lin_v_heads, g.hidden)),
        ("linear_attn.conv1d.weight", Role.SSM_CONV1D, (conv_dim, 1, g.conv_kernel)),
        ("linear_attn.dt_bias", Role.SSM_DT_BIAS, (g.lin_v_heads,)),
        ("linear_attn.A_log", Role.SSM_A_LOG, (g.lin_v_heads,)),
        ("linear_attn.norm.weight", Role.SSM_NORM, (g.lin_v_dim,)),
        ("linear_attn.out_proj.weight", Role.SSM_OUT, (g.hidden, value_dim)),
    ]


def _norms_block(g: Geometry):
    return [
        ("input_layernorm.weight", Role.INPUT_NORM, (g.hidden,)),
        ("post_attention_layernorm.weight", Role.POST_ATTN_NORM, (g.hidden,)),
    ]


def _dense_mlp_block(g: Geometry):
    return [
        ("mlp.gate_proj.weight", Role.FFN_GATE, (g.intermediate, g.hidden)),
        ("mlp.up_proj.weight", Role.FFN_UP, (g.intermediate, g.hidden)),
        ("mlp.down_proj.weight", Role.FFN_DOWN, (g.hidden, g.intermediate)),
    ]


def _moe_dense_part_block(g: Geometry):
    return [
        ("mlp.gate.weight", Role.MOE_ROUTER, (g.n_experts, g.hidden)),
        ("mlp.shared_expert.gate_proj.weight", Role.SHEXP_GATE, (g.shared_intermediate, g.hidden)),
        ("mlp.shared_expert.up_proj.weight", Role.SHEXP_UP, (g.shared_intermediate, g.hidden)),
        ("mlp.shared_expert.down_proj.weight", Role.SHEXP_DOWN, (g.hidden, g.shared_intermediate)),
        ("mlp.shared_expert_gate.weight", Role.SHEXP_ROUTER, (1, g.hidden)),
    ]


# (projection, role, per-expert shape)
def _expert_projections(g: Geometry):
    return [
        ("gate_proj", Role.MOE_GATE_EXPS, (g.moe_intermediate, g.hidden)),
        ("up_proj", Role.MOE_UP_EXPS, (g.moe_intermediate, g.hidden)),
        ("down_proj", Role.MOE_DOWN_EXPS, (g.hidden, g.moe_intermediate)),
    ]


def _mtp_head_block(g: Geometry):
    return [
        ("fc.weight", Role.MTP_FC, (g.hidden, 2 * g.hidden)),
        ("pre_fc_norm_embedding.weight", Role.MTP_NORM, (g.hidden,)),
        ("pre_fc_norm_hidden.weight", Role.MTP_NORM, (g.hidden,)),
        ("norm.weight", Role.MTP_NORM, (g.hidden,)),
    ]


# --- building the plan ------------------------------------------------------------------------

def _decoder_layer(claims, g: Geometry, src_prefix, out_prefix, scope, layer, full_attention):
    rows = _norms_block(g)
    rows += _attention_block(g) if full_attention else _linear_attention_block(g)
    rows += _moe_dense_part_block(g) if g.is_moe else _dense_mlp_block(g)
    tensors = rows_to_tensors(claims, rows, src_prefix, out_prefix, scope, layer, TRANSFORM)
    if g.is_moe:
        tensors += stacked_experts(claims, g.n_experts, _expert_projections(g), src_prefix, out_prefix, scope, layer)
    return tensors


def build(source, keep_vision: bool = True, keep_mtp: bool = True) -> ArchPlan:
    config = source.config
    g = geometry(config, source.config_path)
    names = source.tensors.keys()
    vlm = any(n.startswith(TEXT_ROOT[True]) for n in names)
    root = TEXT_ROOT[vlm]
    claims = Claims(source)

    tensors = rows_to_tensors(claims, [("embed_tokens.weight", Role.EMBED, (g.vocab, g.hidden))], root, OUT_ROOT,
                              SCOPE_MODEL, transform=TRANSFORM)
    for i in range(g.n_layers):
        tensors += _decoder_layer(
            claims, g, f"{root}layers.{i}.", f"{OUT_ROOT}layers.{i}.", SCOPE_MODEL, i, g.is_full_attention(i)
        )
    tensors += rows_to_tensors(claims, [("norm.weight", Role.FINAL_NORM, (g.hidden,))], root, OUT_ROOT, SCOPE_MODEL,
                               transform=TRANSFORM)
    dropped = []
    if not g.tie_embeddings:
        part = claims.take("lm_head.weight", (g.vocab, g.hidden))
        tensors.append(LogicalTensor(OUT_LM_HEAD, Role.LM_HEAD, (g.vocab, g.hidden), [part], SCOPE_MODEL))
    elif claims.has("lm_head.weight"):
        claims.claimed.add("lm_head.weight")
        dropped.append("lm_head.weight")  # tied: mlx-lm uses the embedding

    mtp_names = [n for n in names if n.startswith(MTP_PREFIX)]
    if mtp_names and keep_mtp:
        tensors += rows_to_tensors(claims, _mtp_head_block(g), MTP_PREFIX, MTP_PREFIX, SCOPE_MTP, transform=TRANSFORM)
        for i in range(g.mtp_layers):
            prefix = f"{MTP_PREFIX}layers.{i}."
            tensors += _decoder_layer(claims, g, prefix, prefix, SCOPE_MTP, i, full_attention=True)
    elif mtp_names:
        claims.claimed.update(mtp_names)
        dropped += mtp_names

    vision_names = sorted(n for n in names if n.startswith(VISION_PREFIX))
    claims.claimed.update(vision_names)
    if keep_vision:
        for n in vision_names:
            tensors.append(LogicalTensor(n, Role.VISION, tuple(source.tensors[n].shape), [Part(n)], SCOPE_VISION))
    else:
        dropped += vision_names
    claims.check_all_claimed(f"model_type {config.get('model_type')}")
    return ArchPlan(tensors, output_config(config, g, vlm, keep_vision and bool(vision_names)), dropped)


def output_config(config: dict, g: Geometry, vlm: bool, keep_vision: bool) -> dict:
    """The config mlx-lm reads: always the wrapped form (`qwen3_5`/`qwen3_5_moe` + text_config),
    since mlx-lm rejects the text-only model types."""
    model_type = "qwen3_5_moe" if g.is_moe else "qwen3_5"
    if vlm and isinstance(config.get("text_config"), dict):
        out = copy.deepcopy(config)
    else:
        out = {
            "architectures": ["Qwen3_5MoeForConditionalGeneration" if g.is_moe else "Qwen3_5ForConditionalGeneration"],
            "text_config": copy.deepcopy(config),
            "tie_word_embeddings": g.tie_embeddings,
        }
        out["text_config"]["model_type"] = model_type + "_text"
        out["text_config"].pop("architectures", None)
    out["model_type"] = model_type
    out["text_config"].setdefault("tie_word_embeddings", g.tie_embeddings)
    out["text_config"]["full_attention_interval"] = g.full_attention_interval
    if not keep_vision:
        out.pop("vision_config", None)
    return out


# --- llama.cpp's GGUF -------------------------------------------------------------------------
# llama.cpp stores norms with the +1 added, ssm_a = -exp(A_log), conv1d squeezed to (channels,
# kernel), and the linear-attention V heads reordered from grouped-by-K-head to tiled for any ratio
# r = n_v / n_k (rows of the V part of attn_qkv and of conv1d, attn_gate rows, ssm_alpha/ssm_beta
# rows, ssm_a and ssm_dt, ssm_out columns). MTP blocks are the last `nextn_predict_layers` blocks.

GGUF_BLOCK = [
    (r"attn_norm\.weight", "input_layernorm.weight", "norm_unshift"),
    (r"post_attention_norm\.weight", "post_attention_layernorm.weight", "norm_unshift"),
    (r"attn_q\.weight", "self_attn.q_proj.weight", None),
    (r"attn_k\.weight", "self_attn.k_proj.weight", None),
    (r"attn_v\.weight", "self_attn.v_proj.weight", None),
    (r"attn_output\.weight", "self_attn.o_proj.weight", None),
    (r"attn_q_norm\.weight", "self_attn.q_norm.weight", "norm_unshift"),
    (r"attn_k_norm\.weight", "self_attn.k_norm.weight", "norm_unshift"),
    (r"attn_qkv\.weight", "linear_attn.in_proj_qkv.weight", "qkv_v_rows"),
    (r"attn_gate\.weight", "linear_attn.in_proj_z.weight", "v_rows"),
    (r"ssm_alpha\.weight", "linear_attn.in_proj_a.weight", "v_heads"),
    (r"ssm_beta\.weight", "linear_attn.in_proj_b.weight", "v_heads"),
    (r"ssm_conv1d\.weight", "linear_attn.conv1d.weight", "conv1d"),
    (r"ssm_dt\.bias", "linear_attn.dt_bias", "v_heads"),
    (r"ssm_a", "linear_attn.A_log", "ssm_a"),
    (r"ssm_norm\.weight", "linear_attn.norm.weight", None),
    (r"ssm_out\.weight", "linear_attn.out_proj.weight", "v_cols"),
    (r"ffn_gate\.weight", "mlp.gate_proj.weight", None),
    (r"ffn_up\.weight", "mlp.up_proj.weight", None),
    (r"ffn_down\.weight", "mlp.down_proj.weight", None),
    (r"ffn_gate_inp\.weight", "mlp.gate.weight", None),
    (r"ffn_gate_inp_shexp\.weight", "mlp.shared_expert_gate.weight", "as_row"),
    (r"ffn_gate_shexp\.weight", "mlp.shared_expert.gate_proj.weight", None),
    (r"ffn_up_shexp\.weight", "mlp.shared_expert.up_proj.weight", None),
    (r"ffn_down_shexp\.weight", "mlp.shared_expert.down_proj.weight", None),
    (r"ffn_gate_exps\.weight", "mlp.experts.{E}.gate_proj.weight", EXPERTS),
    (r"ffn_up_exps\.weight", "mlp.experts.{E}.up_proj.weight", EXPERTS),
    (r"ffn_down_exps\.weight", "mlp.experts.{E}.down_proj.weight", EXPERTS),
    (r"ffn_gate_up_exps\.weight", "mlp.experts.{E}.{GATE_UP}_proj.weight", EXPERTS_GATE_UP),
]
GGUF_NEXTN = [  # in the MTP blocks, besides the decoder-layer tensors above
    (r"nextn\.eh_proj\.weight", "mtp.fc.weight", None),
    (r"nextn\.enorm\.weight", "mtp.pre_fc_norm_embedding.weight", "norm_unshift"),
    (r"nextn\.hnorm\.weight", "mtp.pre_fc_norm_hidden.weight", "norm_unshift"),
    (r"nextn\.shared_head_norm\.weight", "mtp.norm.weight", "norm_unshift"),
]
GGUF_GLOBAL = [
    (r"token_embd\.weight", "model.embed_tokens.weight", None),
    (r"output_norm\.weight", "model.norm.weight", "norm_unshift"),
    (r"output\.weight", "lm_head.weight", None),
]
GGUF_IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.nextn\.(embed_tokens|shared_head_head)\.weight")


def gguf_layout(op: str | None, config: dict) -> Layout:
    c = text_config(config)
    n_k, dk, dv = c.get("linear_num_key_heads", 1), c.get("linear_key_head_dim", 1), c.get("linear_value_head_dim", 1)
    qk = 2 * n_k * dk

    def v_part_rows(a):
        return np.concatenate([a[:qk], untile_v(a[qk:], 0, n_k, dv)])

    if op is None:
        return Layout()
    if op == "norm_unshift":
        return Layout(whole=lambda a: a - 1.0)
    if op == "as_row":
        return Layout(whole=lambda a: a.reshape(1, -1), shape=lambda s: (1, s[-1]))
    if op == "qkv_v_rows":
        return Layout(rows=v_part_rows)
    if op == "v_rows":
        return Layout(rows=lambda a: untile_v(a, 0, n_k, dv))
    if op == "v_heads":
        def heads(a):
            return untile_v(a.reshape(a.shape[0], -1), 0, n_k, 1).reshape(a.shape)
        return Layout(rows=heads, whole=heads)
    if op == "ssm_a":
        return Layout(whole=lambda a: np.log(-untile_v(a.reshape(-1, 1), 0, n_k, 1).reshape(-1)))
    if op == "conv1d":
        return Layout(rows=v_part_rows, shape=lambda s: (s[0], 1, s[1]), block=lambda b: b[:, None, :])
    if op == "v_cols":
        return Layout(columns=lambda b: untile_v(b, 1, n_k, dv))
    raise AssertionError(op)


def gguf_main_layers(arch: str, meta) -> int:
    return field(meta, f"{arch}.block_count") - field(meta, f"{arch}.nextn_predict_layers", 0)


def gguf_config(arch: str, meta, raw: dict, n_layers: int) -> dict:
    """A Hugging Face text config from llama.cpp's metadata."""
    def f(key, default=None, kind=int):
        return field(meta, f"{arch}.{key}", default, kind)

    if "token_embd.weight" not in raw:
        raise MixquantError(f"{meta.path}: missing tensor token_embd.weight")
    hidden, n_heads, n_v = f("embedding_length"), f("attention.head_count"), f("ssm.time_step_rank")
    if min(hidden, n_heads, n_v) <= 0:
        raise MixquantError(f"{meta.path}: metadata embedding_length, head_count and ssm.time_step_rank must be "
                            "positive")
    head_dim = f("attention.key_length", hidden // n_heads)
    sections = meta.get(f"{arch}.rope.dimension_sections")
    rope = {"rope_type": "default", "rope_theta": f("rope.freq_base", 1e7, float),
            "partial_rotary_factor": f("rope.dimension_count", head_dim // 4) / head_dim, "mrope_interleaved": True}
    if sections is not None:
        rope["mrope_section"] = [int(s) for s in list(sections)[:3]]
    config = {
        "model_type": "qwen3_5_moe_text" if arch == "qwen35moe" else "qwen3_5_text",
        "vocab_size": int(raw["token_embd.weight"].shape[0]),
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": f("attention.head_count_kv", n_heads),
        "rms_norm_eps": f("attention.layer_norm_rms_epsilon", 1e-6, float),
        "max_position_embeddings": f("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in raw,
        "head_dim": head_dim,
        "attn_output_gate": True,
        "full_attention_interval": f("full_attention_interval", 4),
        "linear_conv_kernel_dim": f("ssm.conv_kernel"),
        "linear_key_head_dim": f("ssm.state_size"),
        "linear_num_key_heads": f("ssm.group_count"),
        "linear_num_value_heads": n_v,
        "linear_value_head_dim": f("ssm.inner_size") // n_v,
        "rope_parameters": rope,
        "mtp_num_hidden_layers": f("nextn_predict_layers", 0),
    }
    if arch == "qwen35moe":
        config.update(num_experts=f("expert_count"), num_experts_per_tok=f("expert_used_count"),
                      moe_intermediate_size=f("expert_feed_forward_length"),
                      shared_expert_intermediate_size=f("expert_shared_feed_forward_length", 0))
    else:
        config["intermediate_size"] = f("feed_forward_length")
    return config


def hf_name_of(output_name: str) -> str:
    """The text-only Hugging Face name of an output tensor (any one expert's for a stack)."""
    name = output_name.removeprefix("language_model.")
    return name.replace(".mlp.switch_mlp.", ".mlp.experts.0.")


def imatrix_order(output_name: str, values: np.ndarray, config: dict, inverse: bool = False) -> np.ndarray:
    """ssm_out's input channels are V-head ordered, which llama.cpp tiles: its imatrix rows too."""
    if not output_name.endswith(".linear_attn.out_proj.weight"):
        return values
    c = text_config(config)
    return (untile_v if inverse else tile_v)(values, 1, c["linear_num_key_heads"], c["linear_value_head_dim"])


def gguf_arch_for(config: dict) -> str:
    return "qwen35moe" if text_config(config).get("num_experts") else "qwen35"


GGUF = GGUFSpec(("qwen35", "qwen35moe"), GGUF_GLOBAL, GGUF_BLOCK, GGUF_NEXTN, GGUF_IGNORED, gguf_layout, gguf_config,
                gguf_main_layers, gguf_arch_for, hf_name_of)

# -- the MTP head at run time ----------------------------------------------------------------------
# fc(cat[pre_fc_norm_embedding(embed(tok[t+1])), pre_fc_norm_hidden(h[t])]) through one full-attention
# decoder layer at rope position t+1, then `norm`; h[t] is the main model's last hidden state after its
# final norm. Embedding and lm_head are the main model's. Drafting further, the head's own output takes
# h's place.


@functools.cache
def _mtp_head_class():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.qwen3_5 import DecoderLayer

    class MTPHead(nn.Module):
        def __init__(self, args):
            super().__init__()
            self.pre_fc_norm_embedding = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            self.pre_fc_norm_hidden = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            self.fc = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)
            self.layers = [DecoderLayer(args, args.full_attention_interval - 1)]  # a full-attention layer
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

        def __call__(self, embeddings, hidden, mask, cache):
            x = self.fc(mx.concatenate([self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)],
                                       axis=-1))
            return self.norm(self.layers[0](x, mask, cache))

    return MTPHead


@dataclass
class MTPParts:
    """What speculative decoding runs, all of it mlx-lm's modules but the head: `body(tokens, cache)`
    is the main model up to its final norm, `logits(h)` its lm_head, `embed(tokens)` its embedding."""

    body: object
    logits: object
    embed: object
    head: object


def mtp_parts(model, weights: dict, quantization: dict | None, where: str) -> MTPParts:
    """The MTP head of a loaded mlx-lm qwen3_5 model from its `mtp.*` tensors (quantized where
    `quantization` says so, as the main model's `quantization` block lists them)."""
    import mlx.nn as nn

    text = model.language_model
    args = text.args
    layers = len({k.split(".")[2] for k in weights if k.startswith(MTP_PREFIX + "layers.")})
    if layers != 1:
        raise MixquantError(f"{where}: an MTP head of {layers} layers; only one is supported")
    head = _mtp_head_class()(args)
    if quantization:
        def predicate(path, module):
            spec = quantization.get(MTP_PREFIX + path)
            return spec if isinstance(spec, dict) and hasattr(module, "to_quantized") else False

        nn.quantize(head, class_predicate=predicate)
    own = {k[len(MTP_PREFIX):]: v for k, v in weights.items() if k.startswith(MTP_PREFIX)}
    try:
        head.load_weights(list(own.items()), strict=True)
    except ValueError as e:
        raise MixquantError(f"{where}: its MTP tensors do not fit the model ({e})") from None
    head.eval()
    body = text.model
    logits = body.embed_tokens.as_linear if args.tie_word_embeddings else text.lm_head
    return MTPParts(body, logits, body.embed_tokens, head)


STRUCTURE = Structure(
    norm_groups=(
        NormGroup("attn", Role.INPUT_NORM, (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.SSM_IN_QKV, Role.SSM_IN_Z,
                                    Role.SSM_IN_A, Role.SSM_IN_B)),
        NormGroup("mlp", Role.POST_ATTN_NORM, (Role.FFN_GATE, Role.FFN_UP, Role.MOE_ROUTER, Role.MOE_GATE_EXPS,
                                        Role.MOE_UP_EXPS, Role.SHEXP_GATE, Role.SHEXP_UP, Role.SHEXP_ROUTER)),
    ),
    up_down=((Role.FFN_UP, Role.FFN_DOWN), (Role.SHEXP_UP, Role.SHEXP_DOWN), (Role.MOE_UP_EXPS, Role.MOE_DOWN_EXPS)),
    mlp=(Role.FFN_GATE, Role.FFN_UP, Role.FFN_DOWN),
)

def attention(config: dict, where: str) -> Attention:
    """One layer in full_attention_interval attends to the whole context; the Gated DeltaNet layers
    keep a state of fixed size."""
    g = geometry(config, where)
    full = g.n_layers // g.full_attention_interval
    linear = g.n_layers - full
    conv_dim = 2 * g.lin_k_heads * g.lin_k_dim + g.lin_v_heads * g.lin_v_dim
    return Attention(full, g.n_heads, g.n_kv_heads, g.head_dim, window_elements=linear * (g.conv_kernel - 1) * conv_dim,
                     state_elements=linear * g.lin_v_heads * g.lin_v_dim * g.lin_k_dim)


FAMILY = Family("qwen35", MODEL_TYPES, build, STRUCTURE, GGUF, imatrix_order, mlx_prefix="language_model.",
                excluded_prefixes=(VISION_PREFIX, "vision_tower.", MTP_PREFIX), mtp=mtp_parts,
                text_config=text_config, attention=attention)
