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
KEY_ARCHITECTURE = "mixquant.architecture"  # the GGUF architecture of the model it was computed on


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
    architecture: str | None = None  # known for imatrices mixquant wrote


def read_imatrix(path: Path) -> Imatrix:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise MixquantError(f"{path}: cannot read: {e.strerror}") from None
    imatrix = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    for name, entry in imatrix.entries.items():
        check_entry(entry, f"{path}: {name}")
    return imatrix


def check_entry(entry: ImatrixEntry, where: str) -> None:
    """Sums of squares and token counts: finite and never negative."""
    for what, values in (("in_sum2", entry.in_sum2), ("counts", entry.counts)):
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            value = values.reshape(-1)[int(np.argmax(bad.reshape(-1)))]
            raise MixquantError(f"{where}: {what} holds {value} (an importance must be finite and >= 0)")


def _read_gguf(path: Path) -> Imatrix:
    from mixquant.io.gguf import read_all, read_gguf

    f = read_gguf(path)

    def scalar(key, default):
        value = f.get(key, default)
        return value if isinstance(value, int) else default

    datasets = f.get(KEY_DATASETS, [])
    arch = f.get(KEY_ARCHITECTURE)
    out = Imatrix(datasets=[d for d in datasets if isinstance(d, str)] if isinstance(datasets, list) else [],
                  chunk_count=scalar(KEY_CHUNK_COUNT, 0), chunk_size=scalar(KEY_CHUNK_SIZE, 0),
                  architecture=arch if isinstance(arch, str) else None)
    for name, t in f.tensors.items():
        if not name.endswith(".in_sum2"):
            continue  # .counts come with their in_sum2; others (e.g. .in_sum) are not used
        base = name[: -len(".in_sum2")]
        counts = f.tensors.get(base + ".counts")
        if counts is None:
            raise MixquantError(f"{path}: {base}.in_sum2 has no {base}.counts")
        in_sum2 = read_all(t).reshape(-1, t.shape[-1])
        c = read_all(counts).reshape(-1)
        if len(c) != in_sum2.shape[0]:
            raise MixquantError(f"{path}: {base} has {in_sum2.shape[0]} rows of in_sum2 but {len(c)} counts")
        out.entries[base] = ImatrixEntry(in_sum2, c)
    if not out.entries:
        raise MixquantError(f"{path}: no imatrix entries (no *.in_sum2 tensors)")
    return out


def _read_dat(path: Path) -> Imatrix:
    from mixquant.io.textfile import read_bytes

    data = read_bytes(path)
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
        if nval <= 0:
            raise MixquantError(f"{path}: corrupt legacy imatrix ({name}: {nval} values)")
        if pos + 4 * nval > len(data):
            raise MixquantError(f"{path}: truncated legacy imatrix (at byte {pos})")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # stored as (sum / count) * ncall, one flat vector even for an expert stack: the tensor it is
        # matched with tells its rows apart (mixquant.calib.imatrix.match_imatrix)
        out.entries[name] = ImatrixEntry(values[None, :], np.array([float(ncall)], dtype=np.float32))
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
        if imatrix.architecture:
            w.add_string(KEY_ARCHITECTURE, imatrix.architecture)
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
