"""The output never destroys an input, --force replaces only mixquant's own folders, and an
interrupted, terminated or killed conversion leaves nothing behind (or is cleaned up next time)."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_cli


def _one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixquant: error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_models["text-r2"], src)
    return src


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_output_equal_to_input_is_refused_even_with_force(model_copy, capsys):
    before = _files(model_copy)
    for flags in ([], ["--force"], ["--force-delete-any"]):
        assert run_cli("convert", "-i", model_copy, "-o", model_copy, "-q", *flags) == 2
        _one_error_line(capsys, str(model_copy), "the output is the input")
    assert _files(model_copy) == before


def test_output_containing_the_input_is_refused(tmp_path, tiny_models, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(tiny_models["text-r2"], proj / "src")
    (proj / "notes.txt").write_text("mine")
    assert run_cli("convert", "-i", proj / "src", "-o", proj, "-q", "--force-delete-any") == 2
    _one_error_line(capsys, "the output contains the input")
    assert (proj / "notes.txt").read_text() == "mine" and (proj / "src" / "config.json").is_file()


def test_output_inside_the_input_is_refused(model_copy, capsys):
    assert run_cli("convert", "-i", model_copy, "-o", model_copy / "q4", "-q") == 2
    _one_error_line(capsys, "the output lies inside the input")
    assert not (model_copy / "q4").exists()


def test_output_may_not_touch_side_inputs(tmp_path, fixture_dir, capsys):
    calib = tmp_path / "calib" / "text.txt"
    calib.parent.mkdir()
    calib.write_text("def f():\n    return 1\n" * 50)
    assert run_cli("convert", "-i", fixture_dir, "-o", calib.parent, "-q", "--awq", "--calib", calib,
                   "--force-delete-any") == 2
    _one_error_line(capsys, "the output contains the input", "text.txt")
    assert calib.is_file()


def test_force_replaces_only_mixquant_outputs(model_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q") == 0
    assert json.loads((out / "config.json").read_text())["mixquant"]["recipe"] == "unsloth-3"
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q", "--q-bits", "4", "--force") == 0
    assert json.loads((out / "config.json").read_text())["mixquant"]["recipe"] == "unsloth-4"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    capsys.readouterr()
    assert run_cli("convert", "-i", model_copy, "-o", other, "--force") == 2
    _one_error_line(capsys, "is not a mixquant output", "--force-delete-any")
    assert (other / "cat.jpg").exists()
    file_out = tmp_path / "file.txt"
    file_out.write_text("x")
    assert run_cli("convert", "-i", model_copy, "-o", file_out, "--force") == 2
    _one_error_line(capsys, "is not a mixquant output")
    assert file_out.read_text() == "x"


def test_ctrl_c_while_reading_a_tensor_is_a_clean_interrupt(model_copy, tmp_path, monkeypatch, capsys):
    import mixquant.io.safetensors as st

    calls = {"n": 0}
    real = st._to_float32

    def interrupted(view, dtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(view, dtype)

    monkeypatch.setattr(st, "_to_float32", interrupted)
    assert run_cli("convert", "-i", model_copy, "-o", tmp_path / "out", "-q") == 130
    assert capsys.readouterr().err.strip() == "mixquant: interrupted"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    import mixquant.convert as conv
    real = conv.encode
    def slow(*a, **k):
        time.sleep(0.2)
        return real(*a, **k)
    conv.encode = slow
    from mixquant.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _start_slow_convert(src, out):
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", "-i", str(src), "-o", str(out), "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.parent.glob(f".{out.name}.*.partial")):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    time.sleep(0.5)
    return proc


def test_sigterm_removes_the_staging_folder(model_copy, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_convert(model_copy, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "Traceback" not in proc.stderr.read()
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_killed_run_is_cleaned_up_by_the_next(model_copy, tmp_path, capsys):
    out = tmp_path / "out"
    proc = _start_slow_convert(model_copy, out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = list(tmp_path.glob(".out.*.partial"))
    assert len(left) == 1
    capsys.readouterr()
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q") == 0
    assert f"mixquant: warning: removed {left[0]}, left by an interrupted run" in capsys.readouterr().err
    assert not left[0].exists() and (out / "config.json").is_file()


def test_a_running_conversion_keeps_its_staging_folder(model_copy, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_convert(model_copy, out)
    try:
        from mixquant.io.output import remove_stale_staging

        assert remove_stale_staging(out) == []
        assert len(list(tmp_path.glob(".out.*.partial"))) == 1
    finally:
        proc.kill()
        proc.wait()


WRITE_LIMITED = textwrap.dedent("""
    import resource, signal, sys
    import mixquant
    mixquant.enable_cpu_blas()  # its in-memory library is a file too: load it before the limit
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    from mixquant.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_failed_write_names_the_output_and_leaves_nothing(fixture_dir, tmp_path):
    """Files may not grow past 200 kB in this run, as on a full disk: the first shard fails mid-write."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", WRITE_LIMITED, "convert", "-i", str(fixture_dir), "-o", str(out),
                           "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mixquant: error: {out}: cannot write the output: File too large")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_help_says_missing_parents_are_created(capsys):
    with pytest.raises(SystemExit):
        run_cli("convert", "--help")
    assert "missing parent folders are created" in " ".join(capsys.readouterr().out.split())


def test_missing_parents_are_created(model_copy, tmp_path):
    out = tmp_path / "a" / "b" / "out"
    assert run_cli("convert", "-i", model_copy, "-o", out) == 0
    assert (out / "config.json").is_file()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _fail_on_third_file(monkeypatch) -> list[str]:
    """The writer fails as a full disk would when it opens its third file; returns the names opened."""
    import mixquant.writer as writer

    real_writer, opened = writer.StreamingWriter, []

    def failing(path, *a, **kw):
        opened.append(Path(path).name)
        if len(opened) == 3:
            raise OSError(28, "No space left on device", str(path))
        return real_writer(path, *a, **kw)

    monkeypatch.setattr(writer, "StreamingWriter", failing)
    return opened


def test_resume_after_a_failure_midway_gives_the_uninterrupted_output(fixture_dir, tmp_path, monkeypatch, capsys):
    """Shards of 2 MB: the run fails while writing the third of five; --resume keeps the two complete
    ones (they are not rewritten) and the result is byte for byte an uninterrupted run's."""
    import mixquant.writer as writer
    from mixquant.io.output import resume_folder

    args = ["-q", "--q-recipe", "unsloth", "--q-bits", "3", "--max-shard-size", "2MB", "--drop-vision"]
    whole = tmp_path / "whole"
    assert run_cli("convert", "-i", fixture_dir, "-o", whole, *args) == 0
    shards = sorted(p.name for p in whole.glob("model-*.safetensors"))
    assert len(shards) >= 4

    out = tmp_path / "out"
    real_writer, opened = writer.StreamingWriter, _fail_on_third_file(monkeypatch)
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", *args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists()
    partial = resume_folder(out)
    assert sorted(p.name for p in partial.glob("model-*.safetensors")) == shards[:2]
    assert not (partial / "config.json").exists()  # nothing there looks like a finished model

    opened.clear()
    monkeypatch.setattr(writer, "StreamingWriter", lambda path, *a, **kw: opened.append(Path(path).name) or
                        real_writer(path, *a, **kw))
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", *args) == 0
    assert shards[0] not in opened and shards[1] not in opened and shards[2] in opened
    assert not partial.exists()
    assert _files(out) == _files(whole)


def test_resume_of_another_plan_starts_over(fixture_dir, tmp_path, monkeypatch, caplog):
    import mixquant.writer as writer
    from mixquant.io.output import resume_folder

    args = ["-q", "--max-shard-size", "2MB", "--drop-vision"]
    out, direct = tmp_path / "out", tmp_path / "direct"
    real_writer, opened = writer.StreamingWriter, []

    def failing(path, *a, **kw):
        opened.append(path)
        if len(opened) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_writer(path, *a, **kw)

    monkeypatch.setattr(writer, "StreamingWriter", failing)
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", "--q-bits", "3", *args) == 2
    assert len(list(resume_folder(out).glob("model-*.safetensors"))) == 1
    monkeypatch.setattr(writer, "StreamingWriter", real_writer)
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", "--q-bits", "4", *args) == 0
    assert "was left by a conversion of another plan: starting over" in caplog.text
    assert run_cli("convert", "-i", fixture_dir, "-o", direct, "--q-bits", "4", *args) == 0
    assert _files(out) == _files(direct)


def test_force_trusts_the_marker_file_not_a_readme_phrase(model_copy, tmp_path, capsys):
    """A folder whose README says "Converted with mixquant" is not ours; one that mixquant wrote but
    someone added a file to is replaced only with --force-delete-any."""
    n = tmp_path / "n"
    n.mkdir()
    (n / "README.md").write_text("I Converted with mixquant last week.\n")
    (n / "thesis.tex").write_text("x")
    (n / "config.json").write_text(json.dumps({"mixquant": {"recipe": "unsloth-3"}}))
    assert run_cli("convert", "-i", model_copy, "-o", n, "-q", "--force") == 2
    _one_error_line(capsys, "is not a mixquant output")
    assert (n / "thesis.tex").read_text() == "x"

    out = tmp_path / "out"
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q") == 0
    marker = json.loads((out / ".mixquant-output.json").read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {".mixquant-output.json"}
    (out / "thesis.tex").write_text("x")
    capsys.readouterr()
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q", "--force") == 2
    _one_error_line(capsys, "holds files mixquant did not write (thesis.tex)")
    assert (out / "thesis.tex").read_text() == "x"
    (out / "thesis.tex").unlink()
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # edited: not as written
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q", "--force") == 2
    _one_error_line(capsys, "holds files mixquant did not write (config.json)")


def test_stale_cleanup_removes_only_this_outputs_staging(model_copy, tmp_path, capsys):
    """`-o g/x` must not touch `g/.x.y.resume.partial` (another output's) nor, for `-o 'g/*'`, other
    outputs' staging folders; a dead run's folder for exactly this output is removed."""
    from mixquant.io.output import OWNER_FILE

    g = tmp_path / "g"
    other_resume = g / ".x.y.resume.partial"
    other_resume.mkdir(parents=True)
    (other_resume / "model-00001-of-00002.safetensors").write_bytes(b"keep")
    other_dead = g / ".x.abc.partial"  # a dead run of output "x.abc"? no: of another output path
    other_dead.mkdir()
    (other_dead / OWNER_FILE).write_text(f"{__import__('socket').gethostname()} 999999999 {g / 'elsewhere'}\n")
    mine = g / ".x.dead.partial"
    mine.mkdir()
    (mine / OWNER_FILE).write_text(f"{__import__('socket').gethostname()} 999999999 {g / 'x'}\n")
    assert run_cli("convert", "-i", model_copy, "-o", g / "x") == 0
    assert (other_resume / "model-00001-of-00002.safetensors").read_bytes() == b"keep"
    assert other_dead.is_dir() and not mine.exists()
    star = g / ".*.old.partial"
    star.mkdir()
    assert run_cli("convert", "-i", model_copy, "-o", g / "*") == 0
    assert star.is_dir() and other_resume.is_dir() and other_dead.is_dir()


def test_a_folder_created_at_the_output_mid_run_is_not_replaced(model_copy, tmp_path, monkeypatch, capsys):
    import mixquant.convert as conv

    out = tmp_path / "out"
    real = conv.write_config

    def meanwhile(plan, folder):
        out.mkdir()
        (out / "mine.txt").write_text("made meanwhile")
        real(plan, folder)

    monkeypatch.setattr(conv, "write_config", meanwhile)
    assert run_cli("convert", "-i", model_copy, "-o", out, "-q", "--force-delete-any") == 2
    _one_error_line(capsys, f"{out}: appeared while this run was writing; left as it is")
    assert (out / "mine.txt").read_text() == "made meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


def test_resume_rewrites_a_shard_corrupted_in_place(fixture_dir, tmp_path, monkeypatch, capsys):
    import mixquant.writer as writer
    from mixquant.io.output import resume_folder

    args = ["-q", "--q-bits", "3", "--max-shard-size", "2MB", "--drop-vision"]
    whole = tmp_path / "whole"
    assert run_cli("convert", "-i", fixture_dir, "-o", whole, *args) == 0
    out = tmp_path / "out"
    real_writer = writer.StreamingWriter
    _fail_on_third_file(monkeypatch)
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", *args) == 2
    first = sorted(resume_folder(out).glob("model-*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes
    first.write_bytes(bytes(data))
    monkeypatch.setattr(writer, "StreamingWriter", real_writer)
    capsys.readouterr()
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--resume", *args) == 0
    assert f"mixquant: warning: {first} changed since it was completed: writing it again" in capsys.readouterr().err
    assert _files(out) == _files(whole)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


NO_WRITES_INTO_INPUTS = [
    ("convert -i {M} -o {M}/q -q", "the output lies inside the input"),
    ("convert -i {M} -o {ROOT}/q -q --q-rounding gptq --q-rounding-cache {M}",
     "the --q-rounding-cache folder is the input"),
    ("convert -i {M} -o {ROOT}/q -q --q-rounding gptq --q-rounding-cache {M}/cache",
     "the --q-rounding-cache folder lies inside the input"),
    ("sensitivity -m {M} -o {M}/sens.json", "the output lies inside the input"),
    ("sensitivity -m {M} -o {M}/config.json", "the output lies inside the input"),
    ("imatrix -m {M} -o {M}/imatrix.gguf", "the output lies inside the input"),
    ("imatrix -m {M} -o {M}/model.safetensors", "the output lies inside the input"),
    ("eval --reference {M} --save-reference {M}/ref.npz --chunks 1 --ctx 64", "the --save-reference lies inside"),
    ("eval --model {M} --reference {M} --json {M}/config.json --chunks 1 --ctx 64", "the --json lies inside"),
    ("eval --model {M} --reference {M} --text {TEXT} --json {TEXT} --chunks 1 --ctx 64", "the --json is the input"),
    ("compare {M} --out {M}", "the --out folder is the input"),
    ("compare {M} {M} --out {M}/report", "the --out folder lies inside the input"),
    ("bench {M} --json {M}/bench.json --repeats 1", "the --json lies inside the input"),
]


@pytest.mark.parametrize("command, message", NO_WRITES_INTO_INPUTS, ids=[c for c, _ in NO_WRITES_INTO_INPUTS])
def test_no_command_writes_into_its_inputs(fixture_dir, tmp_path, command, message, capsys):
    import shlex

    m = tmp_path / "m"
    shutil.copytree(fixture_dir, m, ignore=shutil.ignore_patterns("heldout*", "*.md"))
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    before, text_before = _tree(m), text.read_bytes()
    argv = [a.format(M=m, ROOT=tmp_path, TEXT=text) for a in shlex.split(command)]
    capsys.readouterr()
    assert run_cli(*argv) == 2
    _one_error_line(capsys, message)
    assert _tree(m) == before and text.read_bytes() == text_before
