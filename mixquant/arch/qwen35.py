"""Qwen3.5, dense and MoE: hybrid Gated DeltaNet + gated full attention.

Source: a Hugging Face checkpoint, text-only (`model.layers.*`) or VLM-wrapped
(`model.language_model.*`, `model.visual.*`, `mtp.*`). Output: the names and layout of mlx-lm's
`qwen3_5` / `qwen3_5_moe` model, already sanitized (norms shifted, conv1d transposed, experts
stacked), so mlx-lm's own sanitize leaves the weights alone.

Every tensor the model has is listed below from the config's geometry; a source tensor that is
missing, extra, or of another shape is an error naming it.
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
        Role("final_norm", "norm", "norm_shift"),
        Role("input_norm", "norm", "norm_shift"),
        Role("post_attn_norm", "norm", "norm_shift"),
        Role("attn_q", "linear"),
        Role("attn_k", "linear"),
        Role("attn_v", "linear"),
        Role("attn_o", "linear"),
        Role("attn_bias", "param"),
        Role("attn_q_norm", "norm", "norm_shift"),
        Role("attn_k_norm", "norm", "norm_shift"),
        Role("ssm_in_qkv", "linear"),
        Role("ssm_in_z", "linear"),
        Role("ssm_in_a", "linear"),
        Role("ssm_in_b", "linear"),
        Role("ssm_conv1d", "conv", "conv1d_to_mlx"),
        Role("ssm_dt_bias", "param"),
        Role("ssm_a_log", "param", keep_float32=True),
        Role("ssm_norm", "norm"),  # the gated norm's weight is used as it is: no +1
        Role("ssm_out", "linear"),
        Role("ffn_gate", "linear"),
        Role("ffn_up", "linear"),
        Role("ffn_down", "linear"),
        Role("moe_router", "linear"),
        Role("moe_gate_exps", "experts"),
        Role("moe_up_exps", "experts"),
        Role("moe_down_exps", "experts"),
        Role("shexp_gate", "linear"),
        Role("shexp_up", "linear"),
        Role("shexp_down", "linear"),
        Role("shexp_router", "linear"),
        Role("mtp_fc", "linear"),
        Role("mtp_norm", "norm", "norm_shift"),
        Role("vision", "vision"),
    )
}

TEXT_ROOT = {True: "model.language_model.", False: "model."}  # keyed by "VLM-wrapped"
VISION_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
OUT_ROOT = "language_model.model."
OUT_LM_HEAD = "language_model.lm_head.weight"


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
        if not isinstance(value, int) or isinstance(value, bool):
            raise MixquantError(f"{where}: {key!r} must be an integer, got {value!r}")
        return value

    n_experts = int(tc.get("num_experts") or 0)
    hidden = need("hidden_size")
    n_heads = need("num_attention_heads")
    g = Geometry(
        hidden=hidden,
        vocab=need("vocab_size"),
        n_layers=need("num_hidden_layers"),
        full_attention_interval=need("full_attention_interval"),
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


# --- the table: (name relative to a layer, role, shape) for each block kind -----------------

def _attention_block(g: Geometry):
    q_out, kv_out = g.n_heads * g.head_dim, g.n_kv_heads * g.head_dim
    rows = [
        ("self_attn.q_proj.weight", "attn_q", (2 * q_out, g.hidden)),  # queries and their output gate
        ("self_attn.k_proj.weight", "attn_k", (kv_out, g.hidden)),
        ("self_attn.v_proj.weight", "attn_v", (kv_out, g.hidden)),
        ("self_attn.o_proj.weight", "attn_o", (g.hidden, q_out)),
        ("self_attn.q_norm.weight", "attn_q_norm", (g.head_dim,)),
        ("self_attn.k_norm.weight", "attn_k_norm", (g.head_dim,)),
    ]
    if g.attention_bias:
        rows += [
            ("self_attn.q_proj.bias", "attn_bias", (2 * q_out,)),
            ("self_attn.k_proj.bias", "attn_bias", (kv_out,)),
            ("self_attn.v_proj.bias", "attn_bias", (kv_out,)),
            ("self_attn.o_proj.bias", "attn_bias", (g.hidden,)),
        ]
    return rows


def _linear_attention_block(g: Geometry):
    key_dim, value_dim = g.lin_k_heads * g.lin_k_dim, g.lin_v_heads * g.lin_v_dim
    conv_dim = 2 * key_dim + value_dim
    return [
        ("linear_attn.in_proj_qkv.weight", "ssm_in_qkv", (conv_dim, g.hidden)),
        ("linear_attn.in_proj_z.weight", "ssm_in_z", (value_dim, g.hidden)),
        ("linear_attn.in_proj_a.weight", "ssm_in_a", (g.lin_v_heads, g.hidden)),
        ("linear_attn.in_proj_b.weight", "ssm_in_b", (g.lin_v_heads, g.hidden)),
        ("linear_attn.conv1d.weight", "ssm_conv1d", (conv_dim, 1, g.conv_kernel)),
        ("linear_attn.dt_bias", "ssm_dt_bias", (g.lin_v_heads,)),
        ("linear_attn.A_log", "ssm_a_log", (g.lin_v_heads,)),
        ("linear_attn.norm.weight", "ssm_norm", (g.lin_v_dim,)),
        ("linear_attn.out_proj.weight", "ssm_out", (g.hidden, value_dim)),
    ]


def _norms_block(g: Geometry):
    return [
        ("input_layernorm.weight", "input_norm", (g.hidden,)),
        ("post_attention_layernorm.weight", "post_attn_norm", (g.hidden,)),
    ]


def _dense_mlp_block(g: Geometry):
    return [
        ("mlp.gate_proj.weight", "ffn_gate", (g.intermediate, g.hidden)),
        ("mlp.up_proj.weight", "ffn_up", (g.intermediate, g.hidden)),
        ("mlp.down_proj.weight", "ffn_down", (g.hidden, g.intermediate)),
    ]


def _moe_dense_part_block(g: Geometry):
    return [
        ("mlp.gate.weight", "moe_router", (g.n_experts, g.hidden)),
        ("mlp.shared_expert.gate_proj.weight", "shexp_gate", (g.shared_intermediate, g.hidden)),
        ("mlp.shared_expert.up_proj.weight", "shexp_up", (g.shared_intermediate, g.hidden)),
        ("mlp.shared_expert.down_proj.weight", "shexp_down", (g.hidden, g.shared_intermediate)),
        ("mlp.shared_expert_gate.weight", "shexp_router", (1, g.hidden)),
    ]


# (projection, role, per-expert shape)
def _expert_projections(g: Geometry):
    return [
        ("gate_proj", "moe_gate_exps", (g.moe_intermediate, g.hidden)),
        ("up_proj", "moe_up_exps", (g.moe_intermediate, g.hidden)),
        ("down_proj", "moe_down_exps", (g.hidden, g.moe_intermediate)),
    ]


def _mtp_head_block(g: Geometry):
    return [
        ("fc.weight", "mtp_fc", (g.hidden, 2 * g.hidden)),
        ("pre_fc_norm_embedding.weight", "mtp_norm", (g.hidden,)),
        ("pre_fc_norm_hidden.weight", "mtp_norm", (g.hidden,)),
        ("norm.weight", "mtp_norm", (g.hidden,)),
    ]


# --- building the plan ------------------------------------------------------------------------

class _Claims:
    """Source tensors handed out to outputs; whatever is left over at the end is an error."""

    def __init__(self, source, where: str):
        self.source = source
        self.where = where
        self.claimed: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> Part:
        info = self.source.tensors.get(name)
        if info is None:
            raise MixquantError(f"{self.where}: missing tensor {name}")
        if tuple(info.shape) != tuple(shape):
            raise MixquantError(
                f"{self.where}: tensor {name} has shape {list(info.shape)}, the config implies {list(shape)}"
            )
        self.claimed.add(name)
        return Part(name)

    def has(self, name: str) -> bool:
        return name in self.source.tensors


def _output_shape(role: Role, shape: tuple[int, ...]) -> tuple[int, ...]:
    if role.transform == "conv1d_to_mlx":
        return (shape[0], shape[2], shape[1])
    return shape


def _rows(claims, rows, src_prefix, out_prefix, scope, layer=None):
    out = []
    for rel, role_name, shape in rows:
        role = ROLES[role_name]
        part = claims.take(src_prefix + rel, shape)
        out.append(LogicalTensor(out_prefix + rel, role, _output_shape(role, shape), [part], scope, layer))
    return out


def _experts(claims: _Claims, g: Geometry, src_prefix: str, out_prefix: str, scope: str, layer: int):
    """Per-expert tensors (experts.E.gate_proj.weight) or fused ones (experts.gate_up_proj) -> stacked."""
    out = []
    fused_gate_up = src_prefix + "mlp.experts.gate_up_proj"
    fused_down = src_prefix + "mlp.experts.down_proj"
    fused = claims.has(fused_gate_up) or claims.has(fused_down)
    inter = g.moe_intermediate
    if fused:
        claims.take(fused_gate_up, (g.n_experts, 2 * inter, g.hidden))
        claims.take(fused_down, (g.n_experts, g.hidden, inter))
    for proj, role_name, shape in _expert_projections(g):
        if not fused:
            parts = [claims.take(f"{src_prefix}mlp.experts.{e}.{proj}.weight", shape) for e in range(g.n_experts)]
        elif proj == "down_proj":
            parts = [Part(fused_down, e) for e in range(g.n_experts)]
        else:
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
            parts = [Part(fused_gate_up, (e, rows)) for e in range(g.n_experts)]
        name = f"{out_prefix}mlp.switch_mlp.{proj}.weight"
        out.append(LogicalTensor(name, ROLES[role_name], (g.n_experts, *shape), parts, scope, layer, stacked=True))
    return out


def _decoder_layer(claims, g: Geometry, src_prefix, out_prefix, scope, layer, full_attention):
    rows = _norms_block(g)
    rows += _attention_block(g) if full_attention else _linear_attention_block(g)
    rows += _moe_dense_part_block(g) if g.is_moe else _dense_mlp_block(g)
    tensors = _rows(claims, rows, src_prefix, out_prefix, scope, layer)
    if g.is_moe:
        tensors += _experts(claims, g, src_prefix, out_prefix, scope, layer)
    return tensors


def build(source, keep_vision: bool = True, keep_mtp: bool = True) -> ArchPlan:
    where = source.config_path
    config = source.config
    g = geometry(config, where)
    names = source.tensors.keys()
    vlm = any(n.startswith(TEXT_ROOT[True]) for n in names)
    root = TEXT_ROOT[vlm]
    claims = _Claims(source, source.where)

    tensors = _rows(claims, [("embed_tokens.weight", "embed", (g.vocab, g.hidden))], root, OUT_ROOT, "model")
    for i in range(g.n_layers):
        tensors += _decoder_layer(
            claims, g, f"{root}layers.{i}.", f"{OUT_ROOT}layers.{i}.", "model", i, g.is_full_attention(i)
        )
    tensors += _rows(claims, [("norm.weight", "final_norm", (g.hidden,))], root, OUT_ROOT, "model")
    dropped = []
    if not g.tie_embeddings:
        part = claims.take("lm_head.weight", (g.vocab, g.hidden))
        tensors.append(LogicalTensor(OUT_LM_HEAD, ROLES["lm_head"], (g.vocab, g.hidden), [part], "model"))
    elif claims.has("lm_head.weight"):
        claims.claimed.add("lm_head.weight")
        dropped.append("lm_head.weight")  # tied: mlx-lm uses the embedding

    mtp_names = [n for n in names if n.startswith(MTP_PREFIX)]
    if mtp_names and keep_mtp:
        tensors += _rows(claims, _mtp_head_block(g), MTP_PREFIX, MTP_PREFIX, "mtp")
        for i in range(g.mtp_layers):
            prefix = f"{MTP_PREFIX}layers.{i}."
            tensors += _decoder_layer(claims, g, prefix, prefix, "mtp", i, full_attention=True)
    elif mtp_names:
        claims.claimed.update(mtp_names)
        dropped += mtp_names

    vision_names = sorted(n for n in names if n.startswith(VISION_PREFIX))
    claims.claimed.update(vision_names)
    if keep_vision:
        for n in vision_names:
            info = source.tensors[n]
            tensors.append(LogicalTensor(n, ROLES["vision"], tuple(info.shape), [Part(n)], "vision"))
    else:
        dropped += vision_names

    extra = sorted(set(names) - claims.claimed)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise MixquantError(f"{source.where}: unexpected tensor {extra[0]}{more} for model_type {config.get('model_type')}")
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
    if not keep_vision:
        out.pop("vision_config", None)
    return out

