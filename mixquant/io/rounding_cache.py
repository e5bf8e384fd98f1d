"""GPTQ's or learned rounding's result kept between conversions, one .npz file per key: tensor name
-> per part (codes, scales, biases). A conversion whose inputs, plan and rounding settings give the
same key reads it instead of rounding again (trying distillation settings on one rounding, say)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mixquant.errors import MixquantError
from mixquant.io.atomic import atomic_write

SEP = "|"
FIELDS = ("codes", "scales", "biases")


def cache_file(folder: Path, key: str) -> Path:
    return Path(folder) / f"rounding-{key[:32]}.npz"


def save_rounded(path: Path, rounded: dict) -> None:
    arrays = {f"{name}{SEP}{p}{SEP}{field}": a for name, parts in rounded.items()
              for p, part in enumerate(parts) for field, a in zip(FIELDS, part[:3])}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    try:
        atomic_write(Path(path), write)
    except OSError as e:
        raise MixquantError(f"{path}: cannot write the rounding cache: {e.strerror or e}") from None


def load_rounded(path: Path) -> dict | None:
    """The cached rounding at `path`; None if there is none."""
    path = Path(path)
    if not path.exists():
        return None
    if not zipfile.is_zipfile(path):
        raise MixquantError(f"{path}: not a readable rounding cache (not an .npz file); remove it")
    parts: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                name, p, field = key.rsplit(SEP, 2)
                if field not in FIELDS:
                    raise ValueError(f"unknown array {key!r}")
                parts.setdefault(name, {}).setdefault(int(p), {})[field] = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MixquantError(f"{path}: not a readable rounding cache ({e}); remove it") from None
    out = {}
    for name, by_part in parts.items():
        if sorted(by_part) != list(range(len(by_part))) or any(len(f) != len(FIELDS) for f in by_part.values()):
            raise MixquantError(f"{path}: not a readable rounding cache (parts of {name} missing); remove it")
        out[name] = [tuple(by_part[p][f] for f in FIELDS) for p in range(len(by_part))]
    return out
