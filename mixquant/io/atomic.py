"""Writing outputs so that a failure leaves nothing half-written, with ordinary permissions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def default_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what an ordinary open() would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = ".partial") -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, default_mode())  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
