"""llama.cpp GGUF tensor names and layouts -> Hugging Face names and layouts, per architecture.

A GGUF source presents its tensors under the Hugging Face names the architecture tables in this
package expect, with llama.cpp's changes undone:
- qwen35 / qwen35moe: norms stored with the +1 already added (removed again here; the table adds
  it back in float32), `ssm_a` = -exp(A_log), conv1d squeezed to (channels, kernel), and the
  linear-attention V heads reordered from grouped-by-K-head to tiled for any ratio r = n_v / n_k
  (rows of the V part of attn_qkv and of conv1d, attn_gate rows, ssm_alpha/ssm_beta rows, ssm_a
  and ssm_dt, ssm_out columns). MTP blocks are the last `nextn_predict_layers` blocks.
- llama: attn_q / attn_k rows permuted for llama.cpp's rope layout.
"""

from __future__ import annotations

import re

import numpy as np

# (gguf name regex, HF name template, layout op). {L} in a template is the block index group.
QWEN35_BLOCK = [
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
    # stacked experts: one HF tensor per expert, see EXPERT_SPLITS
    (r"ffn_gate_exps\.weight", "mlp.experts.{E}.gate_proj.weight", "expert"),
    (r"ffn_up_exps\.weight", "mlp.experts.{E}.up_proj.weight", "expert"),
    (r"ffn_down_exps\.weight", "mlp.experts.{E}.down_proj.weight", "expert"),
    (r"ffn_gate_up_exps\.weight", "mlp.experts.{E}.{GATE_UP}_proj.weight", "expert_gate_up"),
]
QWEN35_NEXTN = [  # in the MTP blocks, besides the decoder-layer tensors above
    (r"nextn\.eh_proj\.weight", "mtp.fc.weight", None),
    (r"nextn\.enorm\.weight", "mtp.pre_fc_norm_embedding.weight", "norm_unshift"),
    (r"nextn\.hnorm\.weight", "mtp.pre_fc_norm_hidden.weight", "norm_unshift"),
    (r"nextn\.shared_head_norm\.weight", "mtp.norm.weight", "norm_unshift"),
]
QWEN35_GLOBAL = [
    (r"token_embd\.weight", "model.embed_tokens.weight", None),
    (r"output_norm\.weight", "model.norm.weight", "norm_unshift"),
    (r"output\.weight", "lm_head.weight", None),
]

LLAMA_BLOCK = [
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
LLAMA_GLOBAL = [
    (r"token_embd\.weight", "model.embed_tokens.weight", None),
    (r"output_norm\.weight", "model.norm.weight", None),
    (r"output\.weight", "lm_head.weight", None),
]
# rope_freqs and similar helper tensors llama.cpp computes from the config: not weights.
IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.nextn\.(embed_tokens|shared_head_head)\.weight")

TABLES = {
    "qwen35": (QWEN35_GLOBAL, QWEN35_BLOCK, QWEN35_NEXTN),
    "qwen35moe": (QWEN35_GLOBAL, QWEN35_BLOCK, QWEN35_NEXTN),
    "llama": (LLAMA_GLOBAL, LLAMA_BLOCK, []),
}


def hf_names(arch: str, gguf_name: str, n_main_layers: int) -> tuple[str, str | None] | None:
    """(HF name template, layout op) for one GGUF tensor, or None if it is not a weight we keep."""
    glob, block, nextn = TABLES[arch]
    for pattern, template, op in glob:
        if re.fullmatch(pattern, gguf_name):
            return template, op
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= n_main_layers:  # an MTP block
        for pattern, template, op in nextn:
            if re.fullmatch(pattern, rest):
                return template, op
        prefix = f"mtp.layers.{layer - n_main_layers}."
    else:
        prefix = f"model.layers.{layer}."
    for pattern, template, op in block:
        if re.fullmatch(pattern, rest):
            return prefix + template, op
    return None


# --- layout ops (numpy, float32, on arrays in row-major order) -----------------------------------

def untile_v(a: np.ndarray, axis: int, n_k: int, head_dim: int) -> np.ndarray:
    """Inverse of llama.cpp's V-head reorder along `axis`: tiled (r, n_k, d) back to grouped (n_k, r, d)."""
    a = np.moveaxis(a, axis, 0)
    n = a.shape[0]
    r = n // (n_k * head_dim)
    out = a.reshape(r, n_k, head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return np.moveaxis(out, 0, axis)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's llama permute: (n_head, d/2, 2) -> (n_head, 2, d/2) rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tile_v(a: np.ndarray, axis: int, n_k: int, head_dim: int) -> np.ndarray:
    """llama.cpp's V-head reorder along `axis`: grouped (n_k, r, d) to tiled (r, n_k, d)."""
    a = np.moveaxis(a, axis, 0)
    r = a.shape[0] // (n_k * head_dim)
    out = a.reshape(n_k, r, head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return np.moveaxis(out, 0, axis)


EXPERT_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_name_for(arch: str, module: str) -> str | None:
    """The llama.cpp tensor name of an MLX module path (the inverse of `hf_names` for weights)."""
    name = module[len("language_model."):] if module.startswith("language_model.") else module
    glob, block, _ = TABLES[arch]
    for pattern, template, _ in glob:
        if template == name + ".weight":
            return pattern.replace("\\", "")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer, rest = m.group(1), m.group(2)
    e = re.fullmatch(r"mlp\.switch_mlp\.(\w+)", rest)
    if e:
        return f"blk.{layer}.{EXPERT_GGUF[e.group(1)]}.weight"
    for pattern, template, _ in block:
        if template == rest + ".weight":
            return f"blk.{layer}." + pattern.replace("\\", "")
    return None
