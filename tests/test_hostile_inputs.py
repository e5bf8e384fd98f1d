"""Hostile and careless inputs, each built here: huge sizes, NaN, deep nesting, devices, overlapping
offsets, out-of-range numbers. Every one is one line on stderr, exit code 2, no output and no
unbounded run."""

import json
import os
import shlex
import shutil
import socket
import struct
import time
import zipfile

import numpy as np
import pytest

from conftest import run_cli, run_cli_error

DEEP = 100_000


def _variant(root, fixture_dir, name, edit=None):
    """A copy of the fixture (shards hard-linked: edits must replace files, not write into them)."""
    dest = root / name
    shutil.copytree(fixture_dir, dest, copy_function=os.link, ignore=shutil.ignore_patterns("heldout*"))
    if edit is not None:
        edit(dest)
    return dest


def _edit_text_config(**values):
    def edit(dest):
        config = json.loads((dest / "config.json").read_text())
        for key, value in values.items():
            target = config["text_config"]
            *path, last = key.split(".")
            for p in path:
                target = target[p]
            target[last] = value
        (dest / "config.json").unlink()
        (dest / "config.json").write_text(json.dumps(config))
    return edit


def _set_nonfinite(dest):
    """256 values of the embedding (tied to the head) set to +inf, in a real copy of its shard."""
    from mixquant.io.safetensors import read_header

    shard = dest / "model-00001-of-00002.safetensors"
    info = read_header(shard)["model.language_model.embed_tokens.weight"]
    data = bytearray(shard.read_bytes())
    data[info.offset: info.offset + 512] = struct.pack("<H", 0x7F80) * 256
    shard.unlink()
    shard.write_bytes(bytes(data))


def _gguf(path, tensors, alignment=32):
    """A minimal GGUF v3 header: general.alignment and F32 tensors (name, n values, data offset)."""
    key = b"general.alignment"
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + struct.pack("<Q", len(key)) + key
    out += struct.pack("<II", 4, alignment)
    for name, n, offset in tensors:
        out += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IQ", 1, n) + struct.pack("<IQ", 0, offset)
    out += b"\0" * (-len(out) % alignment) + b"\0" * 4096
    path.write_bytes(out)


def _safetensors(path, entries):
    header = json.dumps({name: {"dtype": "F32", "shape": [n], "data_offsets": [a, b]}
                         for name, n, a, b in entries}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4096)


def _edit_reference(src, dest, **arrays):
    with np.load(src) as data:
        out = {k: data[k] for k in data.files}
    out.update(arrays)
    np.savez_compressed(dest, **out)


@pytest.fixture(scope="module")
def files(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    f = {"F": fixture_dir, "ROOT": root, "OUT": root / "out"}
    f["NAN"] = _variant(root, fixture_dir, "nan", _set_nonfinite)
    for name, values in {"LAYERS": {"num_hidden_layers": 1_000_000_000}, "EPS_STR": {"rms_norm_eps": "x"},
                         "EPS_NAN": {"rms_norm_eps": float("nan")}, "HEAD0": {"head_dim": 0},
                         "ROPE": {"rope_parameters": "nope"},
                         "THETA": {"rope_parameters.rope_theta": -1}}.items():
        f[name] = _variant(root, fixture_dir, name.lower(), _edit_text_config(**values))
    f["DEEP_CONFIG"] = _variant(root, fixture_dir, "deep", lambda d: (d / "config.json").unlink() or (
        d / "config.json").write_text("[" * DEEP + "]" * DEEP))
    f["NO_TOK"] = _variant(root, fixture_dir, "no-tok", lambda d: [(d / n).unlink() for n in (
        "tokenizer.json", "tokenizer_config.json")])
    q = root / "q"
    assert run_cli("convert", "-i", fixture_dir, "-o", q, "-q", "--drop-mtp") == 0
    cut = root / "q-cut"
    shutil.copytree(q, cut)
    shard = cut / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    f["Q"], f["QCUT"] = q, cut
    deep_tok = root / "q-deep-tokenizer"
    shutil.copytree(q, deep_tok)
    (deep_tok / "tokenizer.json").write_text('{"model": ' + "[" * DEEP + "]" * DEEP + "}")
    f["QDEEPTOK"] = deep_tok
    (root / "notes.txt").write_text("a file, not a folder")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    f["BUSY"] = busy.getsockname()[1]
    f["_busy"] = busy
    # saved references, sound and spoiled
    ref = root / "ref.npz"
    assert run_cli("eval", "--reference", fixture_dir, "--ctx", 64, "--chunks", 2, "--topk", 0,
                   "--save-reference", ref) == 0
    with np.load(ref) as data:
        windows, full = data["windows"], data["full"]
    _edit_reference(ref, root / "ref-neg.npz", windows=np.where(np.arange(windows.size).reshape(windows.shape) == 3,
                                                               -5, windows))
    _edit_reference(ref, root / "ref-nan.npz", full=np.full_like(full, np.nan))
    _edit_reference(ref, root / "ref-shape.npz", full=full[:, :5])
    big = np.zeros((windows.shape[0], full.shape[1], 1 << 17), np.float32)  # 32 MiB of zeros, ~30 KiB packed
    _edit_reference(ref, root / "ref-zeros.npz", full=big)
    _edit_reference(ref, root / "ref-dtype.npz", windows=windows.astype(np.float32))
    _edit_reference(ref, root / "ref-deep.npz", meta=np.array("[" * DEEP + "]" * DEEP))
    with zipfile.ZipFile(root / "ref-bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:  # 6 GiB of zeros declared
        for name in ("format", "meta", "windows"):
            with np.load(ref) as data, z.open(name + ".npy", "w") as m:
                np.lib.format.write_array(m, data[name])
        with z.open("full.npy", "w", force_zip64=True) as m:
            shape = (windows.shape[0], 31, 6 * 2**30 // (4 * 31 * windows.shape[0]))
            np.lib.format.write_array_header_1_0(m, {"descr": "<f4", "fortran_order": False, "shape": shape})
            zeros = bytes(1 << 24)
            for _ in range(4):
                m.write(zeros)
    # imatrix and sensitivity files with numbers no computation gives
    from mixquant.io.imatrix import Imatrix, ImatrixEntry, write_imatrix_gguf

    for name, value in (("nan", np.nan), ("inf", np.inf), ("neg", -1.0)):
        row = np.ones((1, 256), np.float32)
        row[0, 7] = value
        write_imatrix_gguf(root / f"im-{name}.gguf", Imatrix({"blk.0.ffn_up.weight": ImatrixEntry(
            row, np.array([10.0], np.float32))}, ["x"], 1, 512))
    sens = {"format": "mixquant-sensitivity-v1", "mode": "proxy", "source": "x", "calib": {}, "dtype": "bfloat16",
            "units": {"u": {"role": "ffn_up", "shape": [4, 64], "options": {"4b64": float("nan")}}}}
    (root / "sens-nan.json").write_text(json.dumps(sens))
    (root / "sens-list.json").write_text("[1, 2]")
    (root / "sens-str.json").write_text(json.dumps({**sens, "units": "many"}))
    (root / "sens-deep.json").write_text("[" * DEEP + "]" * DEEP)
    (root / "rules-deep.toml").write_text("x = " + "[" * DEEP + "]" * DEEP + "\n")
    (root / "rules-many.toml").write_text('[[rules]]\nname = "*"\nbits = 4\n' * 5000)
    (root / "rules-regex.toml").write_text("[[rules]]\nregex = '^(.*?.*?)*\\d$'\nbits = 4\n")
    (root / "rules-bits.toml").write_text('recipe = "uniform"\nbits = 1\n')
    (root / "calib-int.jsonl").write_text('{"text": 5}\n')
    (root / "calib-deep.jsonl").write_text('{"text": ' + "[" * DEEP + "]" * DEEP + "}\n")
    # containers whose offsets collide
    overlap = root / "overlap"
    overlap.mkdir()
    shutil.copy(fixture_dir / "config.json", overlap)
    _safetensors(overlap / "model.safetensors", [("a", 64, 0, 256), ("b", 64, 128, 384)])
    _gguf(root / "misaligned.gguf", [("a", 64, 0), ("b", 64, 260)])
    _gguf(root / "same-offset.gguf", [("a", 64, 0), ("b", 64, 0)])
    (root / "m-00000-of-00000.gguf").write_bytes(b"GGUF")
    return f


CASES = [
    # 8: texts are regular files, read within a limit
    ("eval --model {Q} --reference {F} --text /dev/zero", "/dev/zero: not a regular file"),
    ("convert -i {F} -o {OUT} -q --awq --calib /dev/zero", "/dev/zero: not a regular file"),
    # 9, 13: saved references
    ("eval --model {Q} --reference {ROOT}/ref-bomb.npz", "'full' declares 6.00 GiB but holds 0.06 GiB"),
    ("eval --model {Q} --reference {ROOT}/ref-neg.npz", "negative token id -5 in its windows"),
    ("eval --model {Q} --reference {ROOT}/ref-zeros.npz", "'full' expands"),
    ("eval --model {Q} --reference {ROOT}/ref-nan.npz", "full holds values that are not log-probabilities"),
    ("eval --model {Q} --reference {ROOT}/ref-shape.npz", "'full' has shape [2, 5, 8192], but 2 windows of 64"),
    ("eval --model {Q} --reference {ROOT}/ref-dtype.npz", "'windows' is float32[2, 64], not a 2-d i array"),
    ("eval --model {Q} --reference {ROOT}/ref-deep.npz", "meta: invalid JSON (nested too deeply)"),
    # 10: sizes without end
    ("plan -i {LAYERS}", "'num_hidden_layers' must be an integer within 0..4096, got 1000000000"),
    ("plan -i {F} --q-recipe {ROOT}/rules-many.toml", "5000 rules, more than the 4096"),
    ("plan -i {F} --q-recipe {ROOT}/rules-regex.toml", "(catastrophic backtracking); simplify it"),
    # 11: non-finite weights
    ("convert -i {NAN} -o {OUT} -q", "nan: language_model.model.embed_tokens.weight holds 256 inf or NaN value(s); refusing"),
    # 12: numbers read from files
    ("convert -i {F} -o {OUT} -q --awq --awq-alpha 0.5 --imatrix-path {ROOT}/im-nan.gguf",
     "blk.0.ffn_up.weight: in_sum2 holds nan"),
    ("convert -i {F} -o {OUT} -q --awq --awq-alpha 0.5 --imatrix-path {ROOT}/im-inf.gguf", "in_sum2 holds inf"),
    ("convert -i {F} -o {OUT} -q --awq --awq-alpha 0.5 --imatrix-path {ROOT}/im-neg.gguf", "in_sum2 holds -1.0"),
    ("plan -i {F} --q-recipe auto --target-bpw 4 --sensitivity {ROOT}/sens-nan.json", "option 4b64 has dKL nan"),
    ("plan -i {F} --q-recipe auto --target-bpw 4 --sensitivity {ROOT}/sens-list.json",
     "not a readable sensitivity file"),
    ("plan -i {F} --q-recipe auto --target-bpw 4 --sensitivity {ROOT}/sens-str.json", "'units' must be a dict"),
    # 14: colliding offsets
    ("plan -i {ROOT}/overlap", "model.safetensors: tensors a and b overlap"),
    ("plan -i {ROOT}/misaligned.gguf", "tensor b at data offset 260 is not aligned to 32 bytes"),
    ("plan -i {ROOT}/same-offset.gguf", "tensors a and b overlap"),
    # 15: config values every loader assumes
    ("plan -i {EPS_STR}", "'rms_norm_eps' must be a number within (0, 1], got 'x'"),
    ("plan -i {EPS_NAN}", "'rms_norm_eps' must be a number within (0, 1], got nan"),
    ("plan -i {HEAD0}", "'head_dim' must be positive, got 0"),
    ("plan -i {ROPE}", "'rope_parameters' must be an object, got 'nope'"),
    ("plan -i {THETA}", "'rope_theta' must be a number within (0, 1e+12], got -1"),
    # 17: one validation of numbers
    ("chat {Q} --temperature -1", "temperature must be a number within 0..2, got -1.0"),
    ("chat {Q} --temperature nan", "temperature must be a number within 0..2, got nan"),
    ("chat {Q} --temperature inf", "temperature must be a number within 0..2, got inf"),
    ("compare {F} --recipes auto:nan --out {OUT}", "--recipes: auto:nan: must be within 1..32 bits per weight"),
    ("compare {F} --recipes auto:1e9 --out {OUT}", "must be within 1..32 bits per weight, got 1000000000.0"),
    ("compare {F} --recipes auto:-1 --out {OUT}", "must be within 1..32 bits per weight, got -1.0"),
    ("compare {F} --recipes uniform:2- --out {OUT}", "cannot read bits '2-' in 'uniform:2-'"),
    ("compare {F} --recipes uniform:7 --out {OUT}", "--recipes: uniform:7: unsupported bits 7"),
    ("compare {F} --recipes unsloth:6-2 --out {OUT}", "the range '6-2' in 'unsloth:6-2' runs backwards"),
    # 18: nesting deeper than the parsers' recursion limit
    ("plan -i {DEEP_CONFIG}", "config.json: invalid JSON (nested too deeply)"),
    ("plan -i {F} --q-recipe {ROOT}/rules-deep.toml", "rules-deep.toml: invalid TOML (nested too deeply)"),
    ("plan -i {F} --q-recipe auto --target-bpw 4 --sensitivity {ROOT}/sens-deep.json", "nested too deeply"),
    ("convert -i {F} -o {OUT} -q --awq --calib {ROOT}/calib-deep.jsonl", "line 1: invalid JSON (nested too deeply)"),
    # 19: numbers and files the code used to trip on
    ("convert -i {F} -o {OUT} --q-recipe auto --target-size nanGB", "--target-size: cannot read 'nanGB'"),
    ("convert -i {F} -o {OUT} --q-recipe auto --target-size infGB", "--target-size: cannot read 'infGB'"),
    ("convert -i {F} -o {OUT} --q-recipe auto --target-size 1e400GB", "--target-size: cannot read '1e400GB'"),
    ("convert -i {F} -o {OUT} --max-shard-size nanGB", "--max-shard-size: cannot read 'nanGB'"),
    ("convert -i {F} -o {OUT} --max-shard-size 1e30GB", "--max-shard-size: '1e30GB' is more than 1000 PB"),
    ("convert -i {F} -o {OUT} -q --awq --calib {ROOT}/calib-int.jsonl", "line 1: 'text' must be a string, got int"),
    ("plan -i {ROOT}/m-00000-of-00000.gguf", "split GGUF name says part 0 of 0"),
    ("convert -i {NO_TOK} -o {OUT} -q", "no tokenizer (tokenizer.json, tokenizer.model, vocab.json: none"),
    ("generate {QCUT} --prompt hi", "truncated"),
    ("serve {Q} --port 99999", "--port: must be within 0..65535, got 99999"),
    ("serve {Q} --api-key ''", "--api-key: empty"),
    ("generate {QDEEPTOK} --prompt hi", "tokenizer.json: invalid JSON (nested too deeply)"),
    ("serve {Q} --port {BUSY}", ":{BUSY}: cannot listen there (Address already in use)"),
    # 20
    ("plan -i {F} --q-recipe {ROOT}/rules-bits.toml", "rules-bits.toml: bits: unsupported bits 1"),
    ("imatrix -m {F} -o {ROOT}/notes.txt/im.gguf", "cannot write the output there"),
    ("sensitivity -m {F} -o {ROOT}/notes.txt/s.json", "notes.txt is not a writable folder"),
]


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_hostile_input_is_one_line_and_exit_2(files, command, message, capsys):
    argv = [a.format(**files) for a in shlex.split(command)]
    start = time.monotonic()
    assert message.format(**files) in run_cli_error(argv, capsys)
    assert not files["OUT"].exists()
    assert time.monotonic() - start < 60


def test_allow_nonfinite_keeps_such_tensors_unquantized(files, tmp_path, capsys):
    from mixquant.io.safetensors import read_header

    out = tmp_path / "out"
    assert run_cli("convert", "-i", files["NAN"], "-o", out, "-q", "--allow-nonfinite", "--drop-mtp") == 0
    assert "1 tensor(s) hold inf or NaN and stay unquantized: language_model.model.embed_tokens.weight" \
        in capsys.readouterr().err
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["language_model.model.embed_tokens"] is False
    assert quant["language_model.model.layers.0.mlp.gate_proj"]["bits"] == 3
    names = read_header(out / "model.safetensors")
    assert "language_model.model.embed_tokens.scales" not in names


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "loops over more than 10000000 range() items"),
    ("{{ 'x' * 10**8 }}", "a repetition of 100000000 items"),
    ("{% for i in range(10**9) %}{% endfor %}", "loops over more than 10000000 range() items"),
    ("{{ 7 ** 999999 }}", "a power 7 ** 999999"),
    ("{% for m in messages %}{{ m.content * 100000000 }}{% endfor %}", "a repetition of 200000000 items"),
])
def test_a_template_that_would_run_without_end_stops_with_one_error(template, message):
    from mixquant.errors import MixquantError
    from mixquant.runtime.template import render

    start = time.monotonic()
    with pytest.raises(MixquantError) as e:
        render(template, [{"role": "user", "content": "hi"}])
    assert str(e.value) == f"chat template: stopped, {message}"
    assert time.monotonic() - start < 15


def test_templates_that_loop_within_bounds_render_as_before():
    from mixquant.runtime.template import render

    t = "{% for i in range(messages|length - 1, -1, -1) %}{{ loop.index }}:{{ messages[i].content }}" \
        "{% if not loop.last %},{% endif %}{% endfor %}"
    assert render(t, [{"content": "a"}, {"content": "b"}, {"content": "c"}]) == "1:c,2:b,3:a"


def test_chat_with_standard_input_closed_is_one_line(files):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mixquant.cli", "chat", str(files["Q"])], capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mixquant: error: chat: standard input is closed (chat reads your messages from it)"


def test_chat_template_errors_go_to_stderr(files, tmp_path):
    import subprocess
    import sys

    q = tmp_path / "q"
    shutil.copytree(files["Q"], q)
    (q / "chat_template.jinja").write_text("{{ raise_exception('this template takes no user turns') }}")
    proc = subprocess.run([sys.executable, "-m", "mixquant.cli", "chat", str(q)], input="hello\n/exit\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "this template takes no user turns" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mixquant: error")]
    assert errors == ["mixquant: error: chat template: this template takes no user turns"], proc.stderr
