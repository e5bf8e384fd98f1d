"""Sensitivity: how much each unit of the model costs the output, per way of storing it.

For every unit (a tensor, or an MoE expert stack) and every option (bits x group size, or keep),
the increase in mean KL divergence of the model's next-token distribution, against the unquantized
model, when only that unit is stored that way. Two modes:

- measured: exactly that, on calibration windows: the unit's weights are replaced by their
  quantized values in the float model, which runs from the unit's layer on (the layers before it
  are replayed from kept states). One forward per unit and option; results are saved after each
  unit, so an interrupted run resumes where it stopped.
- proxy: a second-order estimate from one forward and backward pass per window. The KL's Fisher
  information at a linear's output, per output channel (G, from the gradient of the model's own
  sampled tokens' log-likelihood), times the input's second moment per input channel (I, as in an
  imatrix), weights the squared quantization error: dKL ~ 1/2 sum_ij G_i I_j (W_q - W)_ij^2. An
  embedding's rows are weighted by their tokens' frequency and its columns by the mean G of its
  output. Cost: one backward pass per window plus a quantization of each unit per option.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixquant.arch.roles import Kind, Role
from mixquant.arch.tensors import SCOPE_MODEL
from mixquant.distributed import all_sum_each, owned
from mixquant.errors import MixquantError
from mixquant.io.atomic import atomic_write
from mixquant.io.textfile import read_json
from mixquant.quant.options import Option, all_options

log = logging.getLogger(__name__)

FORMAT = "mixquant-sensitivity-v1"
MEASURED, PROXY = "measured", "proxy"


@dataclass
class Unit:
    name: str
    module: str
    role: Role
    shape: tuple[int, ...]
    layer: int | None
    stacked: bool

    @property
    def params(self) -> int:
        return int(np.prod(self.shape))


def units_of(plan) -> list[Unit]:
    """The quantizable tensors of the text model, in order."""
    return [Unit(e.tensor.name, e.tensor.module, e.tensor.role, e.tensor.shape, e.tensor.layer, e.tensor.stacked)
            for e in plan.entries if e.tensor.role.quantizable and e.tensor.scope == SCOPE_MODEL]


@dataclass
class Sensitivity:
    mode: str
    source: str
    calib: dict  # what the windows were: {"spec", "windows", "ctx", "tokens_hash"}
    dtype: str
    units: dict  # unit name -> {"role", "shape", "options": {option key: dKL}}

    def dkl(self, unit: str, option: Option) -> float:
        return self.units[unit]["options"][option.key]

    def to_json(self) -> dict:
        return {"format": FORMAT, "mode": self.mode, "source": self.source, "calib": self.calib,
                "dtype": self.dtype, "units": self.units}

    def save(self, path: Path) -> None:
        text = json.dumps(self.to_json(), indent=1)
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: Path) -> "Sensitivity":
        path = Path(path)
        if not path.exists():
            raise MixquantError(f"{path}: sensitivity file not found")
        try:
            data = read_json(path)
        except MixquantError as e:
            raise MixquantError(f"{path}: not a readable sensitivity file ({str(e).removeprefix(f'{path}: ')})") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise MixquantError(f"{path}: not a readable sensitivity file (not a {FORMAT} file)")
        for key, kind in (("mode", str), ("source", str), ("calib", dict), ("dtype", str), ("units", dict)):
            if not isinstance(data.get(key), kind):
                raise MixquantError(f"{path}: not a readable sensitivity file ({key!r} must be a {kind.__name__})")
        for name, unit in data["units"].items():
            _check_unit(unit, f"{path}: {name}")
        return cls(data["mode"], data["source"], data["calib"], data["dtype"], data["units"])

    def check_covers(self, units: list[Unit], where) -> None:
        missing = [u.name for u in units if u.name not in self.units]
        if missing:
            raise MixquantError(f"{where}: has no sensitivity for {missing[0]}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                                "it was measured on another model")


MIN_DKL = -1e-6  # a KL divergence's increase is >= 0 but for float round-off


def _check_unit(unit, where: str) -> None:
    if not isinstance(unit, dict) or not isinstance(unit.get("options"), dict):
        raise MixquantError(f"{where}: must be an object with 'options' (option -> dKL)")
    shape = unit.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                              for d in shape):
        raise MixquantError(f"{where}: 'shape' must be a list of positive integers")
    for key, value in unit["options"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value) \
                or value < MIN_DKL:
            raise MixquantError(f"{where}: option {key} has dKL {value!r} (must be a finite number >= 0)")


def fake_quantized(w: np.ndarray, option: Option, dtype) -> np.ndarray:
    """w as it reads back after being stored with `option` (float32)."""
    import mlx.core as mx

    from mixquant.quant.fit import fake_quantize

    if option.bits is None:
        return np.array(mx.array(w).astype(dtype).astype(mx.float32))
    flat = w.reshape(-1, w.shape[-1])
    return fake_quantize(flat, option.bits, option.group_size, dtype).reshape(w.shape)


def _start_layer(unit: Unit, n_layers: int) -> int:
    if unit.layer is not None:
        return unit.layer
    return 0 if unit.role == Role.EMBED else n_layers


def _kl(ref_lp, logits):
    import mlx.core as mx

    q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return (mx.exp(ref_lp) * (ref_lp - q)).sum(-1)


def measure(model, windows: np.ndarray, units: list[Unit], dtype, results: dict, options_of=None, saved=None,
            progress=None, group=None) -> dict:
    """Fill `results` (unit name -> {option key: dKL}) for the units it lacks; `saved()` is called
    after each unit (under a group, each round). `model` is the unquantized model in float32.
    group (mixquant.distributed): the units go to ranks by cost, each measured on every window as
    one process would; after each round (one unit a rank) every rank gets every rank's figures, so
    `saved` sees all finished units."""
    import mlx.core as mx

    from mixquant.calib.runner import LayerRunner
    from mixquant.distributed import by_cost, from_rank, rank

    options_of = options_of or (lambda u: all_options(u.shape[-1]))
    modules = dict(model.named_modules())
    todo = [u for u in units if u.name not in results]
    if not todo:
        return results
    runner = LayerRunner(model, windows)
    try:
        runner.keep_all()
        refs = [lg - mx.logsumexp(lg, axis=-1, keepdims=True) for lg in runner.logits(0)]
        mx.eval(refs)
        n_layers = len(runner.layers)
        owner = by_cost([(n_layers + 1 - _start_layer(u, n_layers)) * len(options_of(u)) for u in todo], group)
        queues = [[u for u, o in zip(todo, owner) if o == r] for r in range(max(owner) + 1)]
        done = 0
        for k in range(max(len(q) for q in queues)):
            mine = queues[rank(group)][k:k + 1] if rank(group) < len(queues) else []
            figures = [np.array([_measure_one(runner, modules, refs, u, n_layers, options_of, dtype)
                                 for u in mine], np.float64)]
            for r, queue in enumerate(queues):
                if k < len(queue):
                    u = queue[k]
                    values = from_rank(figures if r == rank(group) else None, r, 1, group)[0].reshape(-1)
                    results[u.name] = dict(zip([o.key for o in options_of(u)], values.tolist()))
                    done += 1
            if saved:
                saved()
            if progress:
                progress(done, len(todo))
    finally:
        runner.unwrap()
    return results


def _measure_one(runner, modules, refs, u: Unit, n_layers: int, options_of, dtype) -> list[float]:
    """Unit u's mean KL against `refs` for each of its options, stored as it reads back."""
    import mlx.core as mx

    module = modules[u.module]
    original = module.weight
    w = np.array(original.astype(mx.float32))
    out = []
    try:
        for option in options_of(u):
            module.weight = mx.array(fake_quantized(w, option, dtype))
            kls = [_kl(ref, lg) for ref, lg in zip(refs, runner.logits(_start_layer(u, n_layers)))]
            out.append(float(mx.concatenate(kls).mean()))
    finally:
        module.weight = original
    return out


# --- proxy -------------------------------------------------------------------------------------

def _probe_classes():
    import mlx.core as mx

    from mixquant.wrap import Wrapper

    class Probe(Wrapper):
        """Wraps a Linear / SwitchLinear / Embedding: adds a zero `delta` to its output (whose gradient
        is the output gradient) and keeps its input, for one forward."""

        def __init__(self, inner):
            super().__init__(inner)
            self._delta = {}  # call kind -> zeros of the output's shape
            self._seen = {}  # call kind -> (input, extra) of the last forward
            self._shape = {}  # call kind -> the output's shape

        def _out(self, kind, y, seen):
            self._seen[kind] = seen
            self._shape[kind] = y.shape
            d = self._delta.get(kind)
            return y if d is None else y + d

        def __call__(self, x, *args, **kwargs):
            y = self.inner(x, *args, **kwargs)
            return self._out("call", y, (mx.stop_gradient(x), args[0] if args else None))

        def as_linear(self, x):
            return self._out("as_linear", self.inner.as_linear(x), (mx.stop_gradient(x), None))

    return Probe


def proxy(model, windows: np.ndarray, units: list[Unit], dtype, options_of=None, seed: int = 0,
          progress=None, after_gptq: bool = False, group=None) -> dict:
    """unit name -> {option key: estimated dKL}, from one forward and backward pass per window.
    With `after_gptq` the linears GPTQ rounds are priced after it: each one's quantized options
    scaled by gptq_ratio of its input Hessian, accumulated here (hessian_bytes of memory).
    group (mixquant.distributed): each rank runs a block of the windows (each window sampled with
    the key it has alone) and the float64 sums are added over the ranks."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import SwitchLinear

    options_of = options_of or (lambda u: all_options(u.shape[-1]))
    modules = dict(model.named_modules())
    Probe = _probe_classes()
    probes = {u.module: Probe(modules[u.module]) for u in units}
    model.update_modules(tree_unflatten(list(probes.items())))
    # per module and call kind: sum over tokens of squared output gradients and of squared inputs
    g_sum: dict = {}
    x_sum: dict = {}
    count: dict = {}
    modes: dict = {}  # (module, call kind) -> LINEAR | EXPERTS | LOOKUP
    n_tokens = 0
    hessians = {} if after_gptq else None
    key = mx.random.key(seed)
    training = model.training
    model.train()  # mlx-lm's fused Gated DeltaNet kernel has no vjp; its ops path does
    mine = owned(len(windows), group)
    try:
        for k, window in enumerate(windows):
            key, sub = mx.random.split(key)
            if k not in mine:
                continue
            tokens = mx.array(np.asarray(window, dtype=np.int32)[None])
            for p in probes.values():
                p._delta = {}
            logits = model(tokens)
            labels = mx.random.categorical(logits.astype(mx.float32), key=sub)  # the model's own tokens
            shapes = {(m, kind): p._shape[kind] for m, p in probes.items() for kind in p._seen}
            keys = sorted(shapes)
            deltas = [mx.zeros(shapes[k]) for k in keys]

            def loss_fn(ds):
                for (m, kind), d in zip(keys, ds):
                    probes[m]._delta[kind] = d
                lg = model(tokens).astype(mx.float32)
                lp = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
                return -mx.take_along_axis(lp, labels[..., None], axis=-1).sum()

            _, grads = mx.value_and_grad(loss_fn)(deltas)
            mx.eval(grads)
            n_tokens += tokens.size
            for (m, kind), g in zip(keys, grads):
                x, extra = probes[m]._seen[kind]
                inner = probes[m].inner
                mode = (EXPERTS if isinstance(inner, SwitchLinear) else
                        LOOKUP if isinstance(inner, nn.Embedding) and kind == "call" else LINEAR)
                modes[(m, kind)] = mode
                xs = np.array(x.astype(mx.float32), dtype=np.float64)
                _accumulate(g_sum, x_sum, count, (m, kind), mode, np.array(g, dtype=np.float64), xs,
                            None if extra is None else np.array(extra), inner.weight.shape[0])
                if hessians is not None and mode == LINEAR and kind == "call":
                    flat = xs.reshape(-1, xs.shape[-1])
                    _add(hessians, m, flat.T @ flat)
            if progress:
                progress(k + 1 - mine.start, len(mine) + 1)
    finally:
        model.update_modules(tree_unflatten([(m, p.inner) for m, p in probes.items()]))
        model.train(training)
    if group is not None:
        n_tokens = _sum_over_ranks([g_sum, x_sum, count] + ([hessians] if hessians is not None else []),
                                   n_tokens, group)
    ratios = {m: gptq_ratio(h) for m, h in (hessians or {}).items()}
    results = {}
    for u in units:
        w = np.array(modules[u.module].weight.astype(mx.float32)).astype(np.float64)
        r = ratios.get(u.module, 1.0)
        results[u.name] = {o.key: _estimate(w, fake_quantized(w.astype(np.float32), o, dtype), u.module, modes,
                                            g_sum, x_sum, count, n_tokens) * (1.0 if o.bits is None else r)
                           for o in options_of(u)}
    if progress:
        progress(len(mine) + 1, len(mine) + 1)
    return results


def _sum_over_ranks(sums: list[dict], n_tokens: int, group) -> int:
    """Every rank's float64 sums added, in place (keys in sorted order: the same modules ran on
    every rank); returns the token count over all ranks."""
    keys = [(i, k) for i, d in enumerate(sums) for k in sorted(d)]
    arrays = [np.asarray(sums[i][k], np.float64) for i, k in keys] + [np.array(float(n_tokens))]
    *added, total = all_sum_each(arrays, group)
    for (i, k), a in zip(keys, added):
        sums[i][k] = a if a.ndim else float(a)
    return int(total)


LINEAR, EXPERTS, LOOKUP = "linear", "experts", "lookup"


def gptq_ratio(hessian: np.ndarray) -> float:
    """What GPTQ leaves of round-to-nearest's output error on a linear with input Hessian H, by
    GPTQ's own error analysis: compensating each column on the ones after it leaves only the part of
    its input not predicted by the inputs rounded before it, so a column's error weight falls from
    H_jj to the conditional variance L_jj^2 (H = L L^T, columns in GPTQ's act-order, H damped as GPTQ
    damps it). The ratio of the sums, for rounding errors of like size across columns."""
    from mixquant.quant.gptq import DAMP

    h = np.array(hessian, dtype=np.float64)
    d = np.diag(h).copy()
    live = d > 0
    if not live.any():
        return 1.0
    h = h[np.ix_(live, live)]
    d = d[live]
    h[np.diag_indices(len(d))] += DAMP * float(d.mean())
    order = np.argsort(-np.diag(h), kind="stable")
    chol = np.linalg.cholesky(h[np.ix_(order, order)])
    return float((np.diag(chol) ** 2).sum() / np.diag(h).sum())


def hessian_bytes(units: list[Unit]) -> int:
    """What the proxy's input Hessians of the linears take (float64)."""
    return sum(8 * u.shape[-1] ** 2 for u in units if u.role.kind == Kind.LINEAR)


def _accumulate(g_sum, x_sum, count, key, mode, g, x, indices, n_rows):
    """Sums over tokens of squared output gradients and squared inputs (and how many tokens)."""
    if mode == LOOKUP:  # embedding rows: x holds token ids; rows weighted by frequency, columns by mean G
        ids = x.astype(np.int64).reshape(-1)
        _add(x_sum, key, np.bincount(ids, minlength=n_rows).astype(np.float64))
        _add(g_sum, key, (g.reshape(-1, g.shape[-1]) ** 2).sum(0))
        _add(count, key, float(len(ids)))
    elif mode == EXPERTS:  # only the tokens routed to each expert
        idx = indices.reshape(-1)
        g2 = g.reshape(len(idx), -1) ** 2
        xs = x.reshape(-1, x.shape[-1])
        x2 = np.repeat(xs**2, len(idx) // len(xs), axis=0)
        gs, xsum = np.zeros((n_rows, g2.shape[1])), np.zeros((n_rows, x2.shape[1]))
        np.add.at(gs, idx, g2)
        np.add.at(xsum, idx, x2)
        _add(g_sum, key, gs)
        _add(x_sum, key, xsum)
        _add(count, key, np.bincount(idx, minlength=n_rows).astype(np.float64))
    else:
        _add(g_sum, key, (g.reshape(-1, g.shape[-1]) ** 2).sum(0))
        _add(x_sum, key, (x.reshape(-1, x.shape[-1]) ** 2).sum(0))
        _add(count, key, float(np.prod(x.shape[:-1])))


def _add(d, key, value):
    d[key] = d[key] + value if key in d else value


def _estimate(w, wq, module, modes, g_sum, x_sum, count, n_tokens) -> float:
    """1/2 sum_ij G_i I_j (wq - w)_ij^2 over every way the weight is used, per token."""
    delta2 = (wq.astype(np.float64) - w) ** 2
    total = 0.0
    for kind in ("call", "as_linear"):
        key = (module, kind)
        if key not in g_sum:
            continue
        g, x, n = g_sum[key], x_sum[key], count[key]
        if modes[key] == EXPERTS:  # per expert, over the tokens routed to it
            total += sum(0.5 * float(g[e] @ delta2[e] @ x[e]) / (n[e] * n_tokens)
                         for e in range(w.shape[0]) if n[e] > 0)
        elif modes[key] == LOOKUP:  # rows by token frequency, columns by the output's mean G
            total += 0.5 * float(x @ delta2 @ g) / (n * n_tokens)
        else:
            total += 0.5 * float(g @ delta2 @ x) / (n * n_tokens)
    return total
