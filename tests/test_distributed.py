"""Two processes on this machine over MLX's ring backend give what one process gives: greedy
generation, chat and the server under pipeline and tensor sharding, the importance matrix and the
proxy sensitivity with their windows split, GPTQ and learned rounding with their batches and
linears dealt out; a rank that ends stops the others in one line."""

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, save_tiny_qwen35

CLI = [sys.executable, "-m", "mixquant"]
PROMPTS = ["The history of", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed by iteration "
           "from the two before it, starting with 0 and 1.\"\"\"\n"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def models(tmp_path_factory, fixture_dir):
    root = tmp_path_factory.mktemp("sharded")
    # the fixture's tokenizer fits it; a tensor split leaves every expert 64 inputs, one group
    moe = save_tiny_qwen35(root / "moe-src", moe=True, vocab_size=8192, moe_intermediate_size=128,
                           shared_expert_intermediate_size=128)
    out = {"moe-src": moe}
    for name, src in (("fixture", fixture_dir), ("moe", moe)):
        assert run_cli("convert", "-i", src, "-o", root / f"{name}-bf16") == 0
        assert run_cli("convert", "-i", src, "-o", root / f"{name}-unsloth3", "-q") == 0
        out[f"{name}-bf16"], out[f"{name}-unsloth3"] = root / f"{name}-bf16", root / f"{name}-unsloth3"
    return out


def one_process(path, prompt, max_tokens):
    from mixquant.runtime.generate import generate_text

    return "".join(generate_text(path, prompt, max_tokens)) + "\n"


GENERATED = ["fixture-bf16", "fixture-unsloth3", "moe-bf16", "moe-unsloth3"]

# Each rank, in one process: every model split over the two ranks, greedy continuations of every
# prompt (a JSON line each), and what the rank holds of the first model.
RANK = """
import json, sys
from pathlib import Path
from mixquant.distributed import shard_for
from mixquant.loading import count_parameters, load_for_running
from mixquant.runtime.generate import generate_text
mode, prompts, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
shard = shard_for(mode, "test")
loaded = load_for_running(Path(paths[0]), shard=shard)
layers = loaded.model.language_model.model.layers
held = [sum(layer is not None for layer in layers), count_parameters(loaded.model)]
texts = [[''.join(generate_text(Path(p), q, 24, shard=shard)) for q in prompts] for p in paths]
print(json.dumps({"held": held, "texts": texts}))
"""


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
def test_sharded_generate_is_one_process_token_for_token(models, mode):
    """The fixture and a tiny Qwen3.5-MoE, unquantized and unsloth-3, two prompts of different
    lengths; and a rank holds only its part."""
    import json

    from mixquant.distributed import run_local
    from mixquant.loading import count_parameters, load_for_running
    from mixquant.runtime.generate import generate_text

    paths = [str(models[name]) for name in GENERATED]
    expected = [["".join(generate_text(Path(p), q, 24)) for q in PROMPTS] for p in paths]
    ranks = run_local([[sys.executable, "-c", RANK, mode, json.dumps(PROMPTS), *paths]] * 2, TIMEOUT)
    assert all(code == 0 for code, _, _ in ranks), ranks
    said = [json.loads(out) for _, out, _ in ranks]
    for rank in said:
        assert rank["texts"] == expected
    whole = load_for_running(models[GENERATED[0]]).model
    outer = sum(v.size for k, v in _flat(whole) if ".layers." not in k)  # embedding, final norm, head
    held = [rank["held"] for rank in said]
    if mode == "pipeline":  # four layers each, both keep the embedding and the head
        assert [layers for layers, _ in held] == [4, 4]
        assert sum(n for _, n in held) == count_parameters(whole) + outer
    else:  # every layer on each, a slice of each: well under the whole
        assert all(layers == 8 and n < 0.6 * count_parameters(whole) + outer for layers, n in held)


def test_sharded_generate_command(models):
    """`mixquant generate --shard`: rank 0 alone prints, and says its notes."""
    expected = one_process(models["moe-unsloth3"], PROMPTS[0], 24)
    (c0, out0, err0), (c1, out1, err1) = run_local_cli(
        ["generate", models["moe-unsloth3"], "--prompt", PROMPTS[0], "--max-tokens", 24, "--shard", "tensor"])
    assert (c0, c1) == (0, 0), err0 + err1
    assert out0 == expected and out1 == ""
    assert "note" in err0 and "note" not in err1


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_sharded_generate_under_mlx_launch(models):
    launcher = Path(sys.executable).parent / "mlx.launch"
    expected = one_process(models["fixture-unsloth3"], PROMPTS[0], 16)
    run = subprocess.run([str(launcher), "-n", "2", "--backend", "ring", "--starting-port", str(_port()), "--",
                          *CLI, "generate", str(models["fixture-unsloth3"]), "--prompt", PROMPTS[0],
                          "--max-tokens", "16", "--shard", "pipeline"],
                         capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected


def test_sharded_chat_and_bench(models):
    import io
    import re

    from mixquant.runtime.repl import run

    said = "hello\nname three colours\n"
    path = models["fixture-unsloth3"]
    one = io.StringIO()
    stdin, sys.stdin = sys.stdin, io.StringIO(said)
    try:
        assert run(path, 24, 0.0, out=one) == 0
    finally:
        sys.stdin = stdin
    timings = re.compile(r"\n\[\d+ tokens, prefill .*\]")
    (c0, out0, err0), (c1, out1, _) = run_local_cli(["chat", path, "--max-tokens", 24, "--temperature", 0,
                                                       "--shard", "pipeline"], stdin=said)
    assert (c0, c1) == (0, 0), err0
    assert timings.sub("", out0.replace(">>> ", "")) == timings.sub("", one.getvalue()) and out1 == ""
    assert out0.count("tokens, prefill") == 2
    (c0, out0, err0), (c1, out1, _) = run_local_cli(["bench", path, "--prompt-tokens", 32, "--gen-tokens", 8,
                                                       "--turns", 1, "--repeats", 1, "--shard", "tensor"])
    assert (c0, c1) == (0, 0), err0
    assert "decode" in out0 and out1 == ""


SERVER_PROMPTS = ["hi", "Tell me about the weather in spring and in autumn, in two sentences, and then about the "
                  "winter that comes after them."]


def _answers(port: int, ranks) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            assert all(p.poll() is None for p in ranks.procs) and time.monotonic() < deadline, ranks.wait(1)
            time.sleep(0.2)
    replies = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": p}], temperature=0,
                                              max_tokens=24).choices[0].message for p in SERVER_PROMPTS]
    # a random model seldom closes its thought: its reply is then all reasoning
    return [(getattr(m, "reasoning_content", None) or "") + "|" + (m.content or "") for m in replies]


def _served(path, mode=None) -> list[str]:
    """Greedy replies of `mixquant serve` alone, or (mode) of 2 ranks under --shard mode; then its
    shutdown, which tells rank 1 to stop."""
    from mixquant.distributed import LocalRanks, _free_ports

    port = _free_ports(1)[0]
    argv = CLI + ["serve", str(path), "--port", str(port)] + (["--shard", mode] if mode else [])
    n = 2 if mode else 1
    with LocalRanks([argv] * n) as ranks:
        answers = _answers(port, ranks)
        ranks.procs[0].terminate()
        results = ranks.wait(60, stop_others=False)
    # uvicorn shuts down, then re-raises the SIGTERM it caught (128 + 15); rank 1 ends cleanly
    assert [code for code, _, _ in results] == [143] + [0] * (n - 1), results
    assert "stopped by SIGTERM" not in results[-1][2]
    return answers


@pytest.fixture(scope="module")
def lone_server(models):
    """A lone server's greedy replies for each model, served once."""
    return functools.cache(lambda name: _served(models[name]))


@pytest.mark.parametrize("mode", ["pipeline", "tensor"])
@pytest.mark.parametrize("name", GENERATED)
def test_sharded_server_answers_as_one_process(models, lone_server, name, mode):
    """Rank 0 serves, rank 1 decodes alongside; greedy replies (OpenAI SDK) equal a lone server's,
    for the fixture and a tiny Qwen3.5-MoE, unquantized and unsloth-3."""
    expected = lone_server(name)
    assert _served(models[name], mode) == expected and all(len(reply) > 1 for reply in expected)


def run_local_cli(argv, **kw):
    from mixquant.distributed import run_local

    return run_local([CLI + [str(a) for a in argv]] * 2, TIMEOUT, **kw)


def _port():
    from mixquant.distributed import _free_ports

    return _free_ports(1)[0]


@pytest.mark.parametrize("source", ["fixture", "moe-mlx-folder"])
def test_imatrix_of_two_processes_is_byte_identical(source, tmp_path, fixture_dir, models):
    """The fixture's HF folder (run a layer at a time) and the MoE's MLX folder (whole, per-expert
    counts)."""
    src = {"fixture": fixture_dir, "moe-mlx-folder": models["moe-bf16"]}[source]
    flags = ["--calib", "mix", "--tokens", 4096, "--ctx", 256]
    one = CLI + [str(a) for a in ["imatrix", "-m", src, "-o", tmp_path / "one.gguf", *flags]]
    # the BLAS's thread count changes its sums' order, so one process runs with the ranks' one thread
    subprocess.run(one, check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    (c0, out0, err0), (c1, out1, err1) = run_local_cli(["imatrix", "-m", src, "-o", tmp_path / "two.gguf", *flags])
    assert (c0, c1) == (0, 0), err0 + err1
    assert "on 2 processes" in out0 and out1 == ""
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "two.gguf").read_bytes()


class _Rank:
    """What tree_block reads of an mx.distributed.Group."""

    def __init__(self, r, n):
        self.r, self.n = r, n

    def rank(self):
        return self.r

    def size(self):
        return self.n


@pytest.mark.parametrize("n", [1, 3, 5, 6, 8, 13])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_ranks_pairwise_sums_are_one_process_bit_for_bit(n, size):
    """Each rank adds its tree_block in Pairwise order, the ranks' sums are added in that order
    too: float32 values of very different sizes give one process's sum to the bit."""
    import numpy as np

    from mixquant.distributed import Pairwise, tree_block

    rng = np.random.default_rng(n * size)
    values = (rng.standard_normal((n, 64)) * 10.0 ** rng.integers(-6, 6, (n, 64))).astype(np.float32)
    alone = Pairwise(0, n)
    for v in values:
        alone.add(v)
    blocks = [tree_block(n, _Rank(r, size)) for r in range(size)]
    assert [i for b in blocks for i in b] == list(range(n))
    top = Pairwise(0, size)
    for b in blocks:
        adder = Pairwise(b.start, b.stop)
        for i in b:
            adder.add(values[i])
        top.add(np.zeros(64, np.float32) if adder.total() is None else adder.total())
    assert top.total().tobytes() == alone.total().tobytes()
    if n >= 5:  # the order matters: added one after another, the sum differs
        assert np.cumsum(values, axis=0, dtype=np.float32)[-1].tobytes() != alone.total().tobytes()


ROUNDINGS = {"gptq": ["-q", "--q-rounding", "gptq"], "learned": ["-q", "--q-rounding", "learned", "--q-learn-steps", 4],
             "distill": ["-q", "--q-distill", 8], "auto": ["--target-bpw", 3.6, "--q-rounding", "nearest"]}


@pytest.mark.parametrize("source,rounding", [("fixture", "gptq"), ("fixture", "learned"), ("moe-src", "gptq"),
                                             ("fixture", "distill"), ("fixture", "auto")])
def test_rounding_of_two_processes_is_byte_identical(source, rounding, tmp_path, fixture_dir, models):
    """GPTQ (the fixture and a tiny Qwen3.5-MoE, a layer at a time; the MoE with per-expert Hessians),
    learned rounding, distillation (two held-out checks, each rank checking its half) and auto's
    allocation by the proxy (its windows split): two ranks write one process's folder, byte for byte."""
    src = fixture_dir if source == "fixture" else models[source]
    flags = [*ROUNDINGS[rounding], "--calib", "mix", "--calib-tokens", 4096]
    one = CLI + [str(a) for a in ["convert", "-i", src, "-o", tmp_path / "one", *flags]]
    subprocess.run(one, check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    (c0, out0, err0), (c1, out1, err1) = run_local_cli(["convert", "-i", src, "-o", tmp_path / "two", *flags])
    assert (c0, c1) == (0, 0), err0 + err1
    assert out0.startswith(f"wrote {tmp_path / 'two'}: ") and out1 == ""
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir()) and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_proxy_sensitivity_of_two_processes_is_one_process(tmp_path, fixture_dir, capsys):
    """Each rank prices its block of the windows and the float64 sums are added: every estimate
    equals one process's to float64 rounding, and auto's plan from either file is the same."""
    import json

    import numpy as np

    flags = ["--mode", "proxy", "--calib", "mix", "--windows", 4, "--ctx", 128]
    one = CLI + [str(a) for a in ["sensitivity", "-m", fixture_dir, "-o", tmp_path / "one.json", *flags]]
    subprocess.run(one, check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    (c0, out0, err0), (c1, out1, _) = run_local_cli(["sensitivity", "-m", fixture_dir, "-o", tmp_path / "two.json",
                                                  *flags])
    assert (c0, c1) == (0, 0), err0
    assert out0.startswith("wrote ") and out1 == ""
    units = {k: json.loads((tmp_path / f"{k}.json").read_text())["units"] for k in ("one", "two")}
    assert units["one"].keys() == units["two"].keys() and len(units["one"]) > 10
    for name, unit in units["one"].items():
        options = unit["options"]
        assert options.keys() == units["two"][name]["options"].keys()
        for key, value in options.items():
            np.testing.assert_allclose(units["two"][name]["options"][key], value, rtol=1e-9, err_msg=name)
    plans = []
    for k in ("one", "two"):
        capsys.readouterr()
        assert run_cli("plan", "-i", fixture_dir, "--q-recipe", "auto", "--target-bpw", 3.6,
                       "--sensitivity", tmp_path / f"{k}.json") == 0
        plans.append(capsys.readouterr().out)
    assert plans[0] == plans[1]


def test_measured_sensitivity_of_two_processes_resumes_and_is_one_process(tmp_path):
    """The ranks measure their units on every window, each as one process would: resumed from a
    partial file (one unit's figures altered, so that keeping them shows), two ranks write one
    process's file but for the unit the partial file held, byte for byte."""
    import json

    src = save_tiny_qwen35(tmp_path / "dense", vocab_size=8192, seed=5)
    flags = ["--mode", "measured", "--calib", "mix", "--windows", 2, "--ctx", 32]
    one = CLI + [str(a) for a in ["sensitivity", "-m", src, "-o", tmp_path / "one.json", *flags]]
    subprocess.run(one, check=True, capture_output=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    alone = json.loads((tmp_path / "one.json").read_text())
    first = next(iter(alone["units"]))
    partial = {**alone, "units": {first: {**alone["units"][first], "options": {
        k: v + 1.0 for k, v in alone["units"][first]["options"].items()}}}}
    (tmp_path / "two.json").write_text(json.dumps(partial, indent=1))
    (c0, out0, err0), (c1, out1, err1) = run_local_cli(["sensitivity", "-m", src, "-o", tmp_path / "two.json",
                                                        *flags])
    assert (c0, c1) == (0, 0), err0 + err1
    assert out0.startswith("wrote ") and out1 == ""
    assert (tmp_path / "two.json").read_text() == json.dumps({**alone, "units": {
        **alone["units"], first: partial["units"][first]}}, indent=1)
    assert len(alone["units"]) > 10


@pytest.mark.parametrize("when,command", [("before", "imatrix"), ("inside", "imatrix"), ("inside", "convert")])
def test_a_rank_that_dies_stops_the_others_with_one_line(when, command, tmp_path, fixture_dir):
    """Rank 1 ends before rank 0 reaches a collective, or while rank 0 waits inside one for it (for
    convert: once both have checked the output, while rank 0 hands out the calibration windows);
    the launcher (here as mlx.launch does it) then stops rank 0, which says so in one line and
    leaves no output."""
    from mixquant.distributed import STOP_GRACE_S, run_local

    pause = {"before": 0, "inside": 8}[when]
    met = ("mx.eval(mx.distributed.all_sum(mx.zeros(1, dtype=mx.float64), stream=mx.cpu)); "
           if command == "convert" else "")
    dies = [sys.executable, "-c", "import os, time, mlx.core as mx; mx.distributed.init(strict=True); "
            f"{met}time.sleep({pause}); os._exit(3)"]
    argv = {"imatrix": ["imatrix", "-m", str(fixture_dir), "-o", str(tmp_path / "im.gguf"), "--calib", "mix"],
            "convert": ["convert", "-i", str(fixture_dir), "-o", str(tmp_path / "out"), "-q", "--q-rounding",
                        "gptq", "--calib", "mix"]}[command]
    t0 = time.monotonic()
    (c0, _, err0), (c1, _, _) = run_local([CLI + argv, dies], 120)
    assert c1 == 3 and c0 == 128 + 15, err0
    assert time.monotonic() - t0 < pause + STOP_GRACE_S + 30
    ours = [line for line in err0.splitlines() if line.startswith("mixquant:")]
    assert ours == ["mixquant: error: stopped by SIGTERM (mlx.launch sends it once another process of the "
                    "group has ended)"], err0
    assert list(tmp_path.iterdir()) == []


def test_shard_flag_and_launch_must_agree(models, capsys):
    from conftest import run_cli_error

    line = run_cli_error(["generate", str(models["fixture-bf16"]), "--prompt", "a", "--shard", "tensor"], capsys)
    assert line == ("mixquant: error: --shard tensor: needs 2 or more processes started by mlx.launch (e.g. "
                    "mlx.launch -n 2 -- mixquant generate ... --shard tensor); this one is alone")
    results = run_local_cli(["generate", models["fixture-bf16"], "--prompt", "a"], stop_others=False)
    for code, out, err in results:
        assert code == 2 and out == ""
    assert results[0][2].strip() == ("mixquant: error: generate: running as 2 processes under mlx.launch; say how "
                                     "to split the model with --shard pipeline|tensor")
    assert results[1][2].strip().startswith("mixquant: error: rank 1: generate: running as 2 processes")


def test_tensor_split_that_does_not_divide_is_one_line(tmp_path):
    src = save_tiny_qwen35(tmp_path / "odd", vocab_size=8193)
    out = tmp_path / "odd-mlx"
    assert run_cli("convert", "-i", src, "-o", out) == 0
    shutil.rmtree(src)
    (c0, _, err0), _ = run_local_cli(["generate", out, "--prompt", "a", "--shard", "tensor"], stop_others=False)
    assert c0 == 2 and err0.strip().startswith(f"mixquant: error: {out}: --shard tensor over 2 processes: "), err0
