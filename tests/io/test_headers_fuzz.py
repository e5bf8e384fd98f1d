"""Hostile and corrupt headers: the GGUF and safetensors readers answer every input with a value or
one MixquantError, in time linear in the input, and never allocate what the header merely claims."""

import json
import struct
import time

import numpy as np
import pytest

from mixquant.errors import MixquantError
from mixquant.io.gguf import read_all, read_gguf
from mixquant.io.safetensors import read_header, read_tensor

N_CASES = 250


def _valid_gguf(path):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "<s>", "日本"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.normal(size=(3, 64)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.normal(size=(2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _time_bound(n_bytes):
    return 0.5 + 2e-6 * n_bytes


def test_reader_agrees_with_gguf_py(tmp_path):
    import gguf

    path = _valid_gguf(tmp_path / "v.gguf")
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert ours.get("general.architecture") == "llama" and ours.get("general.name") == "fuzz"
    assert ours.get("tokenizer.ggml.tokens") == ["a", "bb", "<s>", "日本"]
    np.testing.assert_array_equal(ours.get("tokenizer.ggml.scores"), [0.5, -1.0, 2.0, 3.0])
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mine.shape)
        np.testing.assert_array_equal(read_all(mine), want)


def _header(n_tensors, n_kv):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name):
    k = name.encode()
    return struct.pack("<Q", len(k)) + k


@pytest.mark.parametrize("body, message", [
    (_header(0, 1) + _key("general.architecture") + struct.pack("<IIQ", 9, 4, 2**61) + b"\0" * 100,
     "2305843009213693952 values"),
    (_header(0, 1) + _key("general.architecture") + struct.pack("<IIQ", 9, 8, 2**40) + b"\0" * 100,
     "1099511627776 values"),
    (_header(2**60, 0) + b"\0" * 64, "tensor entries"),
    (_header(0, 2**60) + b"\0" * 64, "metadata entries"),
    (_header(0, 1) + struct.pack("<Q", 2**62) + b"\0" * 64, "metadata key"),
    (_header(0, 1) + _key("a") + struct.pack("<IQ", 8, 2**50) + b"\0" * 64, "metadata a"),
    (_header(0, 1) + _key("a") + struct.pack("<I", 77) + b"\0" * 64, "unknown value type 77"),
    (_header(1, 0) + _key("t") + struct.pack("<I", 9) + b"\0" * 64, "9 dimensions"),
    (_header(1, 0) + _key("t") + struct.pack("<IQ", 1, 32) + struct.pack("<IQ", 999, 0) + b"\0" * 64,
     "unknown type 999"),
    (_header(1, 0) + _key("t") + struct.pack("<IQ", 1, 2**40) + struct.pack("<IQ", 0, 0) + b"\0" * 64,
     "tensor t ends at byte"),
])
def test_hostile_headers_fail_fast(tmp_path, body, message):
    path = tmp_path / "h.gguf"
    path.write_bytes(body)
    t0 = time.perf_counter()
    with pytest.raises(MixquantError, match="truncated or corrupt GGUF") as e:
        read_gguf(path)
    assert time.perf_counter() - t0 < 1.0
    assert message in str(e.value) and str(path) in str(e.value)


def test_the_probe_gguf_is_a_one_line_error_for_plan(tmp_path, capsys):
    from conftest import run_cli

    k = b"general.architecture"
    path = tmp_path / "h.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(k)) + k
                     + struct.pack("<IIQ", 9, 4, 2**61) + b"\0" * 100)
    t0 = time.perf_counter()
    assert run_cli("plan", "-i", path, "-q") == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated or corrupt GGUF" in err[0]


def _mutations(data: bytes, rng, n: int):
    """Bit flips, overwritten integers, truncations, insertions and splices of a valid file."""
    for _ in range(n):
        b = bytearray(data)
        kind = rng.integers(5)
        if kind == 0:
            for _ in range(rng.integers(1, 8)):
                b[rng.integers(len(b))] ^= 1 << int(rng.integers(8))
        elif kind == 1:
            at = int(rng.integers(len(b) - 8))
            values = [0, 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, int(rng.integers(2**62))]
            b[at : at + 8] = struct.pack("<Q", values[int(rng.integers(len(values)))])
        elif kind == 2:
            b = b[: rng.integers(len(b))]
        elif kind == 3:
            at = int(rng.integers(len(b)))
            b[at:at] = rng.bytes(int(rng.integers(1, 64)))
        else:
            at = int(rng.integers(len(b)))
            b[at:] = rng.bytes(int(rng.integers(0, 256)))
        yield bytes(b)


def test_gguf_fuzz(tmp_path):
    valid = _valid_gguf(tmp_path / "v.gguf").read_bytes()
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "error": 0}
    for i, data in enumerate(_mutations(valid, rng, N_CASES)):
        path = tmp_path / f"m{i % 4}.gguf"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            f = read_gguf(path)
            for info in f.tensors.values():
                read_all(info)
            outcomes["ok"] += 1
        except MixquantError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
        assert time.perf_counter() - t0 < _time_bound(len(data)), f"case {i}"
    assert outcomes["ok"] > 10 and outcomes["error"] > 50, outcomes


def _valid_safetensors(path):
    from safetensors.numpy import save_file

    save_file({"a": np.ones((3, 5), np.float32), "b": np.arange(8, dtype=np.int32),
               "c": np.zeros((2, 2, 2), np.float16)}, str(path), metadata={"format": "pt"})
    return path


def _json_mutations(header: dict, rng, n: int):
    weird = [None, -1, 2**70, "x", [], {}, [1, 2, 3], [-4, -1], [2**40, 2**40], 1.5, True, [0, 2**63]]
    keys = ["dtype", "shape", "data_offsets"]
    for _ in range(n):
        h = json.loads(json.dumps(header))
        name = str(rng.choice([k for k in h if k != "__metadata__"]))
        kind = rng.integers(4)
        if kind == 0:
            h[name][str(rng.choice(keys))] = weird[int(rng.integers(len(weird)))]
        elif kind == 1:
            h[name] = weird[int(rng.integers(len(weird)))]
        elif kind == 2:
            h[name]["dtype"] = str(rng.choice(["F32", "BF16", "I64", "F8", "U1", ""]))
        else:
            del h[name][str(rng.choice(keys))]
        yield h


def test_safetensors_fuzz(tmp_path):
    valid = _valid_safetensors(tmp_path / "v.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", valid[:8])
    header, payload = json.loads(valid[8 : 8 + n]), valid[8 + n :]
    rng = np.random.default_rng(99)
    cases = [json.dumps(h).encode() for h in _json_mutations(header, rng, N_CASES // 2)]
    raw_cases = list(_mutations(valid, rng, N_CASES // 2))
    outcomes = {"ok": 0, "error": 0}
    for i, data in enumerate([struct.pack("<Q", len(c)) + c + payload for c in cases] + raw_cases):
        path = tmp_path / f"s{i % 4}.safetensors"
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            for info in read_header(path).values():
                read_tensor(info)
            outcomes["ok"] += 1
        except MixquantError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
        assert time.perf_counter() - t0 < _time_bound(len(data)), f"case {i}"
    assert outcomes["ok"] > 10 and outcomes["error"] > 50, outcomes
