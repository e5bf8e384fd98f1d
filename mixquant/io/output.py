"""Output folders: never one that would destroy an input, replace only what mixquant made, and build
the new one in a staging folder beside it that becomes the output only when it is complete.

A staging folder is `.<name>.<random>.partial` next to the output and holds an owner file with the
writing process's id. One left behind by a process that was killed (SIGKILL, power loss) is
removed by the next run for the same output.

A resumable conversion stages in `.<name>.resume.partial` instead, which a failure leaves in place
with a record of the plan it was made for and the files it completed; a later run of the same plan
keeps those files and writes the rest.
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
RESUME_FILE = ".mixquant-resume.json"
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


def resume_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.resume.partial"


class Resumable:
    """The resume folder's record: the plan's fingerprint and the files completed (name -> bytes)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.files: dict[str, int] = {}

    def complete(self, name: str) -> None:
        with open(self.folder / name, "rb+") as f:
            os.fsync(f.fileno())
        self.files[name] = (self.folder / name).stat().st_size
        tmp = self.folder / (RESUME_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "files": self.files}))
        os.replace(tmp, self.folder / RESUME_FILE)

    @property
    def done(self) -> set[str]:
        return set(self.files)


def _load_resume(folder: Path, fingerprint: str) -> dict[str, int]:
    """Files of an earlier run of the same plan that are there whole; the rest of the folder cleared."""
    try:
        state = json.loads((folder / RESUME_FILE).read_text())
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        if state is not None:
            log.warning("%s was left by a conversion of another plan: starting over", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return {}
    files = {name: size for name, size in state.get("files", {}).items()
             if (folder / name).is_file() and (folder / name).stat().st_size == size}
    for child in folder.iterdir():
        if child.name not in files and child.name != RESUME_FILE:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return files


@contextmanager
def resumable(out: Path, fingerprint: str):
    """Like `staged`, in the resume folder: yields a Resumable whose `done` files an earlier
    interrupted run of the same plan completed. On failure the folder stays for the next run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = resume_folder(out)
    files = _load_resume(folder, fingerprint) if folder.is_dir() else {}
    if files:
        log.warning("resuming %s: %d file(s) already complete", out, len(files))
    folder.mkdir(exist_ok=True)
    state = Resumable(folder, fingerprint)
    state.files = files
    yield state
    (folder / RESUME_FILE).unlink(missing_ok=True)
    os.chmod(folder, default_mode(0o777))
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    os.rename(folder, out)
