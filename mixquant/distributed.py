"""Several processes as one, through MLX's own distributed layer (`mx.distributed`, started by
`mlx.launch`): which process this is, how a model is split across them (mlx-lm's own pipeline and
tensor splits), and the few collectives the commands need. One process alone (no launcher) is a
group of one: every function here is then the identity.

- Running (generate, bench, chat): every rank runs the same decode loop on its part of the model;
  the collectives inside mlx-lm's sharded forward give every rank the same logits, so the same
  tokens. Rank 0 alone prints.
- Calibrating (imatrix): windows are dealt to ranks in contiguous blocks, each rank sums its
  statistics in float64 and the partial sums are added with `all_sum`; rank 0 writes the output.
- Rounding (GPTQ, learned): float32 sums that must not depend on the number of ranks are added in
  the fixed order of a binary tree (Pairwise), each rank taking whole subtrees (tree_block); work
  on separate tensors goes to ranks by cost (by_cost) and comes back from its owner (from_rank).

Every rank must meet the collectives in the same order with the same shapes: a mismatch does not
fail, it hangs or adds the wrong bytes. Each collective here is evaluated on its own for that reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mixquant.errors import MixquantError

PIPELINE, TENSOR = "pipeline", "tensor"
SHARD_MODES = (PIPELINE, TENSOR)


@functools.cache
def world():
    """The group of every process mlx.launch started, or None when this process is alone (asked
    once: a process's launch does not change, and MLX is not asked again after a peer is lost)."""
    import mlx.core as mx

    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def rank(group=None) -> int:
    return 0 if group is None else group.rank()


def is_main(group=None) -> bool:
    return rank(group) == 0


@dataclass(frozen=True)
class Shard:
    """How a model is split: PIPELINE or TENSOR, over `group` (an mx.distributed.Group)."""
    mode: str
    group: object


def shard_for(mode: str | None, command: str) -> Shard | None:
    """The split `--shard mode` asks for (None: not split), or a one-line error where the flag and
    the launch disagree."""
    group = world()
    if mode is None:
        if group is not None:
            raise MixquantError(f"{command}: running as {group.size()} processes under mlx.launch; say how to split "
                                f"the model with --shard pipeline|tensor")
        return None
    if mode not in SHARD_MODES:
        raise MixquantError(f"--shard: pipeline or tensor, got {mode!r}")
    if group is None:
        raise MixquantError(f"--shard {mode}: needs 2 or more processes started by mlx.launch "
                            f"(e.g. mlx.launch -n 2 -- mixquant {command} ... --shard {mode}); this one is alone")
    return Shard(mode, group)


def shard_model(model, shard: Shard, where: str) -> None:
    """Split mlx-lm's `model` in place: by layers (pipeline; a rank keeps only its layers) or within
    layers (tensor; every rank keeps a slice of every layer)."""
    group = shard.group
    if shard.mode == PIPELINE:
        inner = getattr(model, "model", None)
        if not hasattr(inner, "pipeline"):
            raise MixquantError(f"{where}: mlx-lm's {type(model).__module__} model cannot be split by layers "
                                f"(no pipeline); try --shard tensor")
        try:
            inner.pipeline(group)
        except ValueError as e:
            raise MixquantError(f"{where}: --shard pipeline over {group.size()} processes: {e}") from None
        return
    if not hasattr(model, "shard"):
        raise MixquantError(f"{where}: mlx-lm's {type(model).__module__} model cannot be split within layers "
                            f"(no shard); try --shard pipeline")
    try:
        model.shard(group)
    except (AssertionError, ValueError) as e:
        raise MixquantError(f"{where}: --shard tensor over {group.size()} processes: "
                            f"{e or 'a dimension does not divide'}") from None


def owned(n: int, group=None) -> range:
    """The items of `n` this rank handles: a contiguous block, the first ranks one more where `n`
    does not divide."""
    if group is None:
        return range(n)
    base, extra = divmod(n, group.size())
    r = group.rank()
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def all_sum(values: np.ndarray, group=None) -> np.ndarray:
    """The sum over ranks of a NumPy array (float64 and int64 kept as they are), on the CPU."""
    if group is None:
        return values
    import mlx.core as mx

    dtype = {np.dtype(np.float64): mx.float64, np.dtype(np.int64): mx.int64}.get(values.dtype)
    out = mx.distributed.all_sum(mx.array(values, dtype=dtype), group=group, stream=mx.cpu)
    return np.array(out)


def least(value: int, group=None) -> int:
    """The least of every rank's integer `value`, on every rank."""
    if group is None:
        return value
    each = np.zeros(group.size(), np.int64)
    each[group.rank()] = value
    return int(all_sum(each, group).min())


def barrier(group=None) -> None:
    """Return once every rank has come here."""
    all_sum(np.zeros(1), group)


def all_sum_each(arrays: list[np.ndarray], group=None) -> list[np.ndarray]:
    """all_sum of each array (all of one dtype), in one collective."""
    if group is None:
        return arrays
    total = all_sum(np.concatenate([np.asarray(a).ravel() for a in arrays]), group)
    out, at = [], 0
    for a in arrays:
        a = np.asarray(a)
        out.append(total[at : at + a.size].reshape(a.shape))
        at += a.size
    return out


def halves(lo: int, hi: int) -> set[tuple[int, int]]:
    """The nodes (lo, hi) of the binary tree over positions lo..hi-1 whose every node is the sum of
    its two halves, the left one the longer where they differ."""
    nodes = {(lo, hi)}
    if hi - lo > 1:
        mid = _middle(lo, hi)
        nodes |= halves(lo, mid) | halves(mid, hi)
    return nodes


def _middle(lo: int, hi: int) -> int:
    """Where halves() splits lo..hi-1: the left half the longer."""
    return lo + (hi - lo + 1) // 2


class Pairwise:
    """Adds the values of positions lo..hi-1, given in order, in the fixed order of halves(lo, hi):
    the sum of a rank's block (a node of the tree over all positions) is then the same whichever
    rank computes it, and the blocks' sums added in the tree's order above them give one process's
    total bit for bit. Holds at most one partial sum per level of the tree."""

    def __init__(self, lo: int, hi: int):
        self._nodes = halves(lo, hi) if hi > lo else set()
        self._lo, self._stack = lo, []

    def add(self, value) -> None:
        start = self._stack[-1][1] if self._stack else self._lo
        item = (start, start + 1, value)
        while self._stack and (self._stack[-1][0], item[1]) in self._nodes:
            a, _, v = self._stack.pop()
            item = (a, item[1], v + item[2])
        self._stack.append(item)

    def partial(self) -> list:
        """The partial sums held now (to evaluate them as they come)."""
        return [v for _, _, v in self._stack]

    def total(self):
        """The sum (None: no values)."""
        assert len(self._stack) <= 1, "Pairwise: not every position was given"
        return self._stack[0][2] if self._stack else None


def tree_block(n: int, group=None) -> range:
    """This rank's positions of 0..n-1: for a group of 2^k ranks, the nodes k levels down halves(0, n)
    (possibly empty), so that Pairwise sums give one process's; for other sizes, owned(n, group)."""
    size = 1 if group is None else group.size()
    if size & (size - 1):
        return owned(n, group)
    lo, hi, r = 0, n, rank(group)
    while size > 1:
        mid = _middle(lo, hi)
        size //= 2
        lo, hi, r = (lo, mid, r) if r < size else (mid, hi, r - size)
    return range(lo, hi)


def pairwise_over_ranks(value, group=None):
    """The sum over ranks of each rank's Pairwise total of its tree_block (an MLX array, zeros where a
    rank had none), added in the tree's order: one process's Pairwise total."""
    if group is None:
        return value
    import mlx.core as mx

    mx.eval(value)  # one collective per evaluation: in a larger graph, ranks could meet them in different orders
    gathered = mx.distributed.all_gather(value[None], group=group, stream=mx.cpu)
    mx.eval(gathered)
    adder = Pairwise(0, group.size())
    for r in range(group.size()):
        adder.add(gathered[r])
    return adder.total()


def by_cost(costs: list[float], group=None) -> list[int]:
    """The rank each item goes to: the costliest first, each to the rank with the least work so far
    (the same answer on every rank)."""
    size = 1 if group is None else group.size()
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


_DTYPES = (np.float32, np.float64, np.uint32, np.int64, np.uint8, np.int32)


def from_rank(arrays: list[np.ndarray] | None, owner: int, count: int, group=None) -> list[np.ndarray]:
    """Rank `owner`'s `count` NumPy arrays on every rank (the others pass None): their dtypes and
    shapes first, then each array, added to the zeros of the other ranks."""
    if group is None:
        return arrays
    mine = group.rank() == owner
    header = np.zeros((count, 2 + 8), np.int64)
    if mine:
        for i, a in enumerate(arrays):
            header[i, :2] = _DTYPES.index(a.dtype.type), a.ndim
            header[i, 2 : 2 + a.ndim] = a.shape
    header = all_sum(header, group)
    out = []
    for i, (code, ndim, *shape) in enumerate(header.tolist()):
        dtype, shape = _DTYPES[code], tuple(shape[:ndim])
        values = np.ascontiguousarray(arrays[i]) if mine else np.zeros(shape, dtype)
        out.append(all_sum(values, group).astype(dtype, copy=False))
    return out


def rank0_windows(windows: np.ndarray, group, where: str, flag: str) -> np.ndarray:
    """Rank 0's calibration windows on every rank (the others pass None), at least one per rank
    (else a one-line error)."""
    windows = broadcast(windows, group)
    if group is not None and len(windows) < group.size():
        raise MixquantError(f"{where}: {len(windows)} calibration windows for {group.size()} processes; "
                            f"give more {flag} or fewer processes")
    return windows


def broadcast(values: np.ndarray, group=None) -> np.ndarray:
    """Rank 0's array on every rank (the others' `values` are not read)."""
    if group is None:
        return values
    return from_rank([values] if is_main(group) else None, 0, 1, group)[0]


def broadcast_json(value, group=None):
    """Rank 0's JSON-able `value` on every rank (the others' is not read)."""
    if group is None:
        return value
    import json

    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main(group) else None
    return json.loads(broadcast(data, group).tobytes())


def same_random_state(group=None) -> None:
    """Seed MLX's generator on every rank with rank 0's fresh seed, so that sampling draws alike."""
    if group is None:
        return
    import mlx.core as mx

    seed = np.array([np.random.SeedSequence().entropy % (1 << 62)], np.int64)
    mx.random.seed(int(broadcast(seed, group)[0]))


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class LocalRanks:
    """One command per rank started on this machine over MLX's ring backend, with the environment
    `mlx.launch --backend ring` gives each rank but without its terminal relay (which keeps a core
    busy polling). threads: OpenBLAS threads per rank; stdin: what every rank reads, as mlx.launch
    relays the terminal to each (one command alone runs as a lone process). Use as a context manager;
    wait() collects the results."""

    def __init__(self, argvs: list[list[str]], threads: int | None = 1, cwd=None, stdin: str = ""):
        import json
        import os
        import subprocess
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="mixquant-ranks-")
        tmp = self._tmp.name
        hostfile, given = os.path.join(tmp, "hosts.json"), os.path.join(tmp, "stdin")
        with open(given, "w") as f:
            f.write(stdin)
        with open(hostfile, "w") as f:
            json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(len(argvs))], f)
        self.procs, self._logs = [], []
        for r, argv in enumerate(argvs):
            env = {**os.environ, **({"MLX_RANK": str(r), "MLX_HOSTFILE": hostfile} if len(argvs) > 1 else {})}
            if threads is not None:
                env["OPENBLAS_NUM_THREADS"] = str(threads)
            out, err = (open(os.path.join(tmp, f"{r}.{k}"), "w+") for k in ("out", "err"))
            self._logs.append((out, err))
            with open(given) as source:
                self.procs.append(subprocess.Popen(argv, stdout=out, stderr=err, stdin=source, env=env, cwd=cwd))

    def wait(self, timeout: float, stop_others: bool = True) -> list[tuple[int | None, str, str]]:
        """(exit code, stdout, stderr) per rank. When a rank fails the others get SIGTERM, as
        mlx.launch does (unless not `stop_others`); past `timeout` seconds every rank still running
        is killed (exit code None)."""
        import subprocess
        import time

        deadline, codes = time.monotonic() + timeout, [None] * len(self.procs)
        while time.monotonic() < deadline and any(c is None for c in codes):
            codes = [p.poll() for p in self.procs]
            if stop_others and any(c not in (None, 0) for c in codes):
                for p in self.procs:
                    if p.poll() is None:
                        p.terminate()
                for p in self.procs:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                codes = [p.poll() for p in self.procs]
                break
            time.sleep(0.05)
        self.close()
        results = []
        for code, (out, err) in zip(codes, self._logs):
            out.seek(0)
            err.seek(0)
            results.append((code, out.read(), err.read()))
        return results

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        for out, err in self._logs:
            out.close()
            err.close()
        self._tmp.cleanup()


def run_local(argvs: list[list[str]], timeout: float, threads: int | None = 1, cwd=None,
              stop_others: bool = True, stdin: str = "") -> list[tuple[int | None, str, str]]:
    """LocalRanks(argvs, ...).wait(timeout, stop_others)."""
    with LocalRanks(argvs, threads, cwd, stdin) as ranks:
        return ranks.wait(timeout, stop_others)


LAUNCHED = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")  # what mlx.launch's backends set in each rank
STOP_GRACE_S = 5.0


def launched() -> bool:
    """Whether a launcher started this process as one rank of several (read from the environment,
    before MLX is imported)."""
    import os

    return any(k in os.environ for k in LAUNCHED)


def stop_on_terminate(say, grace: float = STOP_GRACE_S) -> None:
    """When a launcher stops this rank (SIGTERM: mlx.launch sends it to every rank once one has
    ended) while it waits inside a collective for a rank that is gone, Python's handler would never
    run: a watcher thread, woken by the signal itself, gives the main thread `grace` seconds to
    unwind, then calls say() and ends the process."""
    import os
    import signal
    import threading
    import time

    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch():
        while signal.SIGTERM not in os.read(read, 64):
            pass
        time.sleep(grace)
        say()
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="mixquant-stop", daemon=True).start()
