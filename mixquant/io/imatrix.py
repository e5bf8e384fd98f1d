"""llama.cpp importance matrices: read (GGUF and legacy .dat) and write (both).

An imatrix holds, per weight matrix (by its llama.cpp GGUF name), the sum over calibration
tokens of the squared input activations of each input channel (`in_sum2`, one row per expert for
`*_exps` tensors, else one row) and how many tokens went in (`counts`). The importance of an input
channel is in_sum2 / counts; an expert that saw no token gets 1.0 everywhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError
from mixquant.io.atomic import atomic_write

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass
class ImatrixEntry:
    in_sum2: np.ndarray  # [n_mat, n_in] float32
    counts: np.ndarray  # [n_mat] float32

    def importance(self) -> np.ndarray:
        """[n_mat, n_in]: mean squared activation per input channel; 1.0 rows for unused experts."""
        counts = self.counts.astype(np.float64)[:, None]
        out = np.divide(self.in_sum2.astype(np.float64), counts, out=np.ones_like(self.in_sum2, np.float64),
                        where=counts > 0)
        return out


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0


def read_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MixquantError(f"{path}: cannot read: {e.strerror}") from None
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise MixquantError(f"{path}: truncated or corrupt GGUF imatrix ({e})") from None

    def field_value(key, default):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    tensors = {t.name: t for t in reader.tensors}
    out = Imatrix(datasets=list(field_value(KEY_DATASETS, [])), chunk_count=int(field_value(KEY_CHUNK_COUNT, 0)),
                  chunk_size=int(field_value(KEY_CHUNK_SIZE, 0)))
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue  # .counts come with their in_sum2; others (e.g. .in_sum) are not used
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            raise MixquantError(f"{path}: {base}.in_sum2 has no {base}.counts")
        in_sum2 = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        c = np.array(counts.data, dtype=np.float32).reshape(-1)
        if len(c) != in_sum2.shape[0]:
            raise MixquantError(f"{path}: {base} has {in_sum2.shape[0]} rows of in_sum2 but {len(c)} counts")
        out.entries[base] = ImatrixEntry(in_sum2, c)
    if not out.entries:
        raise MixquantError(f"{path}: no imatrix entries (no *.in_sum2 tensors)")
    return out


def _read_dat(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise MixquantError(f"{path}: truncated legacy imatrix (at byte {pos})")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries <= 0 or n_entries > 1_000_000:
        raise MixquantError(f"{path}: not an imatrix file (neither GGUF nor a legacy .dat)")
    out = Imatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise MixquantError(f"{path}: corrupt legacy imatrix (name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        # stored as (sum / count) * ncall; one row unless it is an expert stack, whose rows we cannot
        # tell apart here beyond their length: keep the flat vector as one row per n_in block.
        out.entries[name] = ImatrixEntry(values[None, :] if ncall else values[None, :],
                                         np.array([float(ncall)], dtype=np.float32))
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            out.datasets = [take(f"<{length}s")[0].decode("utf-8", errors="replace")]
    return out


def write_imatrix_gguf(path: Path, imatrix: Imatrix) -> None:
    """The GGUF layout llama-imatrix writes: <name>.in_sum2 [n_mat, n_in] and <name>.counts [n_mat, 1]."""
    import gguf

    def write(tmp: Path):
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_type("imatrix")
        w.add_array(KEY_DATASETS, list(imatrix.datasets) or ["unknown"])
        w.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))
        for name in sorted(imatrix.entries):
            e = imatrix.entries[name]
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.in_sum2, dtype=np.float32))
            w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)


def write_imatrix_dat(path: Path, imatrix: Imatrix) -> None:
    """The legacy binary layout: values stored as (in_sum2 / count) * ncall."""

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<i", len(imatrix.entries)))
            for name in sorted(imatrix.entries):
                e = imatrix.entries[name]
                raw = name.encode("utf-8")
                ncall = max(1, int(round(float(e.counts.max()) / max(imatrix.chunk_size, 1)))) if imatrix.chunk_size \
                    else max(1, int(e.counts.max()))
                values = (e.importance() * ncall).astype(np.float32).reshape(-1)
                f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(values)))
                f.write(values.tobytes())
            f.write(struct.pack("<i", int(imatrix.chunk_count)))
            dataset = (imatrix.datasets[0] if imatrix.datasets else "").encode("utf-8")
            f.write(struct.pack("<i", len(dataset)) + dataset)

    atomic_write(path, write)
