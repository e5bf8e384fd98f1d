"""A GGUF file as it is: its metadata, its tensor table, and its tensors' rows.

The header is parsed here with every count and length checked against the file's size before
anything is read or allocated, so a corrupt or hostile header is one MixquantError naming the
file, never a hang, a huge allocation or another exception. Tensor data is read with positioned
reads, a block of rows at a time, and dequantized with gguf-py's reference code; nothing keeps a
memory map or a whole tensor alive.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4
KEY_ALIGNMENT = "general.alignment"
MAX_HEADER_BYTES = 256 << 20

# GGUF value types: numeric ones as (struct format, numpy dtype)
NUMERIC = {
    0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
    4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
    10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64),
}
TYPE_UINT32, TYPE_STRING, TYPE_ARRAY = 4, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in numpy (row-major) order: ggml's dimensions reversed."""

    name: str
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the data
    nbytes: int

    @property
    def type_name(self) -> str:
        import gguf

        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.n_rows


@dataclass
class GGUFFile:
    path: Path
    version: int
    fields: dict[str, object] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


class _Cursor:
    """Bounds-checked little-endian reads of the header, which is read from the file in growing
    pieces: never past the file's end, never more than MAX_HEADER_BYTES."""

    def __init__(self, path: Path, f, size: int):
        self.path, self.f, self.size, self.pos = path, f, size, 0
        self.buf = bytearray()

    def fail(self, what: str):
        raise MixquantError(f"{self.path}: truncated or corrupt GGUF ({what})")

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if n < 0 or end > self.size:
            self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has {self.size}")
        if end > MAX_HEADER_BYTES:
            self.fail(f"{what} at byte {self.pos}: the header would be larger than {MAX_HEADER_BYTES >> 20} MiB")
        if end > len(self.buf):
            want = min(self.size, max(end, 2 * len(self.buf), 1 << 20)) - len(self.buf)
            self.f.seek(len(self.buf))
            self.buf += self.f.read(want)
            if len(self.buf) < end:
                self.fail(f"{what}: the file ended while reading it")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value[0] if len(value) == 1 else value

    def string(self, what: str, strict: bool = False) -> str:
        n = self.unpack("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                self.fail(f"{what} at byte {self.pos - n} is not UTF-8")
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in NUMERIC:
            return self.unpack(NUMERIC[vtype][0], what)
        if vtype == TYPE_STRING:
            return self.string(what)
        if vtype != TYPE_ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            self.fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        etype, count = self.unpack("<IQ", what)
        if etype in NUMERIC:
            itemsize = np.dtype(NUMERIC[etype][1]).itemsize
            self.need(count * itemsize, f"{what} ({count} values)")
            arr = np.frombuffer(bytes(self.buf[self.pos : self.pos + count * itemsize]), dtype=NUMERIC[etype][1])
            self.pos += count * itemsize
            return arr
        if etype not in (TYPE_STRING, TYPE_ARRAY):
            self.fail(f"{what} has unknown element type {etype}")
        self.need(count * 8, f"{what} ({count} values)")  # every element takes at least 8 bytes
        return [self.value(etype, what, depth + 1) for _ in range(count)]


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate the header of one GGUF file (one part of a split file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise MixquantError(f"{path}: not a GGUF file")
            return _parse(_Cursor(path, f, size))
    except OSError as e:
        raise MixquantError(f"{path}: cannot read: {e.strerror}") from None


def _parse(c: _Cursor) -> GGUFFile:
    c.pos = 4
    version = c.unpack("<I", "version")
    if version not in VERSIONS and version & 0xFFFF == 0:
        raise MixquantError(f"{c.path}: big-endian GGUF is not supported")
    if version not in VERSIONS:
        raise MixquantError(f"{c.path}: unsupported GGUF version {version} (2 and 3 are)")
    n_tensors, n_kv = c.unpack("<QQ", "counts")
    out = GGUFFile(c.path, version)
    c.need(n_kv * 12, f"{n_kv} metadata entries")
    for _ in range(n_kv):
        key = c.string("metadata key", strict=True)
        if key in out.fields:
            c.fail(f"metadata key {key} appears twice")
        out.fields[key] = c.value(c.unpack("<I", f"type of {key}"), f"metadata {key}")
    c.need(n_tensors * 28, f"{n_tensors} tensor entries")
    raw = []
    for _ in range(n_tensors):
        name = c.string("tensor name", strict=True)
        n_dims = c.unpack("<I", f"tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(f"tensor {name} has {n_dims} dimensions")
        dims = [c.unpack("<Q", f"tensor {name}") for _ in range(n_dims)]
        qtype, offset = c.unpack("<IQ", f"tensor {name}")
        raw.append((name, dims, qtype, offset))
    alignment = out.fields.get(KEY_ALIGNMENT, DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        c.fail(f"{KEY_ALIGNMENT} {alignment!r} is not a power of two")
    data_start = c.pos + (-c.pos % alignment)
    for name, dims, qtype, offset in raw:
        if name in out.tensors:
            c.fail(f"tensor {name} appears twice")
        if offset % alignment:
            c.fail(f"tensor {name} at data offset {offset} is not aligned to {alignment} bytes")
        out.tensors[name] = _tensor_info(c, name, dims, qtype, offset, data_start)
    last_end, last_name = -1, None
    for info in sorted(out.tensors.values(), key=lambda i: i.offset):
        if info.offset < last_end:
            c.fail(f"tensors {last_name} and {info.name} overlap")
        last_end, last_name = info.offset + info.nbytes, info.name
    return out


def _tensor_info(c: _Cursor, name, dims, qtype, offset, data_start) -> TensorInfo:
    import gguf

    try:
        kind = gguf.GGMLQuantizationType(qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        c.fail(f"tensor {name} has unknown type {qtype}")
    if any(d == 0 for d in dims):
        c.fail(f"tensor {name} has a zero dimension {dims}")
    if dims[0] % block:
        raise MixquantError(f"{c.path}: tensor {name} rows of {dims[0]} values do not fit {kind.name} blocks "
                            f"of {block}")
    nbytes = int(np.prod(dims, dtype=object)) // block * type_size
    start = data_start + offset
    if start + nbytes > c.size:
        c.fail(f"tensor {name} ends at byte {start + nbytes}, the file has {c.size}")
    return TensorInfo(name, int(qtype), tuple(int(d) for d in reversed(dims)), c.path, start, nbytes)


def _pread(info: TensorInfo, start: int, n: int) -> bytes:
    with open(info.path, "rb") as f:
        data = os.pread(f.fileno(), n, info.offset + start)
    if len(data) != n:
        raise MixquantError(f"{info.path}: truncated: tensor {info.name} could not be read")
    return data


def dequantize(raw: np.ndarray, qtype: int, row_length: int) -> np.ndarray:
    """float32 rows of `row_length` values from their raw bytes [n_rows, row_bytes]."""
    import gguf

    kind = gguf.GGMLQuantizationType(qtype)
    if kind == gguf.GGMLQuantizationType.F32:
        out = raw.view(np.float32)
    elif kind == gguf.GGMLQuantizationType.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif kind == gguf.GGMLQuantizationType.BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        try:
            with np.errstate(all="ignore"):  # corrupt blocks may hold NaN or inf scales
                out = gguf.quants.dequantize(raw, kind)
        except NotImplementedError:
            raise MixquantError(f"GGUF tensors of type {kind.name} cannot be dequantized") from None
    return out.reshape(-1, row_length).astype(np.float32, copy=False)


def read_rows(info: TensorInfo, rows) -> np.ndarray:
    """float32 [len(rows), row_length] of the given rows (of the tensor flattened to 2-D), read as
    runs of consecutive rows."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(rows), info.shape[-1]), np.float32)
    if not len(rows):
        return out
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run_start, run_end in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        first, n = int(rows[run_start]), int(run_end - run_start)
        raw = np.frombuffer(_pread(info, first * info.row_bytes, n * info.row_bytes), np.uint8)
        out[run_start:run_end] = dequantize(raw.reshape(n, info.row_bytes), info.qtype, info.shape[-1])
    return out


def read_all(info: TensorInfo) -> np.ndarray:
    """The whole tensor, float32, in its numpy shape (small tensors: norms, biases, gates)."""
    return read_rows(info, np.arange(info.n_rows)).reshape(info.shape)
