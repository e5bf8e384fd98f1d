"""safetensors read and write, tensor by tensor.

The reader maps one tensor at a time and drops the mapping afterwards, so resident memory stays
at the size of the tensor in hand whatever the file size. The writer takes the full list of
tensor specs up front (the conversion plan knows every output shape before anything is
quantized), writes the header first and then fills each tensor's byte range, possibly in
several pieces (one expert at a time for stacked MoE weights).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError

# safetensors dtype tag -> (numpy storage dtype, bytes per element)
DTYPES = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U32": (np.uint32, 4),
    "U16": (np.uint16, 2),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; every problem is a MixquantError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MixquantError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise MixquantError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise MixquantError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise MixquantError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise MixquantError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (entry.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            entry, dict) else (None, None, None)
        if not (isinstance(dtype, str) and _int_list(shape) and _int_list(offsets) and len(offsets) == 2):
            raise MixquantError(f"{path}: corrupt safetensors header entry for tensor {name}")
        if dtype not in DTYPES:
            raise MixquantError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        shape, (begin, end) = tuple(shape), offsets
        nbytes = prod(shape) * DTYPES[dtype][1]
        if end - begin != nbytes:
            raise MixquantError(f"{path}: tensor {name} byte range {begin}..{end} does not match {dtype}{list(shape)}")
        if data_start + end > size:
            raise MixquantError(f"{path}: truncated: tensor {name} ends at byte {data_start + end}, file has {size}")
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    _check_disjoint(path, tensors.values())
    return tensors


def _check_disjoint(path: Path, infos) -> None:
    """No two tensors share bytes (the safetensors library refuses overlapping data_offsets too)."""
    last_end, last_name = -1, None
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: i.offset):
        if info.offset < last_end:
            raise MixquantError(f"{path}: tensors {last_name} and {info.name} overlap (corrupt data_offsets)")
        last_end, last_name = info.offset + info.nbytes, info.name


def _int_list(value) -> bool:
    """A JSON list of non-negative integers."""
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def read_tensor(info: TensorInfo, index=None) -> np.ndarray:
    """Load one tensor, or `index` of it, as float32 if it is a float tensor.

    `index` is None or leading integer indices followed by at most one slice (a block of rows of
    one expert, say): such a selection is one contiguous byte range, read with a positioned read.
    Nothing maps the file, so an interrupt can never leave a view of a closed mapping behind.
    """
    np_dtype, itemsize = DTYPES[info.dtype]
    start, count, shape = _byte_range(info.shape, itemsize, index)
    if count == 0:
        arr = np.zeros(shape, dtype=np_dtype)
    else:
        with open(info.file, "rb") as f:
            raw = os.pread(f.fileno(), count * itemsize, info.offset + start)
        if len(raw) != count * itemsize:
            raise MixquantError(f"{info.file}: truncated: tensor {info.name} could not be read")
        arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    return _to_float32(arr, info.dtype) if info.dtype in FLOAT_DTYPES else arr.copy()


def _byte_range(shape: tuple[int, ...], itemsize: int, index) -> tuple[int, int, tuple[int, ...]]:
    """(first byte, element count, result shape) of `index` into a C-ordered array of `shape`."""
    index = () if index is None else (index if isinstance(index, tuple) else (index,))
    strides = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
    first, dim = 0, 0
    for ix in index:
        if isinstance(ix, slice):
            lo, hi, step = ix.indices(shape[dim])
            if step != 1:
                raise ValueError(f"stepped index {ix}")
            n = max(0, hi - lo)
            first += lo * strides[dim]
            rest = shape[dim + 1 :]
            if dim + 1 < len(index) and not all(isinstance(j, slice) and j == slice(None) for j in index[dim + 1 :]):
                raise ValueError(f"index {index} is not one contiguous range")
            return first * itemsize, n * strides[dim], (n, *rest)
        if not -shape[dim] <= ix < shape[dim]:
            raise IndexError(f"index {ix} out of range for dimension {shape[dim]}")
        first += (ix % shape[dim]) * strides[dim]
        dim += 1
    rest = tuple(shape[dim:])
    return first * itemsize, int(np.prod(rest, dtype=np.int64)), rest


def _to_float32(view: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view.astype(np.float32)


@dataclass(frozen=True)
class OutSpec:
    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype][1]


def header_bytes(specs: list[OutSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


class StreamingWriter:
    """Writes one safetensors file whose tensor list is known before any data is.

    `write(name, data)` appends to the tensor's byte range (or places it at `start`); `close()`
    checks that every tensor received exactly its size in bytes.
    """

    def __init__(self, path: Path, specs: list[OutSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        head = header_bytes(specs, metadata)
        self._data_start = len(head)
        self._ranges: dict[str, tuple[int, int]] = {}
        self._written: dict[str, int] = {}
        self._cursor: dict[str, int] = {}
        offset = 0
        for s in specs:
            self._ranges[s.name] = (offset, s.nbytes)
            self._written[s.name] = 0
            self._cursor[s.name] = 0
            offset += s.nbytes
        self._f = open(self.path, "wb")
        self._f.write(head)
        self._f.truncate(self._data_start + offset)

    def write(self, name: str, data: bytes | memoryview | np.ndarray, start: int | None = None) -> None:
        """Place `data` at byte `start` of the tensor; by default right after what was written last."""
        offset, nbytes = self._ranges[name]
        if start is None:
            start = self._cursor[name]
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
        if start + len(buf) > nbytes:
            raise ValueError(f"{name}: write of {len(buf)} bytes at {start} overruns its {nbytes} bytes")
        self._f.seek(self._data_start + offset + start)
        self._f.write(buf)
        self._written[name] += len(buf)
        self._cursor[name] = start + len(buf)

    def close(self) -> None:
        self._f.close()
        short = [n for n, (_, nb) in self._ranges.items() if self._written[n] != nb]
        if short:
            raise RuntimeError(f"{self.path}: tensors not fully written: {short[:5]}")


def file_size(specs: list[OutSpec], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(specs, metadata)) + sum(s.nbytes for s in specs)

