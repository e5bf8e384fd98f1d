"""Output folders: never one that would destroy an input, replace only what mixquant made, and build
the new one in a staging folder beside it that becomes the output only when it is complete.

A staging folder is `.<name>.<random>.partial` next to the output and holds an owner file with the
writing process's id. One left behind by a process that was killed (SIGKILL, power loss) is
removed by the next run for the same output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.io.atomic import default_mode

log = logging.getLogger(__name__)

OWNER_FILE = ".mixquant-owner"
CONFIG_MARKER = "mixquant"  # config.json key of every folder mixquant writes
CARD_MARKER = "Converted with mixquant"
REPLACE_ANY_FLAG = "--force-delete-any"


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_output(out: Path, inputs: list[Path], force: bool, replace_any: bool = False) -> None:
    """Refuse an output that is, contains or lies inside an input; refuse to replace an existing
    path unless --force is given and it is a folder mixquant wrote (or `replace_any`)."""
    real_out = Path(os.path.realpath(out))
    for inp in inputs:
        relation = _relation(real_out, Path(os.path.realpath(inp)))
        if relation:
            raise MixquantError(f"{out}: the output {relation} the input {inp}; choose another output folder")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise MixquantError(f"{out}: already exists (use --force to replace an earlier mixquant output)")
    if not replace_any and not is_mixquant_output(out):
        raise MixquantError(f"{out}: exists and is not a mixquant output; --force replaces only those "
                            f"(use {REPLACE_ANY_FLAG} to delete it anyway)")


def is_mixquant_output(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and CONFIG_MARKER in config:
            return True
    except (OSError, ValueError):
        pass
    try:
        return CARD_MARKER in (path / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _staging_prefix(out: Path) -> str:
    return f".{out.name}."


def _owner_alive(folder: Path) -> bool:
    try:
        host, pid = (folder / OWNER_FILE).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False  # killed before it wrote its owner file
    if host != socket.gethostname():
        return True  # cannot tell: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders of `out` whose writing process is gone; returns them."""
    removed = []
    parent = out.parent if out.parent.is_dir() else None
    if parent is None:
        return removed
    for folder in parent.glob(_staging_prefix(out) + "*.partial"):
        if folder.is_dir() and not folder.is_symlink() and not _owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.warning("removed %s, left by an interrupted run", folder)
    return removed


@contextmanager
def staged(out: Path):
    """A staging folder beside `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), suffix=".partial", dir=out.parent))
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / OWNER_FILE).unlink()
        os.chmod(tmp, default_mode(0o777))  # mkdtemp makes it private; the result should look like any folder
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
