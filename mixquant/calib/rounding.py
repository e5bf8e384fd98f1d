"""GPTQ over a whole model, layer by layer, each layer seeing the inputs the layers before it
produce once quantized (sequential across layers; within a layer, every linear's Hessian comes from
the same run of the unquantized layer, as in the GPTQ paper's own code).

The unquantized model runs in float32 (mlx-lm's own classes). For decoder layer L, the runner
replays the kept states entering L and runs L alone, once per batch, collecting the Hessians of
all its linears (per expert for MoE: only the tokens routed to it); each linear is quantized with
GPTQ and its dequantized weights replace the float ones. Then the states entering L + 1 are
computed from the quantized layer. Memory holds one layer's Hessians. The embedding is
rounded to nearest (a lookup has no input to compensate on); the head is done last, on the final
states of the quantized model.

AWQ composes: a linear whose input columns AWQ scales by s is quantized as W s with the Hessian of
x / s, and its float stand-in is the dequantized W s divided by s again.

Learned rounding (mixquant.quant.learned) takes GPTQ's place in the decoder layers: layer L runs
alone on the kept states entering it (the quantized layers' outputs), with the arguments the model
passes it, and is trained towards the unquantized layer's output on the unquantized states, which
are carried along beside the kept ones. The head is still GPTQ's.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import numpy as np

from mixquant.arch.roles import Kind
from mixquant.arch.tensors import SCOPE_MODEL
from mixquant.distributed import all_sum

log = logging.getLogger(__name__)

HESSIAN_SHARE = 0.25  # of this machine's memory: the most a layer's expert Hessians take while summed


def _hooks():
    import mlx.core as mx

    from mixquant.distributed import Pairwise, pairwise_over_ranks
    from mixquant.wrap import Wrapper

    class Hessian(Wrapper):
        """Wraps a Linear or SwitchLinear, called once per batch this rank runs: sums x x^T of its
        inputs in MLX, float32 (per expert for a SwitchLinear: the rows routed to each expert
        gathered into one padded batch, one batched matmul for all experts), in one process's order
        whatever the ranks: the batches form `segments`, each this rank's tree_block of a segment
        (its batches come in that order), added in Pairwise order within each segment and over the
        ranks, then over the segments. Linears that read the same input in one run (q/k/v,
        gate/up) share its product: `grams` holds the products of the run in progress, cleared
        between runs. `experts` (a SwitchLinear's): the experts whose sums it keeps (all: None)."""

        grams: dict = {}

        def __init__(self, inner, n_mat: int, n_in: int, segments: list[range], experts: range | None = None):
            super().__init__(inner)
            self._experts = experts
            self._shape = (n_mat if experts is None else len(experts), n_in, n_in)
            self._adders = [(Pairwise(b.start, b.stop), len(b)) for b in segments]
            self._added = 0
            self._count = np.zeros(self._shape[0])

        def partial(self) -> list:
            return [v for adder, _ in self._adders for v in adder.partial()]

        def sums(self, group=None) -> tuple[np.ndarray, np.ndarray]:
            """(the sum of x x^T per matrix over every rank's batches, float64; rows per matrix)."""
            total = Pairwise(0, len(self._adders))
            for adder, _ in self._adders:
                mine = adder.total()
                total.add(pairwise_over_ranks(mx.zeros(self._shape) if mine is None else mine, group))
            return np.array(total.total(), dtype=np.float64), all_sum(self._count, group)

        def _add(self, gram) -> None:
            at = self._added
            for adder, n in self._adders:
                if at < n:
                    adder.add(gram)
                    break
                at -= n
            self._added += 1

        def __call__(self, x, *args, **kwargs):
            key = (id(x), id(args[0]) if args else None, self._experts)
            if key not in Hessian.grams:
                Hessian.grams[key] = (x, args, *_gram(x, args[0] if args else None, self._shape[0], self._experts))
            _, _, gram, per = Hessian.grams[key]
            self._add(gram)
            self._count += per
            return self.inner(x, *args, **kwargs)

    return Hessian


def _gram(x, indices, n_mat: int, experts: range | None = None):
    """(sum of x x^T over the rows of x [n_mat, n, n], rows per matrix): per expert for a SwitchLinear's
    `indices`, of the `experts` only where given (n_mat of them)."""
    import mlx.core as mx

    xs = x.astype(mx.float32)
    if indices is None:
        rows = xs.reshape(-1, xs.shape[-1])
        return (rows.T @ rows)[None], np.array([rows.shape[0]])
    while xs.ndim > indices.ndim + 1 and xs.shape[-2] == 1:
        xs = xs[..., 0, :]
    rows = mx.broadcast_to(xs, (*indices.shape, xs.shape[-1])).reshape(-1, xs.shape[-1])
    routed = np.array(indices).reshape(-1)
    width = max(int(np.bincount(routed).max()), 1)  # all experts': a chunk's products are those of the whole
    if experts is not None:
        kept = np.nonzero((routed >= experts.start) & (routed < experts.stop))[0]
        rows, routed = rows[mx.array(kept)], routed[kept] - experts.start
    return _routed_gram(rows, routed, n_mat, width), np.bincount(routed, minlength=n_mat)


def _routed_gram(rows, experts: np.ndarray, n_experts: int, width: int):
    """sum of x x^T over the rows routed to each expert [n_experts, n, n]: the rows gathered per expert
    into [n_experts, width (at least the most rows), n] (padded with a zero row), one batched matmul."""
    import mlx.core as mx

    order = np.argsort(experts, kind="stable")
    per = np.bincount(experts, minlength=n_experts)
    slots = np.full((n_experts, width), len(experts))  # the padding row
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    rank = np.arange(len(experts)) - np.repeat(starts, per)
    slots[experts[order], rank] = order
    padded = mx.concatenate([rows, mx.zeros((1, rows.shape[1]), dtype=rows.dtype)])
    gathered = padded[mx.array(slots)]
    return mx.swapaxes(gathered, 1, 2) @ gathered


def run_gptq(model, windows: np.ndarray, plan, dtype, awq_result=None, progress=None, streamed=None,
             learn_steps: int = 0, group=None, hessian_bytes: int | None = None) -> dict:
    """tensor name -> list (per part) of (packed codes, scales, biases) for every quantized linear
    and expert stack of the text model (not the embedding). With `streamed` (a
    mixquant.calib.streamed.StreamedModel, whose model `model` is), each decoder layer's weights are
    read just before its turn and dropped after it. With `learn_steps`, the decoder layers' rounding
    is learned (mixquant.quant.learned) instead, in that many steps per layer; the head's is GPTQ.

    group (mixquant.distributed; every rank passes the same `windows`): the batches of windows are
    dealt to the ranks in tree blocks (mixquant.distributed.tree_block), each rank runs its own; a
    layer's Hessians are added over the ranks in one process's order, its linears are dealt to the
    ranks by cost, each rank runs GPTQ on its own and every rank receives every result. Learned
    rounding runs one window at a time: each step's windows are split over the ranks and their
    gradients added in one process's order. Every rank returns the whole result, that of one process
    (bit for bit, for a group of 2^k ranks at equal BLAS threads).

    hessian_bytes (default: HESSIAN_SHARE of this machine's memory): where a layer's expert stacks'
    Hessians would take more while they are summed, the layer runs once per chunk of its experts,
    each run summing that chunk's alone; every expert's Hessian is the one it gets unchunked."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from mixquant.calib.runner import BATCH, LayerRunner
    from mixquant.distributed import by_cost, from_rank, least, rank, tree_block
    from mixquant.loading import memory_bytes
    from mixquant.quant import learned
    from mixquant.quant.distill import undo_vectors
    from mixquant.quant.gptq import pack_codes
    from mixquant.quant.gptq_mlx import gptq_stack

    Hessian = _hooks()
    modules = dict(model.named_modules())
    entries = {e.tensor.module: e for e in plan.entries
               if e.quantized and e.tensor.scope == SCOPE_MODEL and e.tensor.module in modules
               and e.tensor.role.kind != Kind.EMBEDDING}
    steps = [range(s, min(s + BATCH, len(windows))) for s in range(0, len(windows), BATCH)]
    if learn_steps:  # one window a run: a step's gradient adds its windows', whichever rank holds them
        blocks = [tree_block(len(s), group) for s in steps]
        held = [s.start + p for s, b in zip(steps, blocks) for p in b]
        runner = LayerRunner(model, windows, batches=[range(w, w + 1) for w in held])
        share = [(b, [held.index(s.start + p) for p in b], s) for s, b in zip(steps, blocks)]
        segments = blocks  # the head's Hessian: per step's batch, then over them
    else:  # whole batches: each one's sums are those of one process
        mine = tree_block(len(steps), group)
        runner = LayerRunner(model, windows, batches=[steps[b] for b in mine])
        segments = [mine]
    out: dict = {}

    def where(obj) -> str:  # the runner wraps the layers: paths move, the module objects stay
        return next(p for p, m in model.named_modules() if m is obj)

    def wrap(names, experts=None):
        hooks = {m: Hessian(modules[m], entries[m].tensor.n_matrices, entries[m].tensor.in_features, segments,
                            experts if entries[m].tensor.stacked else None) for m in names}
        model.update_modules(tree_unflatten([(where(modules[m]), h) for m, h in hooks.items()]))
        return hooks

    def unwrap(hooks):
        model.update_modules(tree_unflatten([(where(h), h.inner) for h in hooks.values()]))

    def quantize(names, hooks, experts=None):
        """GPTQ of `names` (of a stack, its `experts`) from their Hessians summed over the ranks: each
        rank runs the ones by_cost deals it, then every rank receives every result: name ->
        [packed codes, scales, biases, float stand-ins], each [parts, ...]."""
        owners = by_cost([_cost(entries[m].tensor, experts) for m in names], group)
        hessians, done = {}, {}
        for m, owner in zip(names, owners):
            sums, counts = hooks[m].sums(group)
            if group is None:  # alone: each Hessian is used as it comes, and dropped
                done[m] = gptq_of(m, _mean(sums, counts), experts)
            elif owner == rank(group):
                hessians[m] = _mean(sums, counts)
        if group is None:
            return done
        done = {m: gptq_of(m, h, experts) for m, h in hessians.items()}
        return {m: from_rank(done.get(m), owner, 4, group) for m, owner in zip(names, owners)}

    def keep_parts(name, result):
        packed, s, b, deq = result
        keep(name, list(zip(packed, s, b)), list(deq))

    def gptq_of(name, hessians, experts=None):
        """[packed codes, scales, biases, float stand-ins] of the stack `name` (its `experts`), each
        [parts, ...]."""
        entry = entries[name]
        t = entry.tensor
        w = np.array(modules[name].weight.astype(mx.float32))
        first = 0
        if t.stacked and experts is not None:
            w, first = w[experts.start : experts.stop], experts.start
        ws, hs, opss = [], [], []
        for p, wp in enumerate(w if t.stacked else [w], first):
            ops = awq_result.for_part(t.name, p) if awq_result else []
            wp, h = _scaled(ops, wp, hessians[p - first])
            ws.append(wp)
            hs.append(h)
            opss.append(ops)
        packed, s, b, deq = gptq_stack(np.stack(ws), np.stack(hs), entry.bits, entry.group_size, dtype)
        return [packed, s, b, np.stack([_unscaled(ops, d) for ops, d in zip(opss, deq)])]

    def keep(name, parts, deqs):
        """The module's encoding (per part), and its dequantized weights as its float stand-in."""
        out[entries[name].tensor.name] = parts
        modules[name].weight = mx.array(np.stack(deqs) if entries[name].tensor.stacked else deqs[0])

    def gptq_layer(layer, names):
        """GPTQ for the layer's `names`, every Hessian from the same runs of the unquantized layer
        (one set of runs per chunk of experts, see expert_chunks); with chunks, the float stand-ins
        replace the layer's weights once all are done."""
        stacks = [entries[m].tensor for m in names if entries[m].tensor.stacked]
        chunks, results = expert_chunks(stacks, len(steps), budget), {}  # the same on every rank
        for c, experts in enumerate(chunks):
            now = [m for m in names if c == 0 or entries[m].tensor.stacked]
            hooks = wrap(now, experts)
            for w in range(runner.n_batches):
                runner.run_to(layer, w)
                mx.eval([h.partial() for h in hooks.values()])
                Hessian.grams.clear()
            unwrap(hooks)
            for m, result in quantize(now, hooks, experts).items():
                if len(chunks) == 1:
                    keep_parts(m, result)
                else:
                    results.setdefault(m, []).append(result)
        for m, parts in results.items():
            keep_parts(m, [np.concatenate(arrays) for arrays in zip(*parts)])

    def learn(layer, names, float_in):
        """Learned rounding of the layer's `names`, trained on the kept states entering it towards the
        unquantized layer's outputs on `float_in` (the unquantized states entering it); returns those
        outputs, the unquantized states entering the next layer."""
        calls = [runner.call_of(layer, w) for w in range(runner.n_batches)]
        inner = runner.layers[layer].inner
        targets = [inner(x, *a, **k) for x, (_, a, k) in zip(float_in, calls)]
        mx.eval(targets)
        learners = {}
        for name in names:
            t = entries[name].tensor
            w = np.array(modules[name].weight.astype(mx.float32))
            start = [fit_start(entries[name], p, wp) for p, wp in enumerate(w if t.stacked else [w])]
            scaled, s0, b0 = (np.stack(x) if t.stacked else x[0] for x in zip(*start))
            row_mul, col_mul = undo_vectors(awq_result, t.name, t)
            kind = "experts" if t.stacked else "linear"
            bias = modules[name]["bias"] if "bias" in modules[name] else None
            learners[name] = Learner(scaled, s0, b0, entries[name].group_size, entries[name].bits, kind,
                                     row_mul, col_mul, bias)
        model.update_modules(tree_unflatten([(where(modules[m]), lr) for m, lr in learners.items()]))
        training = model.training
        model.train()
        try:
            learned.train_layer(inner, calls, targets, list(learners.values()), learn_steps, seed=layer,
                                share=share, group=group)
        finally:
            model.train(training)
            model.update_modules(tree_unflatten([(where(lr), modules[m]) for m, lr in learners.items()]))
        for name, learner in learners.items():
            t = entries[name].tensor
            q, s, b, deq = learned.encoding(learner)
            parts = zip(q, s, b) if t.stacked else [(q, s, b)]
            keep(name, [(pack_codes(qp, entries[name].bits), sp, bp) for qp, sp, bp in parts],
                 [_unscaled(awq_result.for_part(t.name, p) if awq_result else [], d)
                  for p, d in enumerate(deq if t.stacked else [deq])])
        return targets

    def fit_start(entry, p, w):
        """Part p's weight as AWQ scales it, and the scales and biases of its rounding to nearest."""
        from mixquant.quant import awq

        w, (_, s, b) = awq.nearest(awq_result, entry.tensor.name, p, w, entry.bits, entry.group_size, dtype)
        return w, np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))

    Learner = learned.learner_class() if learn_steps else None
    float_states = None
    budget = least(hessian_bytes if hessian_bytes is not None else int(HESSIAN_SHARE * memory_bytes()), group)

    # a streamed model reads its weights for the block that uses them; a loaded model holds them all along
    outer = streamed.outer if streamed is not None else nullcontext
    layer_weights = streamed.layer if streamed is not None else (lambda layer: nullcontext())

    try:
        n_layers = len(runner.layers)
        with outer():
            if learn_steps:  # the unquantized states start from the float embedding
                float_states = [runner.call_of(0, w)[0] for w in range(runner.n_batches)]
                mx.eval(float_states)
            with _rounded_embedding(model, plan, awq_result, dtype) if learn_steps else nullcontext():
                for layer in range(n_layers):
                    with layer_weights(layer):
                        names = [m for m, e in entries.items() if e.tensor.layer == layer]
                        if learn_steps:
                            float_states = learn(layer, names, float_states)
                        else:
                            gptq_layer(layer, names)
                        runner.advance(layer)
                    runner.inputs[layer] = None  # the states entering the next layer replace them
                    if progress:
                        progress(layer + 1, n_layers + 1)
                heads = [m for m, e in entries.items() if e.tensor.layer is None]
                if heads:
                    hooks = wrap(heads)
                    runner.logits(n_layers)
                    Hessian.grams.clear()
                    unwrap(hooks)
                    for m, result in quantize(heads, hooks).items():
                        keep_parts(m, result)
        if progress:
            progress(n_layers + 1, n_layers + 1)
    finally:
        runner.unwrap()
    return out


@contextmanager
def _rounded_embedding(model, plan, awq_result, dtype):
    """For the block, the embedding as it will be written (rounded to nearest): learned rounding
    starts the quantized layers' states from it, so layer 0 learns to make up for its error too."""
    import mlx.core as mx

    from mixquant.quant import fit
    from mixquant.wrap import Wrapper

    modules = dict(model.named_modules())
    entry = next((e for e in plan.entries if e.tensor.role.kind == Kind.EMBEDDING and e.quantized
                  and e.tensor.scope == SCOPE_MODEL and e.tensor.module in modules), None)
    if entry is None:
        yield
        return
    module = modules[entry.tensor.module]
    while isinstance(module, Wrapper):
        module = module.inner
    original = module.weight
    importance = awq_result.fit_for(entry.tensor.name, 0) if awq_result else None
    module.weight = mx.array(fit.fake_quantize(np.array(original.astype(mx.float32)), entry.bits, entry.group_size,
                                               dtype, importance))
    try:
        yield
    finally:
        module.weight = original


def expert_chunks(stacks: list, n_batches: int, budget: int) -> list:
    """Ranges of experts small enough that the Hessians of a layer's expert `stacks` (tensors), each
    held while summed as up to one float32 partial per level of the tree over `n_batches` batches and
    then in float64, fit in `budget` bytes; [None] where they fit whole (or there are no stacks, or
    stacks of different sizes)."""
    if not stacks or len({t.n_matrices for t in stacks}) > 1:
        return [None]
    n_exp = stacks[0].n_matrices
    levels = int(np.ceil(np.log2(max(n_batches, 1)))) + 1
    per_expert = sum(t.in_features ** 2 for t in stacks) * (4 * levels + 8)
    size = max(1, min(n_exp, budget // per_expert))
    return [None] if size >= n_exp else [range(lo, min(lo + size, n_exp)) for lo in range(0, n_exp, size)]


def _mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each matrix's Hessian: its sum of x x^T divided by its rows (zeros where it had none)."""
    return sums / np.maximum(counts, 1.0)[:, None, None]


def _cost(t, experts: range | None = None) -> float:
    """GPTQ's work on a tensor (of a stack, its `experts`), up to a constant: per matrix, the inverse
    of its Hessian (n^3) and the column pass over its rows (rows x n^2)."""
    n = t.in_features
    matrices = len(experts) if experts is not None and t.stacked else t.n_matrices
    return float(matrices) * n * n * (n + t.shape[-2])


def _scaled(ops, w, h):
    """The tensor and Hessian AWQ's ops make: columns scaled by s see inputs divided by s."""
    from mixquant.quant import awq

    w = awq.apply(ops, w, 0)
    for op, vec in ops:
        if op == "cols":
            h = h / np.outer(vec, vec)
    return w, h


def _unscaled(ops, deq):
    from mixquant.quant import awq

    return awq.undo(ops, deq).astype(np.float32)
