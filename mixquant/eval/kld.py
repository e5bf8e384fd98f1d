"""KL divergence and perplexity of a candidate against a reference, llama-perplexity style.

The text is cut into consecutive windows of `ctx` tokens; in each, the second half is scored
(positions ctx/2 .. ctx-2, each predicting the next token), so every scored token has at least
ctx/2 tokens of context. The reference's log-probabilities for those positions are computed once
and can be saved (full, or top-K with the tail mass) so that many candidates reuse them.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.bundled import EVAL_TEXT
from mixquant.errors import MixquantError
from mixquant.io.atomic import atomic_write
from mixquant.io.textfile import parse_json, read_text
from mixquant.eval import metrics
from mixquant.loading import (count_parameters, default_dequantize, load, load_tokenizer, memory_bytes,
                              text_weight_bytes)
from mixquant.vocab import check_token_ids, embedding_rows

REFERENCE_FORMAT = "mixquant-reference-v2"  # v2: with the tokenizer's fingerprint
AUTO_FULL_LIMIT_BYTES = 1 << 30  # keep full reference distributions while they fit in 1 GiB
AUTO_TOPK = 256


def scored_slice(ctx: int) -> slice:
    return slice(ctx // 2, ctx - 1)


def forward_logits(model, window: np.ndarray) -> np.ndarray:
    """Logits [ctx, V] of one window. Every model forward of the evaluation goes through here."""
    import mlx.core as mx

    out = model(mx.array(window[None].astype(np.int32)))
    return np.array(out[0].astype(mx.float32))


def window_logprobs(model, window: np.ndarray, ctx: int) -> np.ndarray:
    return metrics.log_softmax(forward_logits(model, window)[scored_slice(ctx)])


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the token -> id map (added tokens included): two models can be compared token by
    token only when theirs are equal."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def check_same_tokenizer(model_path: Path, tokenizer, expected: str, reference: str) -> None:
    got = tokenizer_fingerprint(tokenizer)
    if got != expected:
        raise MixquantError(f"{model_path}: its tokenizer differs from the reference's ({reference}): token ids "
                            f"would not line up (fingerprints {got} and {expected})")


def make_windows(tokens: list[int] | np.ndarray, ctx: int, chunks: int | None) -> np.ndarray:
    if ctx < 4:
        raise MixquantError(f"--ctx: must be at least 4, got {ctx}")
    if chunks is not None and chunks < 1:
        raise MixquantError(f"--chunks: must be at least 1, got {chunks}")
    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens) // ctx
    if chunks is not None:
        n = min(n, chunks)
    if n == 0:
        raise MixquantError(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    return tokens[: n * ctx].reshape(n, ctx)


def read_eval_text(path: Path | None) -> tuple[str, str]:
    path = Path(path) if path else EVAL_TEXT
    if not path.exists():
        raise MixquantError(f"{path}: text file not found")
    return read_text(path), path.name


@dataclass
class Reference:
    """The reference side of an evaluation, per window: full log-probs, or top-K + target log-prob."""

    windows: np.ndarray  # [n, ctx] int32
    n_params: int
    source: str
    text: str
    topk: int  # 0: full distributions
    tokenizer: str  # tokenizer_fingerprint of the reference model
    full: list[np.ndarray] = field(default_factory=list)  # [n_scored, V] float32
    top_ids: list[np.ndarray] = field(default_factory=list)  # [n_scored, K] int32
    top_lp: list[np.ndarray] = field(default_factory=list)  # [n_scored, K] float32
    target_lp: list[np.ndarray] = field(default_factory=list)  # [n_scored] float32

    @property
    def ctx(self) -> int:
        return int(self.windows.shape[1])

    def add(self, lp: np.ndarray, targets: np.ndarray) -> None:
        if self.topk == 0:
            self.full.append(lp.astype(np.float32))
            return
        k = min(self.topk, lp.shape[-1])
        ids = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(lp, ids, -1), axis=-1)
        ids = np.take_along_axis(ids, order, -1)
        self.top_ids.append(ids.astype(np.int32))
        self.top_lp.append(np.take_along_axis(lp, ids, -1).astype(np.float32))
        self.target_lp.append(lp[np.arange(len(targets)), targets].astype(np.float32))

    def compare(self, i: int, q_lp: np.ndarray) -> dict[str, np.ndarray]:
        targets = self.windows[i][scored_slice(self.ctx).start + 1 :]
        if self.topk == 0:
            return metrics.token_metrics(self.full[i].astype(np.float64), q_lp, targets)
        return metrics.token_metrics_topk(
            self.top_ids[i], self.top_lp[i].astype(np.float64), self.target_lp[i], q_lp, targets
        )

    def save(self, path: Path) -> None:
        path = Path(path)
        arrays = {
            "format": np.array(REFERENCE_FORMAT),
            "meta": np.array(json.dumps({"n_params": self.n_params, "source": self.source, "text": self.text,
                                         "topk": self.topk, "tokenizer": self.tokenizer})),
            "windows": self.windows,
        }
        if self.topk == 0:
            arrays["full"] = np.stack(self.full)
        else:
            arrays.update(top_ids=np.stack(self.top_ids), top_lp=np.stack(self.top_lp),
                          target_lp=np.stack(self.target_lp))
        # np.savez_compressed appends .npz to names that lack it
        atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays), suffix=".partial.npz")

    @classmethod
    def load(cls, path: Path) -> "Reference":
        path = Path(path)
        try:
            shapes = _member_shapes(path)
            data = np.load(path, allow_pickle=False)
            if str(data["format"]) != REFERENCE_FORMAT:
                raise MixquantError(f"{path}: not a {REFERENCE_FORMAT} reference file ({data['format']}); save the "
                                    "reference again with this version")
            meta = parse_json(str(data["meta"]), f"{path}: meta")
            if not isinstance(meta, dict):
                raise MixquantError(f"{path}: meta is not a JSON object")
            _check_shapes(path, shapes, "full" in shapes)
            ref = cls(data["windows"], meta["n_params"], meta["source"], meta["text"], meta["topk"],
                      meta["tokenizer"])
            if ref.topk == 0:
                ref.full = list(data["full"])
            else:
                ref.top_ids, ref.top_lp, ref.target_lp = list(data["top_ids"]), list(data["top_lp"]), list(
                    data["target_lp"])
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            raise MixquantError(f"{path}: not a readable mixquant reference file ({e})") from None
        ref.validate(path)
        return ref

    def validate(self, path) -> None:
        """The numbers a saved reference holds must be ones an evaluation could have written."""
        if self.windows.size and self.windows.min() < 0:
            raise MixquantError(f"{path}: negative token id {int(self.windows.min())} in its windows")
        if not (isinstance(self.topk, int) and self.topk >= 0):
            raise MixquantError(f"{path}: topk must be a whole number >= 0, got {self.topk!r}")
        for name, arrays in (("full", self.full), ("top_lp", self.top_lp), ("target_lp", self.target_lp)):
            for a in arrays:
                if np.isnan(a).any() or (a > 1e-3).any():
                    raise MixquantError(f"{path}: {name} holds values that are not log-probabilities (NaN or > 0)")
        for ids in self.top_ids:
            if ids.size and ids.min() < 0:
                raise MixquantError(f"{path}: negative token id in top_ids")


REFERENCE_ARRAYS = {  # name -> (dimensions, dtype kind): i integer, f float, U text
    "format": (0, "U"), "meta": (0, "U"), "windows": (2, "i"),
    "full": (3, "f"), "top_ids": (3, "i"), "top_lp": (3, "f"), "target_lp": (2, "f"),
}


def _member_shapes(path: Path) -> dict[str, tuple[tuple, np.dtype]]:
    """Shape and dtype of every array in a saved reference, read from the npy headers alone."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in readers:
                    raise ValueError(f"{name}: npy format {version} is not one np.savez writes")
                shape, _, dtype = readers[version](f, max_header_size=1 << 16)
                header = f.tell()
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if header + declared != info.file_size:
                raise MixquantError(f"{path}: {name!r} declares {declared / 2**30:.2f} GiB but holds "
                                    f"{(info.file_size - header) / 2**30:.2f} GiB")
            if info.file_size > MAX_RATIO_FROM and info.file_size > MAX_RATIO * info.compress_size:
                raise MixquantError(f"{path}: {name!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                                    "when read; no saved reference compresses that far")
            out[name] = (shape, dtype)
    return out


MAX_RATIO, MAX_RATIO_FROM = 32, 16 << 20  # log-probabilities compress about 1.1x; ids a few times


def _check_shapes(path: Path, shapes: dict, full: bool) -> None:
    """Every array of the right rank and kind, consistent with the windows, and all of them
    together within half this machine's memory, before any is read."""
    need = ["format", "meta", "windows"] + (["full"] if full else ["top_ids", "top_lp", "target_lp"])
    for name in need:
        if name not in shapes:
            raise MixquantError(f"{path}: has no {name!r} array")
        rank, kind = REFERENCE_ARRAYS[name]
        shape, dtype = shapes[name]
        if len(shape) != rank or dtype.kind != kind and not (kind == "i" and dtype.kind == "u"):
            raise MixquantError(f"{path}: {name!r} is {dtype}{list(shape)}, not a {rank}-d {kind} array")
    n, ctx = shapes["windows"][0]
    scored = len(range(*scored_slice(ctx).indices(ctx)))
    for name in need[3:]:
        shape = shapes[name][0]
        if tuple(shape[:2]) != (n, scored):
            raise MixquantError(f"{path}: {name!r} has shape {list(shape)}, but {n} windows of {ctx} tokens "
                                f"score [{n}, {scored}]")
    if full and shapes["full"][0][2] < 2:
        raise MixquantError(f"{path}: 'full' has a vocabulary of {shapes['full'][0][2]}")
    declared = sum(int(np.prod(shape, dtype=np.float64)) * dtype.itemsize for shape, dtype in shapes.values())
    if declared > memory_bytes() // 2:
        raise MixquantError(f"{path}: declares {declared / 2**30:.1f} GiB of arrays, more than half this machine's "
                            "memory")


def resolve_topk(topk: str | int, n_windows: int, ctx: int, vocab: int) -> int:
    if topk == "auto":
        full_bytes = n_windows * len(range(*scored_slice(ctx).indices(ctx))) * vocab * 4
        return 0 if full_bytes <= AUTO_FULL_LIMIT_BYTES else AUTO_TOPK
    try:
        k = int(topk)
    except ValueError:
        raise MixquantError(f"--topk: expected auto or a number, got {topk!r}") from None
    if k < 0:
        raise MixquantError(f"--topk: must be >= 0, got {k}")
    return k


def compute_reference(ref_path: Path, text_path: Path | None, ctx: int, chunks: int | None,
                      topk: str | int = "auto", progress=None, check_model: Path | None = None) -> Reference:
    """Run the reference model (float32) over the text's windows. An HF or GGUF reference runs one
    decoder layer at a time (read from the source as its turn comes), so it need not fit in memory;
    an MLX folder is loaded whole. With `check_model`, that model's tokenizer is compared with the
    reference's before anything runs."""
    from mixquant.calib.streamed import float_model, streamed_logits

    text, text_name = read_eval_text(text_path)
    resolve_topk(topk, 1, ctx, 1)  # a bad --topk fails before the model runs
    model, tokenizer, config, streamed = float_model(Path(ref_path))
    fingerprint = tokenizer_fingerprint(tokenizer)
    if check_model is not None:
        check_same_tokenizer(Path(check_model), load_tokenizer(Path(check_model)), fingerprint, str(ref_path))
    windows = make_windows(tokenizer.encode(text), ctx, chunks)
    check_token_ids(windows, embedding_rows(config, ref_path), text_name)
    if streamed is None:
        logits = (forward_logits(model, w) for w in windows)
    else:
        logits = streamed_logits(streamed, windows, progress)  # progress: by layer
        progress = None
    ref = None
    for i, (window, out) in enumerate(zip(windows, logits)):
        lp = metrics.log_softmax(out[scored_slice(ctx)])
        if ref is None:
            ref = Reference(windows, count_parameters(model), str(ref_path), text_name,
                            resolve_topk(topk, len(windows), ctx, lp.shape[-1]), fingerprint)
        ref.add(lp, window[scored_slice(ctx).start + 1 :])
        if progress:
            progress(i + 1, len(windows))
    return ref


def evaluate(model_path: Path, reference: Reference, dequantize: bool | None = None, progress=None) -> dict:
    """The candidate's report against the reference, in the JSON shape `mixquant eval --json` writes."""
    model_path = Path(model_path)
    check_same_tokenizer(model_path, load_tokenizer(model_path), reference.tokenizer, reference.source)
    if dequantize is None:
        dequantize = default_dequantize()
    loaded = load(model_path, dequantize=dequantize)
    check_token_ids(reference.windows, embedding_rows(loaded.config, model_path), str(model_path))
    model = loaded.model
    chunks = []
    for i, window in enumerate(reference.windows):
        q_lp = window_logprobs(model, window, reference.ctx)
        chunks.append(reference.compare(i, q_lp))
        if progress:
            progress(i + 1, len(reference.windows))
    report = metrics.summarize(metrics.concat(chunks))
    size = text_weight_bytes(model_path)
    report.update(
        model=str(model_path),
        reference=reference.source,
        text=reference.text,
        ctx=reference.ctx,
        chunks=len(reference.windows),
        reference_topk=reference.topk,
        compute="float32 (dequantized weights)" if dequantize else "native kernels",
        size_bytes=size,
        bpw=8 * size / reference.n_params,
    )
    return report


def format_report(r: dict) -> str:
    k = r["kld"]
    return "\n".join([
        f"model: {r['model']}",
        f"reference: {r['reference']}   text: {r['text']}   {r['chunks']} x {r['ctx']} tokens, {r['tokens']} scored",
        f"size: {r['size_bytes'] / 1e9:.4f} GB   {r['bpw']:.3f} bits per weight   compute: {r['compute']}",
        f"KLD mean {k['mean']:.6f} ± {k['stderr']:.6f}   median {k['median']:.6f}   p90 {k['p90']:.6f}   "
        f"p95 {k['p95']:.6f}",
        f"    p99 {k['p99']:.6f}   p99.9 {k['p999']:.6f}   max {k['max']:.6f}",
        f"same top token: {100 * r['same_top']:.2f}%   Δp mean {r['delta_p']['mean']:+.5f}   "
        f"Δp RMS {r['delta_p']['rms']:.5f}",
        f"PPL {r['ppl']['model']:.4f} vs reference {r['ppl']['reference']:.4f} (ratio {r['ppl']['ratio']:.5f})",
    ])
