"""AWQ-style channel pre-scaling, folded into the preceding RMSNorm (or into up_proj's rows), so
inference pays nothing.

For a group of linears that read the same input (the output of a norm, or down_proj's input),
scale input channel j of every consumer by s_j and divide the producer by s_j: the function is
unchanged in float, but quantization error moves away from the channels with large activations.
s = I^alpha, normalised by sqrt(max(s) min(s)), where I is the imatrix importance (mean squared
activation). alpha is searched per group on a grid, minimising the quantized group's output error
on calibration activations with the bits the recipe assigns (the AWQ paper's search); alpha = 0
(no scaling) is on the grid.

The searched alpha is then checked end to end (mixquant.calib.judge), together with the AWQ
paper's second step, weight clipping (mixquant.quant.fit): for each group, the candidates "searched
scales", "clipping fit" and "both" are tried in the model quantized so far, and the one with the
least KL divergence on calibration windows is kept if it beats leaving the group as it is. Without
a judge (MoE expert groups, or the judge switched off) a non-zero alpha is kept only if the
calibration rows it was not chosen on confirm that it beats no scaling.

Groups (by role, the same for every architecture table):
- input_layernorm -> q, k, v (attention) or in_proj_qkv, in_proj_z, in_proj_a, in_proj_b (Gated
  DeltaNet); every consumer is scaled, quantized or not, so the function is preserved;
- post_attention_layernorm -> gate, up; for MoE the router, every expert's gate/up, the shared
  expert's gate/up and shared_expert_gate;
- up_proj rows <-> down_proj columns (per expert for MoE; the shared expert too).
o_proj / out_proj have no foldable predecessor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from mixquant.arch.tensors import SCOPE_MODEL, Structure
from mixquant.blocks import read_part
from mixquant.errors import MixquantError
from mixquant.quant.encode import mx_dtype
from mixquant.quant.fit import fake_quantize

log = logging.getLogger(__name__)

GRID = tuple(round(0.1 * i, 1) for i in range(11))
SCALE_CLAMP = (1e-4, 1e4)
MIN_SAMPLE_ROWS = 16


@dataclass
class Member:
    name: str  # logical tensor name
    part: int | None  # expert index for stacked tensors; None: every part
    op: str  # "cols" (consumer: multiply input columns), "rows" (divide output rows), "norm" (divide)


@dataclass
class Group:
    key: str  # for reports, e.g. "layer 3 attn"
    layer: int
    stat_module: str  # module whose recorded input (and imatrix entry) is the group's input
    stat_mat: int
    members: list[Member]
    down: str | None = None  # a dense MLP's gate/up group: the down projection that reads their output


@dataclass
class AwqResult:
    ops: dict[tuple[str, int | None], list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fits: dict[tuple[str, int | None], np.ndarray] = field(default_factory=dict)  # clipping-fit importance
    judged: tuple[float, float] | None = None  # the judge's divergence before and after the search

    def for_part(self, name: str, part: int) -> list[tuple[str, np.ndarray]]:
        return self.ops.get((name, None), []) + self.ops.get((name, part), [])

    def fit_for(self, name: str, part: int) -> np.ndarray | None:
        return self.fits.get((name, part), self.fits.get((name, None)))


def groups(plan, structure: Structure) -> list[Group]:
    """The AWQ groups of the model's layers, from the family's structure."""
    by_layer: dict[int, list] = {}
    for e in plan.entries:
        t = e.tensor
        if t.scope == SCOPE_MODEL and t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    out = []
    for layer, ts in sorted(by_layer.items()):
        by_role = {t.role: t for t in ts}
        for ng in structure.norm_groups:
            consumers = [by_role[r] for r in ng.consumers if r in by_role]
            stat = next((t for t in consumers if not t.stacked), None)  # its recorded input: every token
            if ng.norm not in by_role or stat is None:
                continue
            members = [Member(by_role[ng.norm].name, None, "norm")] + [Member(t.name, None, "cols") for t in consumers]
            down = None
            if structure.mlp and {t.role for t in consumers} == set(structure.mlp[:2]) and structure.mlp[2] in by_role:
                down = by_role[structure.mlp[2]].name
            out.append(Group(f"layer {layer} {ng.name}", layer, stat.module, 0, members, down))
        for up_role, down_role in structure.up_down:
            if up_role not in by_role or down_role not in by_role:
                continue
            up, down = by_role[up_role], by_role[down_role]
            if down.stacked:
                out += [Group(f"layer {layer} expert {e} down", layer, down.module, e,
                              [Member(up.name, e, "rows"), Member(down.name, e, "cols")]) for e in range(len(down.parts))]
            else:
                out.append(Group(f"layer {layer} {down_role.value}", layer, down.module, 0,
                                 [Member(up.name, None, "rows"), Member(down.name, None, "cols")]))
    return out


def scales_for(importance: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(importance.astype(np.float64), 1e-12), alpha)
    s = s / np.sqrt(s.max() * s.min())
    return np.clip(s, *SCALE_CLAMP)


def _weights(source, entry, part: int | None) -> list[np.ndarray]:
    parts = range(len(entry.tensor.parts)) if part is None else [part]
    return [read_part(source, entry.tensor, i) for i in parts]


def search_alpha(source, plan_by_name, group: Group, importance: np.ndarray, x: np.ndarray, dtype,
                 confirm: bool = True) -> float:
    """The grid alpha with the least output error of the group's quantized consumers."""
    consumers = [m for m in group.members if m.op == "cols" and plan_by_name[m.name].quantized]
    if not consumers or len(x) < MIN_SAMPLE_ROWS:
        return 0.0
    ws = [(plan_by_name[m.name], w) for m in consumers for w in _weights(source, plan_by_name[m.name], m.part)]
    if group.down is not None and len(ws) == 2:
        return _search_mlp_block(ws, source, plan_by_name[group.down], importance, x, dtype, confirm)

    def errors(alpha):
        s = scales_for(importance, alpha)
        fit = check = 0.0
        for entry, w in ws:  # the group's outputs side by side, as one block
            wq = fake_quantize(w * s[None, :], entry.bits, entry.group_size, dtype)
            sq = np.square(x @ (wq / s[None, :] - w).T).sum(-1)  # (x / s) wq^T - x w^T
            fit, check = fit + float(sq[0::2].sum()), check + float(sq[1::2].sum())
        return fit, check

    return _choose(errors, confirm)


def _choose(errors, confirm: bool = True) -> float:
    """The grid alpha that fits the even sample rows best, kept only if the odd rows confirm that it
    beats no scaling by at least 1% (the samples are few; this keeps noise from choosing). Without
    `confirm` (a later end-to-end check decides instead): the alpha with the least error on all rows."""
    table = {alpha: errors(alpha) for alpha in GRID}
    if not confirm:
        return min(GRID, key=lambda a: sum(table[a]))
    best = min(GRID, key=lambda a: table[a][0])
    return best if table[best][1] < 0.99 * table[0.0][1] else 0.0


def _silu(a):
    return a / (1.0 + np.exp(-a))


def _search_mlp_block(ws, source, down_entry, importance, x, dtype, confirm: bool) -> float:
    """gate/up scales judged by the whole MLP's output, down_proj in float, as the AWQ paper does."""
    (gate_e, wg), (up_e, wu) = ws
    wd = _weights(source, down_entry, None)[0]
    ref = (_silu(x @ wg.T) * (x @ wu.T)) @ wd.T

    def errors(alpha):
        s = scales_for(importance, alpha)
        xs = x / s[None, :]
        g = xs @ fake_quantize(wg * s[None, :], gate_e.bits, gate_e.group_size, dtype).T
        u = xs @ fake_quantize(wu * s[None, :], up_e.bits, up_e.group_size, dtype).T
        sq = np.square((_silu(g) * u) @ wd.T - ref).sum(-1)
        return float(sq[0::2].sum()), float(sq[1::2].sum())

    return _choose(errors, confirm)


def compute(source, plan, structure: Structure, importance_of, samples_of, alpha: float | None, strict: bool,
            judge=None) -> AwqResult:
    """Scales for every group. importance_of(module, mat) and samples_of(module, mat) return arrays
    or None when the imatrix / calibration has nothing for that input. With a judge (searched alpha
    only), each group's candidates -- the searched scales, the clipping fit, both -- are kept only
    where they lower the judge's end-to-end divergence."""
    search = Search(source, plan, alpha, strict, judge)
    for g in groups(plan, structure):
        search.decide(g, importance_of, samples_of)
    return search.finish()


class Search:
    """The decisions of compute, one group at a time, in layer order (a layer-streamed calibration
    decides a layer's groups as soon as its activations are recorded, then drops them)."""

    def __init__(self, source, plan, alpha: float | None, strict: bool, judge=None):
        self.source, self.alpha, self.strict = source, alpha, strict
        self.plan_by_name = {e.tensor.name: e for e in plan.entries}
        self.result = AwqResult()
        self.dtype = mx_dtype(plan.entries[0].dtype if plan.entries else "BF16")
        self.state = _JudgedState(judge, self.plan_by_name, self.dtype) if judge is not None and alpha is None else None
        self.before = self.state.divergence if self.state is not None else None
        self.warned = False

    def decide(self, g: Group, importance_of, samples_of) -> None:
        result, state, plan_by_name = self.result, self.state, self.plan_by_name
        imp = importance_of(g.stat_module, g.stat_mat)
        n_in = plan_by_name[next(m.name for m in g.members if m.op == "cols")].tensor.in_features
        if imp is None or imp.shape[-1] != n_in:
            why = "no imatrix entry" if imp is None else f"imatrix has {imp.shape[-1]} channels, tensor {n_in}"
            if self.strict:
                raise MixquantError(f"imatrix: {g.stat_module}: {why}")
            if not self.warned:
                log.warning("imatrix does not cover every group (%s: %s); AWQ is skipped there (listed in the "
                            "model card)", g.key, why)
                self.warned = True
            result.skipped[g.key] = why
            return
        judged = state is not None and state.covers(g)
        if self.alpha is None:
            x = samples_of(g.stat_module, g.stat_mat)
            a = search_alpha(self.source, plan_by_name, g, imp, x if x is not None else np.zeros((0, n_in)),
                             self.dtype, confirm=not judged)
        else:
            a = self.alpha
        clip = False
        if judged:
            a, clip = state.decide(g, imp, a)
        elif state is not None and a != 0.0:
            state.follow(g, imp, a)
        result.alphas[g.key] = a
        for m, op, vec in _group_ops(g, imp, a):
            result.ops.setdefault((m.name, m.part), []).append((op, vec))
        if clip:
            for m, fit_importance in _group_fits(g, plan_by_name, imp, a):
                result.fits[(m.name, m.part)] = fit_importance

    def finish(self) -> AwqResult:
        if self.state is not None:
            self.state.flush()
            self.result.judged = (self.before, self.state.divergence)
        return self.result


def _group_ops(g: Group, importance: np.ndarray, alpha: float) -> list[tuple[Member, str, np.ndarray]]:
    if alpha == 0.0:
        return []
    s = scales_for(importance, alpha)
    return [(m, m.op, (1.0 / s if m.op in ("rows", "norm") else s).astype(np.float32)) for m in g.members]


def _group_fits(g: Group, plan_by_name, importance: np.ndarray, alpha: float) -> list[tuple[Member, np.ndarray]]:
    """The clipping fit's weights for the group's quantized consumers: the importance of their
    (scaled) input, I / s^2."""
    s = scales_for(importance, alpha)
    fit_importance = (importance / np.square(s)).astype(np.float32)
    return [(m, fit_importance) for m in g.members if m.op == "cols" and plan_by_name[m.name].quantized]


class _JudgedState:
    """The quantized model as decided so far, in the judge: every quantized tensor at its
    dequantized value, with the ops and clipping fits accepted so far. Keys are (tensor, part)."""

    def __init__(self, judge, plan_by_name, dtype):
        self.judge, self.plan_by_name, self.dtype = judge, plan_by_name, dtype
        self.ops: dict[tuple[str, int], list] = {}
        self.fits: dict[tuple[str, int], np.ndarray] = {}
        self.pending: set[str] = set()  # tensors changed by groups decided without the judge
        for name, entry in plan_by_name.items():
            if entry.quantized and judge.covers(entry.tensor.module):
                judge.set(entry.tensor.module, self._effective(name, {}, {}))
        self.divergence = judge.divergence()

    def covers(self, g: Group) -> bool:
        """Groups of single-part tensors: dense models; MoE groups hold experts, too many to judge."""
        members = [self.plan_by_name[m.name] for m in g.members]
        return all(len(e.tensor.parts) == 1 and self.judge.covers(e.tensor.module) for e in members if e.quantized)

    def follow(self, g: Group, importance: np.ndarray, alpha: float) -> None:
        """A group decided without the judge: its scales go into the model before the next check."""
        ops, _ = self._candidate(g, importance, alpha, False)
        self._add(ops, {})
        self.pending.update(name for name, _ in ops if self.plan_by_name[name].quantized)

    def flush(self) -> None:
        if not self.pending:
            return
        for name in self.pending:
            if self.judge.covers(self.plan_by_name[name].tensor.module):
                self.judge.set(self.plan_by_name[name].tensor.module, self._effective(name, {}, {}))
        self.pending.clear()
        self.divergence = self.judge.divergence()

    def decide(self, g: Group, importance: np.ndarray, alpha: float) -> tuple[float, bool]:
        """The candidate (alpha, clip) with the least divergence; (0, False) unless one beats it."""
        self.flush()
        best, best_div, best_change = (0.0, False), self.divergence, None
        for cand in dict.fromkeys([(alpha, False), (0.0, True), (alpha, True)]):
            if cand == (0.0, False):
                continue
            ops, fits = self._candidate(g, importance, *cand)
            updates = self._updates(g, ops, fits)
            div = self.judge.try_weights(updates)
            if div < best_div:
                best, best_div, best_change = cand, div, (ops, fits, updates)
        if best_change is not None:
            ops, fits, updates = best_change
            for module, value in updates.items():
                self.judge.set(module, value)
            self._add(ops, fits)
            self.divergence = best_div
        return best

    def _add(self, ops, fits) -> None:
        for key, extra in ops.items():
            self.ops.setdefault(key, []).extend(extra)
        self.fits.update(fits)

    def _keys(self, m: Member) -> list[tuple[str, int]]:
        parts = range(len(self.plan_by_name[m.name].tensor.parts)) if m.part is None else [m.part]
        return [(m.name, p) for p in parts]

    def _candidate(self, g, importance, alpha, clip):
        ops: dict[tuple[str, int], list] = {}
        for m, op, vec in _group_ops(g, importance, alpha):
            for key in self._keys(m):
                ops.setdefault(key, []).append((op, vec))
        fits = {}
        if clip:
            fits = {key: imp for m, imp in _group_fits(g, self.plan_by_name, importance, alpha) for key in self._keys(m)}
        return ops, fits

    def _updates(self, g, ops, fits) -> dict[str, np.ndarray]:
        return {self.plan_by_name[m.name].tensor.module: self._effective(m.name, ops, fits)
                for m in g.members if self.plan_by_name[m.name].quantized}

    def _effective(self, name: str, extra_ops, extra_fits) -> np.ndarray:
        """What the folded, quantized tensor computes on the unscaled input: deq(Q(ops(W))) with
        the ops undone, part by part (MoE experts are stacked on the leading axis)."""
        entry = self.plan_by_name[name]
        w = self.judge.weight(entry.tensor.module).astype(np.float32)
        stacked = len(entry.tensor.parts) > 1
        out = []
        for p, wp in enumerate(w if stacked else [w]):
            key = (name, p)
            ops = self.ops.get(key, []) + extra_ops.get(key, [])
            q = fake_quantize(apply(ops, wp, 0), entry.bits, entry.group_size, self.dtype,
                              extra_fits.get(key, self.fits.get(key)))
            out.append(undo(ops, q))
        return np.stack(out) if stacked else out[0]


def nearest(result, name: str, part: int, w: np.ndarray, bits: int, group_size: int, dtype):
    """Part `part` of tensor `name` as AWQ's ops scale it (`w` itself without `result` or ops), and
    its rounding to nearest with AWQ's clipping fit where one was chosen: (scaled w, (packed codes,
    scales, biases) as MLX arrays)."""
    from mixquant.quant.fit import quantize

    ops = result.for_part(name, part) if result else []
    w = apply(ops, w, 0) if ops else w
    return w, quantize(w, bits, group_size, dtype, result.fit_for(name, part) if result else None)


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


def undo(ops: list[tuple[str, np.ndarray]], w: np.ndarray) -> np.ndarray:
    """The inverse of apply on a whole tensor."""
    for op, vec in reversed(ops):
        if op == "cols":
            w = w / vec[None, :]
        elif op == "rows":
            w = w / vec[:, None]
        else:
            w = w / vec
    return w
