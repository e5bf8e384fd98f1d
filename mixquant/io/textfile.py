"""Reading the text files a user hands us (JSON, TOML, plain text) with one-line errors: only
regular files, within a size limit, valid UTF-8, and no nesting that would exhaust the parser."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

from mixquant.errors import MixquantError

MAX_JSON_BYTES = 256 << 20  # tokenizer.json of a large vocabulary is ~30 MB
MAX_TEXT_BYTES = 1 << 30  # an evaluation or calibration text


def _size_text(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def read_bytes(path: Path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The file's bytes: a regular file of at most `limit` bytes (never a device, pipe or folder)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise MixquantError(f"{path}: a folder, not a file")
            if not stat.S_ISREG(st.st_mode):
                raise MixquantError(f"{path}: not a regular file (a device, pipe or socket cannot be read here)")
            if st.st_size > limit:
                raise MixquantError(f"{path}: {st.st_size} bytes, more than the {_size_text(limit)} this reads")
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise MixquantError(f"{path}: not found") from None
    except IsADirectoryError:
        raise MixquantError(f"{path}: a folder, not a file") from None
    except OSError as e:
        raise MixquantError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise MixquantError(f"{path}: grew past the {_size_text(limit)} this reads")
    return data


def read_text(path: Path, limit: int = MAX_TEXT_BYTES) -> str:
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MixquantError(f"{path}: not UTF-8 text (byte {e.start})") from None


def parse_json(text: str | bytes, where) -> object:
    """json.loads with every failure (syntax, nesting past the parser's depth) as a one-line error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MixquantError(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise MixquantError(f"{where}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError as e:
        raise MixquantError(f"{where}: not UTF-8 text (byte {e.start})") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> object:
    return parse_json(read_text(path, limit), path)


def read_json_object(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    data = read_json(path, limit)
    if not isinstance(data, dict):
        raise MixquantError(f"{path}: expected a JSON object")
    return data


def read_toml(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    text = read_text(path, limit)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixquantError(f"{path}: invalid TOML ({e})") from None
    except RecursionError:
        raise MixquantError(f"{path}: invalid TOML (nested too deeply)") from None
