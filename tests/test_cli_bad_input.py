"""Every user-facing command answers bad input with one line on stderr and exit code 2: never a
traceback, never a run without limits."""

import json
import shutil
import struct

import pytest

from conftest import run_cli, run_cli_error, save_tiny_qwen35


@pytest.fixture(scope="module")
def files(fixture_dir, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tiny = save_tiny_qwen35(root / "tiny", ratio=2, vocab_size=8192, seed=1)  # the whole fixture tokenizer
    small = tiny_models["text-r2"]  # a 512-row embedding under the fixture's 8166-token tokenizer
    q, q_small = root / "q", root / "q-small"
    assert run_cli("convert", "-i", tiny, "-o", q, "-q", "--drop-mtp") == 0
    assert run_cli("convert", "-i", small, "-o", q_small, "-q", "--drop-mtp") == 0
    ref = root / "ref.npz"
    assert run_cli("eval", "--reference", tiny, "--ctx", 64, "--chunks", 1, "--save-reference", ref) == 0
    (root / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 40)
    (root / "rules.toml").write_text('[[rules]]\nrole = "ffn_gaet"\nbits = 4\n')
    (root / "notes.txt").write_text("hello")
    k = b"general.architecture"
    (root / "huge_array.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(k)) + k
                                           + struct.pack("<IIQ", 9, 4, 2**61) + b"\0" * 100)
    cut = root / "cut"
    shutil.copytree(tiny, cut)
    shard = cut / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    # the same model with a tokenizer whose ids differ (two tokens swapped)
    other = root / "other-tokenizer"
    shutil.copytree(q, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "def", "class"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return {"F": fixture_dir, "T": tiny, "Q": q, "REF": ref, "OUT": root / "out", "ROOT": root,
            "OTHER": other, "CUT": cut, "SMALL": small, "QSMALL": q_small}


CASES = [
    # convert
    ("convert -i {ROOT}/missing -o {OUT}", "no such file or folder"),
    ("convert -i {T} -o {OUT} --q-bits 9", "unsloth base bits must be 2..8"),
    ("convert -i {T} -o {OUT} --max-shard-size 5XB", "--max-shard-size: cannot read '5XB'"),
    ("convert -i {T} -o {OUT} --q-group-size 48", "argument --q-group-size: invalid choice: 48"),
    ("convert -i {T} -o {OUT} --q-bits x", "argument --q-bits: invalid int value: 'x'"),
    ("convert -i {T} -o {OUT} --awq-alpha 2", "--awq-alpha: must be within 0..1"),
    ("convert -i {T} -o {OUT} --awq --calib {ROOT}/latin1.txt", "latin1.txt: not UTF-8 text"),
    ("convert -i {T} -o {OUT} --calib mix", "--calib: no step of this conversion uses calibration text"),
    ("convert -i {T} -o {OUT} -q --target-bpw 4", "--target-bpw / --target-size: only with --q-recipe auto"),
    ("convert -i {T} -o {OUT} --quality best", "--quality: give the size to reach with --target-bpw or --target-size"),
    ("convert -i {T} -o {OUT} --target-bpw 4 --quality fast --q-distill 8",
     "--quality and --q-distill: the preset sets the rounding and distillation; give one"),
    ("convert -i {T} -o {OUT} --q-recipe auto", "--q-recipe auto: give the size to reach"),
    ("plan -i {T} --q-recipe auto --target-bpw 4 --sensitivity {ROOT}/notes.txt", "not a readable sensitivity file"),
    ("convert -i {T} -o {OUT} --q-recipe {ROOT}/rules.toml", "unknown role 'ffn_gaet'"),
    ("convert -i {T} -o {T}", "the output is the input"),
    ("convert -i {T} -o {ROOT}/notes.txt --force", "is not a mixquant output"),
    ("convert -i {CUT} -o {OUT}", "truncated"),
    ("convert -i {ROOT}/huge_array.gguf -o {OUT}", "truncated or corrupt GGUF"),
    ("convert -o {OUT}", "the following arguments are required: -i/--input"),
    ("convert -i {T} -o {OUT} -q --q-rounding-cache {ROOT}/rc", "--q-rounding-cache: only with --q-rounding gptq"),
    ("convert -i {T} -o {OUT} -q --q-rounding gptq --q-rounding-cache {ROOT}/notes.txt",
     "notes.txt: --q-rounding-cache needs a folder, this is a file"),
    ("convert -i {T} -o {ROOT}/rc/out -q --q-rounding gptq --q-rounding-cache {ROOT}/rc",
     "the output lies inside the input"),
    # a tokenizer whose ids reach past the embedding (MLX would read outside it)
    ("convert -i {SMALL} -o {OUT} -q --q-rounding gptq --calib-tokens 1024 --drop-mtp",
     "calibration.jsonl: the tokenizer gives token id 8"),
    ("convert -i {SMALL} -o {OUT} -q --awq --calib-tokens 512 --drop-mtp", "past the model's 512-row embedding"),
    ("imatrix -m {SMALL} -o {ROOT}/im.gguf --tokens 512", "calibration.jsonl: the tokenizer gives token id 8"),
    ("eval --model {QSMALL} --reference {SMALL} --ctx 64 --chunks 1", "eval_heldout.txt: the tokenizer gives token id"),
    ("eval --model {QSMALL} --reference {REF}", "q-small: the tokenizer gives token id"),
    ("generate {QSMALL} --prompt 'quantization of weights'", "past the model's 512-row embedding"),
    ("bench {QSMALL} --repeats 1", "q-small: the tokenizer gives token id"),
    ("chat {QSMALL}", "q-small: the tokenizer gives token id"),
    ("serve {QSMALL} --port 0", "q-small: the tokenizer gives token id"),
    ("serve {Q} --host 256.0.0.1", "--host 256.0.0.1: cannot resolve it"),
    # plan
    ("plan -i {ROOT}/notes.txt", "not a GGUF file"),
    ("plan -i {ROOT}/huge_array.gguf -q", "truncated or corrupt GGUF"),
    ("plan -i {T} --q-recipe fancy", "--q-recipe: 'fancy' is neither uniform, unsloth, auto nor a .toml rules file"),
    # eval
    ("eval --model {Q} --reference {T} --chunks -1", "--chunks: must be at least 1, got -1"),
    ("eval --model {Q} --reference {T} --chunks 0", "--chunks: must be at least 1, got 0"),
    ("eval --model {Q} --reference {T} --ctx 2", "--ctx: must be at least 4, got 2"),
    ("eval --model {Q} --reference {REF} --ctx 128", "a saved reference fixes the text and its windows; --ctx"),
    ("eval --model {Q} --reference {REF} --chunks 3", "a saved reference fixes the text and its windows; --chunks"),
    ("eval --model {Q} --reference {T} --text {ROOT}/latin1.txt", "latin1.txt: not UTF-8 text"),
    ("eval --model {OTHER} --reference {REF}", "its tokenizer differs from the reference's"),
    ("eval --model {OTHER} --reference {T} --chunks 1", "its tokenizer differs from the reference's"),
    ("eval --model {ROOT}/missing --reference {REF}", "not a model folder"),
    ("eval --reference {T}", "give --model"),
    ("eval --model {Q} --reference {T} --topk many", "--topk: expected auto or a number"),
    # imatrix
    ("imatrix -m {T} -o {ROOT}/im.gguf --calib {ROOT}/latin1.txt", "latin1.txt: not UTF-8 text"),
    ("imatrix -m {T} -o {ROOT}/im.gguf --tokens 0", "--tokens: must be at least 1, got 0"),
    ("imatrix -m {ROOT}/missing -o {ROOT}/im.gguf", "not a model folder"),
    # generate
    ("generate {Q} --prompt hi --max-tokens -3", "--max-tokens: must be at least 1, got -3"),
    ("generate {Q} --prompt hi --max-tokens 0", "--max-tokens: must be at least 1, got 0"),
    ("generate {Q} --prompt ''", "--prompt: empty"),
    ("generate {CUT} --prompt hi", "truncated"),
    ("generate {ROOT}/missing --prompt hi", "not a model folder"),
    # chat
    ("chat {Q} --max-tokens 0", "--max-tokens: must be at least 1, got 0"),
    ("chat {ROOT}/missing", "not a model folder"),
    ("chat {Q} --mtp-depth 2", "--mtp-depth: only with --mtp"),
    ("chat {Q} --mtp --mtp-depth 9", "mtp depth: must be 1..4, got 9"),
    ("chat {Q} --mtp", "no MTP head in this model"),
    # bench
    ("bench {Q} --repeats 0", "--repeats: must be at least 1, got 0"),
    ("bench {Q} --mtp --mtp-depths 1,x", "--mtp-depths: a comma-separated list of depths, got '1,x'"),
    ("bench {Q} --mtp --compare {Q}", "--mtp and --compare: one at a time"),
    # serve
    ("serve {Q} --max-concurrency 0", "--max-concurrency: must be at least 1, got 0"),
    ("serve {Q} --port -1", "--port: must be within 0..65535, got -1"),
    ("serve {Q} --mtp-depth 2", "--mtp-depth: only with --mtp"),
    ("serve {ROOT}/missing", "not a model folder"),
]


@pytest.mark.parametrize("command, message", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(files, command, message, capsys):
    import shlex

    argv = [a.format(**files) for a in shlex.split(command)]
    assert message in run_cli_error(argv, capsys)
    assert not files["OUT"].exists()
