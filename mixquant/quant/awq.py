"""AWQ-style channel pre-scaling, folded into the preceding RMSNorm (or into up_proj's rows), so
inference pays nothing.

For a group of linears that read the same input (the output of a norm, or down_proj's input),
scale input channel j of every consumer by s_j and divide the producer by s_j: the function is
unchanged in float, but quantization error moves away from the channels with large activations.
s = I^alpha, normalised by sqrt(max(s) min(s)), where I is the imatrix importance (mean squared
activation). alpha is searched per group on a grid, minimising the quantized group's output error
on calibration activations with the bits the recipe assigns (the AWQ paper's search); alpha = 0
(no scaling) is on the grid, and a non-zero alpha is kept only if the calibration rows it was not
chosen on confirm that it beats no scaling.

Groups (by role, the same for every architecture table):
- input_layernorm -> q, k, v (attention) or in_proj_qkv, in_proj_z, in_proj_a, in_proj_b (Gated
  DeltaNet); every consumer is scaled, quantized or not, so the function is preserved;
- post_attention_layernorm -> gate, up; for MoE the router, every expert's gate/up, the shared
  expert's gate/up and shared_expert_gate;
- up_proj rows <-> down_proj columns (per expert for MoE; the shared expert too).
o_proj / out_proj have no foldable predecessor.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from mixquant.errors import MixquantError

GRID = tuple(round(0.1 * i, 1) for i in range(11))
SCALE_CLAMP = (1e-4, 1e4)
MIN_SAMPLE_ROWS = 16

ATTN_IN = ("attn_q", "attn_k", "attn_v", "ssm_in_qkv", "ssm_in_z", "ssm_in_a", "ssm_in_b")
MLP_IN = ("ffn_gate", "ffn_up", "moe_router", "moe_gate_exps", "moe_up_exps", "shexp_gate", "shexp_up", "shexp_router")
STAT_PREFERENCE = {"attn": ("attn_q", "ssm_in_qkv"), "mlp": ("ffn_gate", "moe_router")}


@dataclass
class Member:
    name: str  # logical tensor name
    part: int | None  # expert index for stacked tensors; None: every part
    op: str  # "cols" (consumer: multiply input columns), "rows" (divide output rows), "norm" (divide)


@dataclass
class Group:
    key: str  # for reports, e.g. "layer 3 attn"
    stat_module: str  # module whose recorded input (and imatrix entry) is the group's input
    stat_mat: int
    members: list[Member]
    down: str | None = None  # dense MLP groups: the down_proj that reads the consumers' output


@dataclass
class AwqResult:
    ops: dict[tuple[str, int | None], list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def for_part(self, name: str, part: int) -> list[tuple[str, np.ndarray]]:
        return self.ops.get((name, None), []) + self.ops.get((name, part), [])


def groups(plan) -> list[Group]:
    by_layer: dict[int, list] = {}
    for e in plan.entries:
        t = e.tensor
        if t.scope == "model" and t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    out = []
    for layer, ts in sorted(by_layer.items()):
        roles = {t.role.name: t for t in ts}
        for kind, norm_role, consumer_roles in (("attn", "input_norm", ATTN_IN), ("mlp", "post_attn_norm", MLP_IN)):
            consumers = [t for t in ts if t.role.name in consumer_roles]
            stat = next((roles[r] for r in STAT_PREFERENCE[kind] if r in roles), None)
            if norm_role not in roles or not consumers or stat is None:
                continue
            members = [Member(roles[norm_role].name, None, "norm")] + [Member(t.name, None, "cols") for t in consumers]
            down = roles["ffn_down"].name if kind == "mlp" and "ffn_down" in roles else None
            out.append(Group(f"layer {layer} {kind}", stat.module, 0, members, down))
        for up_role, down_role in (("ffn_up", "ffn_down"), ("shexp_up", "shexp_down")):
            if up_role in roles and down_role in roles:
                out.append(Group(f"layer {layer} {down_role}", roles[down_role].module, 0,
                                 [Member(roles[up_role].name, None, "rows"), Member(roles[down_role].name, None, "cols")]))
        if "moe_up_exps" in roles and "moe_down_exps" in roles:
            up, down = roles["moe_up_exps"], roles["moe_down_exps"]
            for e in range(len(down.parts)):
                out.append(Group(f"layer {layer} expert {e} down", down.module, e,
                                 [Member(up.name, e, "rows"), Member(down.name, e, "cols")]))
    return out


def scales_for(importance: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(importance.astype(np.float64), 1e-12), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, *SCALE_CLAMP)


def _fake_quant(w: np.ndarray, bits: int, group_size: int, dtype) -> np.ndarray:
    import mlx.core as mx

    x = mx.array(w.astype(np.float32)).astype(dtype)
    q, s, b = mx.quantize(x, group_size=group_size, bits=bits)
    return np.array(mx.dequantize(q, s, b, group_size=group_size, bits=bits).astype(mx.float32))


def _weights(source, entry, part: int | None) -> list[np.ndarray]:
    parts = entry.tensor.parts if part is None else [entry.tensor.parts[part]]
    return [source.read(p.source, p.index) for p in parts]


def search_alpha(source, plan_by_name, group: Group, importance: np.ndarray, x: np.ndarray, dtype) -> float:
    """The grid alpha with the least relative output error of the group's quantized consumers."""
    consumers = [m for m in group.members if m.op == "cols" and plan_by_name[m.name].quantized]
    if not consumers or len(x) < MIN_SAMPLE_ROWS:
        return 0.0
    ws = [(plan_by_name[m.name], w) for m in consumers for w in _weights(source, plan_by_name[m.name], m.part)]
    roles = [plan_by_name[m.name].tensor.role.name for m in consumers]
    if roles == ["ffn_gate", "ffn_up"] and group.down is not None:
        return _search_mlp_block(ws, source, plan_by_name[group.down], importance, x, dtype)
    def errors(alpha):
        s = scales_for(importance, alpha)
        fit = check = 0.0
        for entry, w in ws:  # the group's outputs side by side, as one block
            wq = _fake_quant(w * s[None, :], entry.bits, entry.group_size, dtype)
            sq = np.square((x / s[None, :]) @ wq.T - x @ w.T).sum(-1)
            fit, check = fit + float(sq[0::2].sum()), check + float(sq[1::2].sum())
        return fit, check

    return _choose(errors)


def _choose(errors) -> float:
    """The grid alpha that fits the even sample rows best, kept only if the odd rows confirm that it
    beats no scaling by at least 1% (the samples are few; this keeps noise from choosing)."""
    table = {alpha: errors(alpha) for alpha in GRID}
    best = min(GRID, key=lambda a: table[a][0])
    return best if table[best][1] < 0.99 * table[0.0][1] else 0.0


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _search_mlp_block(ws, source, down_entry, importance, x, dtype) -> float:
    """gate/up scales judged by the whole MLP's output, down_proj in float, as the AWQ paper does."""
    (gate_e, wg), (up_e, wu) = ws
    wd = _weights(source, down_entry, None)[0]
    ref = (_silu(x @ wg.T) * (x @ wu.T)) @ wd.T

    def errors(alpha):
        s = scales_for(importance, alpha)
        xs = x / s[None, :]
        g = xs @ _fake_quant(wg * s[None, :], gate_e.bits, gate_e.group_size, dtype).T
        u = xs @ _fake_quant(wu * s[None, :], up_e.bits, up_e.group_size, dtype).T
        sq = np.square((_silu(g) * u) @ wd.T - ref).sum(-1)
        return float(sq[0::2].sum()), float(sq[1::2].sum())

    return _choose(errors)


def compute(source, plan, importance_of, samples_of, alpha: float | None, strict: bool) -> AwqResult:
    """Scales for every group. importance_of(module, mat) and samples_of(module, mat) return arrays
    or None when the imatrix / calibration has nothing for that input."""
    from mixquant.convert import MX_DTYPES

    plan_by_name = {e.tensor.name: e for e in plan.entries}
    result = AwqResult()
    dtype = MX_DTYPES[plan.entries[0].dtype if plan.entries else "BF16"]
    warned = False
    for g in groups(plan):
        imp = importance_of(g.stat_module, g.stat_mat)
        n_in = plan_by_name[next(m.name for m in g.members if m.op == "cols")].tensor.in_features
        if imp is None or imp.shape[-1] != n_in:
            why = "no imatrix entry" if imp is None else f"imatrix has {imp.shape[-1]} channels, tensor {n_in}"
            if strict:
                raise MixquantError(f"imatrix: {g.stat_module}: {why}")
            if not warned:
                print(f"mixquant: warning: imatrix does not cover every group ({g.key}: {why}); "
                      "AWQ is skipped there (listed in the model card)", file=sys.stderr)
                warned = True
            result.skipped[g.key] = why
            continue
        if alpha is None:
            x = samples_of(g.stat_module, g.stat_mat)
            a = search_alpha(source, plan_by_name, g, imp, x if x is not None else np.zeros((0, n_in)), dtype)
        else:
            a = alpha
        result.alphas[g.key] = a
        if a == 0.0:
            continue
        s = scales_for(imp, a)
        for m in g.members:
            vec = 1.0 / s if m.op in ("rows", "norm") else s
            result.ops.setdefault((m.name, m.part), []).append((m.op, vec.astype(np.float32)))
    return result


def apply(ops: list[tuple[str, np.ndarray]], block: np.ndarray, r0: int) -> np.ndarray:
    """Apply a tensor's AWQ ops to a block of its rows starting at row r0 (float32)."""
    for op, vec in ops:
        if op == "cols":
            block = block * vec[None, :]
        elif op == "rows":
            block = block * vec[r0 : r0 + block.shape[0], None]
        else:  # norm
            block = block * vec
    return block
