"""Output folders: never one that would destroy an input, replace only what mixquant made, and build
the new one in a staging folder beside it that becomes the output only when it is complete.

Every finished output holds a marker file, `.mixquant-output.json`, that lists each file mixquant
wrote there with its size; `--force` replaces a folder only while it holds that marker and exactly
those files. A README phrase or a config key is no proof: people edit those.

A staging folder is `.<name>.<random>.partial` next to the output and holds an owner file with the
writing process's host, id and the output it is for. One left behind by a process that was killed
(SIGKILL, power loss) is removed by the next run for the same output; nothing else is.

A resumable conversion stages in `.<name>.resume.partial` instead, which a failure leaves in place
with a record of the plan it was made for and the files it completed (size and SHA-256); a later
run of the same plan keeps those files that still match and writes the rest.
"""

from __future__ import annotations

import glob
import hashlib
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
from mixquant.io.textfile import read_json

log = logging.getLogger(__name__)

OWNER_FILE = ".mixquant-owner"
RESUME_FILE = ".mixquant-resume.json"
MARKER_FILE = ".mixquant-output.json"  # the files of a finished output, written last
CONFIG_MARKER = "mixquant"  # config.json key of every model folder mixquant writes
REPLACE_ANY_FLAG = "--force-delete-any"


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def check_not_inputs(outputs: list[tuple[str, Path]], inputs: list[Path]) -> None:
    """Refuse any output (what it is, its path) that is, contains or lies inside an input."""
    for what, out in outputs:
        real_out = Path(os.path.realpath(out))
        for inp in inputs:
            relation = _relation(real_out, Path(os.path.realpath(inp)))
            if relation:
                raise MixquantError(f"{out}: the {what} {relation} the input {inp}; choose another path")


def check_output(out: Path, inputs: list[Path], force: bool, replace_any: bool = False) -> None:
    """Refuse an output that is, contains or lies inside an input; refuse to replace an existing
    path unless --force is given and it is a folder mixquant wrote (or `replace_any`)."""
    check_not_inputs([("output", out)], inputs)
    check_replace(out, force, replace_any)


def check_replace(out: Path, force: bool, replace_any: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise MixquantError(f"{out}: already exists (use --force to replace an earlier mixquant output)")
    if replace_any:
        return
    foreign = foreign_files(out)
    if foreign is None:
        raise MixquantError(f"{out}: exists and is not a mixquant output; --force replaces only those "
                            f"(use {REPLACE_ANY_FLAG} to delete it anyway)")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MixquantError(f"{out}: holds files mixquant did not write ({shown}); --force replaces only "
                            f"mixquant's own files (use {REPLACE_ANY_FLAG} to delete it anyway)")


def _folder_files(path: Path) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            if rel != MARKER_FILE:
                out[rel] = os.lstat(full).st_size
    return out


def foreign_files(path: Path) -> list[str] | None:
    """None unless `path` is a folder with mixquant's marker; else the files in it that the marker
    does not list with their size (empty: the folder is all mixquant's)."""
    if not path.is_dir() or path.is_symlink() or not (path / MARKER_FILE).is_file():
        return None
    try:
        recorded = read_json(path / MARKER_FILE).get("files")
    except (MixquantError, AttributeError):
        return None
    if not isinstance(recorded, dict):
        return None
    return sorted(name for name, size in _folder_files(path).items() if recorded.get(name) != size)


def is_mixquant_output(path: Path) -> bool:
    return foreign_files(path) == []


def write_marker(folder: Path) -> None:
    (folder / MARKER_FILE).write_text(json.dumps({"written_by": "mixquant", "files": _folder_files(folder)},
                                                 indent=1, sort_keys=True) + "\n")


def _staging_prefix(out: Path) -> str:
    return f".{out.name}."


def _owner_line(out: Path) -> str:
    return f"{socket.gethostname()} {os.getpid()} {os.path.realpath(out)}\n"


def _owner_of(folder: Path) -> tuple[str, int, str] | None:
    try:
        host, pid, target = (folder / OWNER_FILE).read_text().rstrip("\n").split(" ", 2)
        return host, int(pid), target
    except (OSError, ValueError):
        return None


def _alive(host: str, pid: int) -> bool:
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
    """Remove staging folders made for exactly `out` whose writing process is gone; returns them."""
    removed = []
    if not out.parent.is_dir():
        return removed
    target = os.path.realpath(out)
    for folder in out.parent.glob(glob.escape(_staging_prefix(out)) + "*.partial"):
        owner = _owner_of(folder) if folder.is_dir() and not folder.is_symlink() else None
        if owner is None or owner[2] != target or _alive(owner[0], owner[1]):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
        log.warning("removed %s, left by an interrupted run", folder)
    return removed


def _identity(path: Path):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _replace(folder: Path, out: Path, before, force: bool, replace_any: bool) -> None:
    """Rename the finished `folder` to `out`, unless `out` changed since the run began (appeared, was
    replaced) or no longer may be replaced; the old output is moved aside first, then deleted."""
    now = _identity(out)
    if now != before:
        what = "appeared" if before is None else "was replaced"
        raise MixquantError(f"{out}: {what} while this run was writing; left as it is, nothing written")
    check_replace(out, force, replace_any)
    write_marker(folder)
    os.chmod(folder, default_mode(0o777))  # mkdtemp makes it private; the result should look like any folder
    if now is None:
        os.rename(folder, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), suffix=".old.partial", dir=out.parent))
    (aside / OWNER_FILE).write_text(_owner_line(out))
    os.rename(out, aside / "old")
    os.rename(folder, out)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(out: Path, force: bool = False, replace_any: bool = False):
    """A staging folder beside `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    before = _identity(out)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), suffix=".partial", dir=out.parent))
    try:
        (tmp / OWNER_FILE).write_text(_owner_line(out))
        yield tmp
        (tmp / OWNER_FILE).unlink()
        _replace(tmp, out, before, force, replace_any)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resume_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.resume.partial"


def file_stats(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Every file at `paths` (a folder: the files in it) as (resolved path, size, modification time in
    ns): what a key on inputs as they are on disk holds."""
    out = []
    for path in map(Path, paths):
        for f in sorted(path.iterdir()) if path.is_dir() else [path]:
            if f.is_file():
                st = f.stat()
                out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Resumable:
    """The resume folder's record: the plan's fingerprint and the files completed (name -> size, SHA-256)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.files: dict[str, dict] = {}

    def complete(self, name: str) -> None:
        with open(self.folder / name, "rb+") as f:
            os.fsync(f.fileno())
        self.files[name] = {"size": (self.folder / name).stat().st_size, "sha256": file_digest(self.folder / name)}
        tmp = self.folder / (RESUME_FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "files": self.files}))
        os.replace(tmp, self.folder / RESUME_FILE)

    @property
    def done(self) -> set[str]:
        return set(self.files)


def _intact(folder: Path, name: str, record) -> bool:
    path = folder / name
    if not isinstance(record, dict) or not path.is_file() or path.stat().st_size != record.get("size"):
        return False
    if file_digest(path) != record.get("sha256"):
        log.warning("%s changed since it was completed: writing it again", path)
        return False
    return True


def _load_resume(folder: Path, fingerprint: str) -> dict[str, dict]:
    """Files of an earlier run of the same plan that are there whole; the rest of the folder cleared."""
    try:
        state = read_json(folder / RESUME_FILE)
    except MixquantError:
        state = None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        if state is not None:
            log.warning("%s was left by a conversion of another plan: starting over", folder)
        shutil.rmtree(folder, ignore_errors=True)
        return {}
    recorded = state.get("files") if isinstance(state.get("files"), dict) else {}
    files = {name: record for name, record in recorded.items()
             if "/" not in name and name not in (".", "..") and _intact(folder, name, record)}
    for child in folder.iterdir():
        if child.name not in files and child.name != RESUME_FILE:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return files


@contextmanager
def resumable(out: Path, fingerprint: str, force: bool = False, replace_any: bool = False):
    """Like `staged`, in the resume folder: yields a Resumable whose `done` files an earlier
    interrupted run of the same plan completed. On failure the folder stays for the next run."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = resume_folder(out)
    before = _identity(out)
    files = _load_resume(folder, fingerprint) if folder.is_dir() and not folder.is_symlink() else {}
    if files:
        log.warning("resuming %s: %d file(s) already complete", out, len(files))
    folder.mkdir(exist_ok=True)
    state = Resumable(folder, fingerprint)
    state.files = files
    yield state
    (folder / RESUME_FILE).unlink(missing_ok=True)
    _replace(folder, out, before, force, replace_any)


def check_file_output(out: Path, inputs: list[Path], what: str = "output") -> None:
    """Before any work: a file output may not touch an input, must not be a folder, and its folder
    (or the nearest one that exists, where the rest will be created) must be writable."""
    out = Path(out)
    check_not_inputs([(what, out)], [Path(p) for p in inputs if p is not None])
    if out.is_dir():
        raise MixquantError(f"{out}: the {what} is a folder; give a file name")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise MixquantError(f"{out}: cannot write the {what} there ({parent} is not a writable folder)")
