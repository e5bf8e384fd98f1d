"""The package's shape: no import cycles, architecture knowledge only under arch/, a light
`import mixquant`, a wheel that carries its data, and the CPU BLAS it loads."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mixquant"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mixquant modules a file imports anywhere (module level or inside functions), with the
    packages Python runs on the way (importing a.b.c runs a and a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name:
                if name in modules:
                    out.add(name)
                name = name.rpartition(".")[0]
    return out


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(p, set(modules)) - {m} for m, p in modules.items()}
    # a package's __init__ importing its own submodules is how a package is built, not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".") or modules[d].name != "__init__.py"}
             for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


# Names that only an architecture table should spell: mlx-lm / Hugging Face / llama.cpp tensor-name
# parts. With every role's own name, none may appear in a string literal outside mixquant/arch/.
TENSOR_NAME_TOKENS = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj_qkv", "in_proj_z",
    "in_proj_a", "in_proj_b", "out_proj", "embed_tokens", "lm_head", "linear_attn", "self_attn", "switch_mlp",
    "input_layernorm", "post_attention_layernorm", "conv1d", "A_log", "dt_bias", "q_norm", "k_norm",
    "language_model", "shared_expert", "shared_expert_gate", "token_embd", "output_norm", "attn_qkv", "attn_gate",
    "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ssm_out", "ssm_conv1d", "nextn", "rotary_emb",
}


def _string_literals(tree):
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_tensor_names_and_roles_live_in_arch():
    import re

    from mixquant.arch.roles import Role

    roles = {r.value for r in Role}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "arch") in path.parents:
            continue
        for node in _string_literals(ast.parse(path.read_text())):
            tokens = set(re.findall(r"[A-Za-z0-9_]+", node.value))
            hits = (tokens & TENSOR_NAME_TOKENS) | ({node.value} & roles)
            if hits:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r} ({', '.join(sorted(hits))})")
    assert not found, "\n".join(found)


def test_the_check_above_can_fail(tmp_path):
    from mixquant.arch.roles import Role

    tree = ast.parse('"""a docstring may say lm_head"""\nx = "ffn_down"\ny = f"{x}.self_attn.q_proj"\n')
    literals = [n.value for n in _string_literals(tree)]
    assert "ffn_down" in literals and Role("ffn_down")
    assert any("q_proj" in v for v in literals) and not any("docstring" in v for v in literals)


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, **kw)


def test_import_mixquant_is_light():
    proc = _run("""
        import sys
        import mixquant
        from mixquant import cpu_blas
        maps = open("/proc/self/maps").read() if sys.platform == "linux" else ""
        heavy = [m for m in ("mlx", "mlx.core", "torch", "transformers", "mlx_lm", "scipy_openblas32")
                 if m in sys.modules]
        print(heavy, cpu_blas.loaded(), "openblas" in maps)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "[] None False"


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU BLAS step is for Linux's mlx[cpu]")
def test_cpu_blas_takes_over_mlx_float32_matmul():
    """After enable(), the process's cblas_sgemm is OpenBLAS's (in the in-memory copy), and MLX's
    float32 matmul agrees with numpy's float64 one."""
    proc = _run("""
        import ctypes, numpy as np
        import mixquant
        print(mixquant.enable_cpu_blas())
        import mlx.core as mx
        address = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
        def spans(line):
            lo, hi = line.split()[0].split("-")
            return int(lo, 16) <= address < int(hi, 16)
        print(next(line.strip() for line in open("/proc/self/maps") if spans(line)))
        a = np.random.default_rng(0).normal(size=(64, 96)).astype(np.float32)
        b = np.random.default_rng(1).normal(size=(96, 80)).astype(np.float32)
        got = np.array(mx.array(a) @ mx.array(b))
        print(float(np.abs(got - a.astype(np.float64) @ b.astype(np.float64)).max()))
    """)
    assert proc.returncode == 0, proc.stderr
    loaded, owner, err = proc.stdout.split("\n")[:3]
    assert loaded.startswith("libscipy_openblas") and "(plain BLAS names)" in loaded
    assert "mixquant-openblas" in owner  # the memfd copy, not MLX's bundled reference BLAS
    assert float(err) < 1e-3


def test_unprefixing_renames_symbols_and_keeps_the_rest(tmp_path):
    import scipy_openblas32

    from mixquant.cpu_blas import unprefix_symbols

    (lib,) = [p for p in Path(scipy_openblas32.get_lib_dir()).iterdir() if p.name.startswith("libscipy_openblas")]
    data = bytearray(lib.read_bytes())
    original = bytes(data)
    renamed = unprefix_symbols(data)
    assert renamed > 1000 and len(data) == len(original)
    out = tmp_path / "plain.so"
    out.write_bytes(data)
    proc = _run(f"""
        import ctypes
        lib = ctypes.CDLL({str(out)!r})
        print(hasattr(lib, "cblas_sgemm"), hasattr(lib, "sgemm_"), hasattr(lib, "scipy_cblas_sgemm"))
    """)
    assert proc.stdout.split() == ["True", "True", "False"], proc.stderr
    with pytest.raises(ValueError, match="not a 64-bit little-endian ELF"):
        unprefix_symbols(bytearray(b"not an elf file at all"))


def test_wheel_carries_the_bundled_data(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("mixquant-*.whl")
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    proc = subprocess.run([sys.executable, "-c", "import mixquant.bundled as b; print(b.__file__); "
                           "print(b.CALIBRATION_MIX.stat().st_size, b.EVAL_TEXT.stat().st_size)"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    where, sizes = proc.stdout.split("\n")[:2]
    assert where.startswith(str(target))
    assert [int(s) for s in sizes.split()] == [(PACKAGE / "data" / n).stat().st_size
                                               for n in ("calibration.jsonl", "eval_heldout.txt")]
    proc = subprocess.run([sys.executable, "-c", "from mixquant.tasks import tools; print(len(tools.load()[0]))"],
                          capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)}, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "15", proc.stderr
