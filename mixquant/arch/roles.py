"""The vocabulary every architecture table speaks: what part of the network a tensor is (its role),
what kind of tensor that role is, and the families of roles that recipes treat alike.

Roles are the only names the rest of mixquant uses for tensors; a family file (`arch/<family>.py`)
says which of its tensors has which role. The string value of a role is what `mixquant plan` prints
and what a rules file's `role = "..."` names.
"""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    LINEAR = "linear"
    EMBEDDING = "embedding"
    EXPERTS = "experts"  # a stack of per-expert matrices (mlx-lm's SwitchLinear)
    NORM = "norm"
    CONV = "conv"
    PARAM = "param"
    VISION = "vision"


QUANTIZABLE = frozenset({Kind.LINEAR, Kind.EMBEDDING, Kind.EXPERTS})


class Role(StrEnum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    FINAL_NORM = "final_norm"
    INPUT_NORM = "input_norm"
    POST_ATTN_NORM = "post_attn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_BIAS = "attn_bias"
    ATTN_Q_NORM = "attn_q_norm"
    ATTN_K_NORM = "attn_k_norm"
    SSM_IN_QKV = "ssm_in_qkv"
    SSM_IN_Z = "ssm_in_z"
    SSM_IN_A = "ssm_in_a"
    SSM_IN_B = "ssm_in_b"
    SSM_CONV1D = "ssm_conv1d"
    SSM_DT_BIAS = "ssm_dt_bias"
    SSM_A_LOG = "ssm_a_log"
    SSM_NORM = "ssm_norm"
    SSM_OUT = "ssm_out"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    MOE_ROUTER = "moe_router"
    MOE_GATE_EXPS = "moe_gate_exps"
    MOE_UP_EXPS = "moe_up_exps"
    MOE_DOWN_EXPS = "moe_down_exps"
    SHEXP_GATE = "shexp_gate"
    SHEXP_UP = "shexp_up"
    SHEXP_DOWN = "shexp_down"
    SHEXP_ROUTER = "shexp_router"
    MTP_FC = "mtp_fc"
    MTP_NORM = "mtp_norm"
    VISION = "vision_tower"

    @property
    def kind(self) -> Kind:
        return KINDS.get(self, Kind.LINEAR)

    @property
    def quantizable(self) -> bool:
        return self.kind in QUANTIZABLE


KINDS = {
    Role.EMBED: Kind.EMBEDDING,
    Role.FINAL_NORM: Kind.NORM,
    Role.INPUT_NORM: Kind.NORM,
    Role.POST_ATTN_NORM: Kind.NORM,
    Role.ATTN_Q_NORM: Kind.NORM,
    Role.ATTN_K_NORM: Kind.NORM,
    Role.SSM_NORM: Kind.NORM,
    Role.MTP_NORM: Kind.NORM,
    Role.ATTN_BIAS: Kind.PARAM,
    Role.SSM_DT_BIAS: Kind.PARAM,
    Role.SSM_A_LOG: Kind.PARAM,
    Role.SSM_CONV1D: Kind.CONV,
    Role.MOE_GATE_EXPS: Kind.EXPERTS,
    Role.MOE_UP_EXPS: Kind.EXPERTS,
    Role.MOE_DOWN_EXPS: Kind.EXPERTS,
    Role.VISION: Kind.VISION,
}

# Families of roles that recipes treat alike, whatever the architecture.
FFN_GATE_UP = frozenset({Role.FFN_GATE, Role.FFN_UP, Role.MOE_GATE_EXPS, Role.MOE_UP_EXPS, Role.SHEXP_GATE,
                         Role.SHEXP_UP})
FFN_DOWN = frozenset({Role.FFN_DOWN, Role.MOE_DOWN_EXPS, Role.SHEXP_DOWN})
ATTN_IN = frozenset({Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.SSM_IN_QKV, Role.SSM_IN_Z})
ATTN_OUT = frozenset({Role.ATTN_O, Role.SSM_OUT})
SSM_GATES = frozenset({Role.SSM_IN_A, Role.SSM_IN_B})
ROUTERS = frozenset({Role.MOE_ROUTER, Role.SHEXP_ROUTER})
EMBED = frozenset({Role.EMBED})
LM_HEAD = frozenset({Role.LM_HEAD})
# the MTP head's own projections (it shares the embedding and lm_head with the model)
MTP_PROJECTIONS = frozenset({Role.MTP_FC}) | ATTN_IN | ATTN_OUT | FFN_GATE_UP | FFN_DOWN | ROUTERS
