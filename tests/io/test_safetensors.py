"""Our reader and writer against the reference safetensors library."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from mixquant.errors import MixquantError
from mixquant.io.safetensors import OutSpec, StreamingWriter, file_size, read_header, read_tensor


def test_reads_what_the_reference_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "b.f16": torch.randn(3, 64, generator=g).to(torch.float16),
        "c.f32": torch.randn(2, 3, 4, generator=g),
        "d.i32": torch.arange(6, dtype=torch.int32),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    infos = read_header(path)
    for name, t in tensors.items():
        got = read_tensor(infos[name])
        want = t.float().numpy() if t.is_floating_point() else t.numpy()
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(read_tensor(infos["c.f32"], (1, slice(1, 3))), tensors["c.f32"][1, 1:3].numpy())


def test_streamed_pieces_land_where_the_reference_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((4, 3, 8)).astype(np.float32)
    other = rng.integers(0, 2**32, size=(2, 5), dtype=np.uint32)
    specs = [OutSpec("stacked", "F32", (4, 3, 8)), OutSpec("other", "U32", (2, 5))]
    path = tmp_path / "y.safetensors"
    w = StreamingWriter(path, specs, {"format": "mlx"})
    for e in range(4):  # interleaved with the other tensor, as stacked experts are written
        w.write("stacked", stacked[e])
        if e == 1:
            w.write("other", other)
    w.close()
    back = load_file(str(path))
    np.testing.assert_array_equal(back["stacked"], stacked)
    np.testing.assert_array_equal(back["other"], other)
    assert path.stat().st_size == file_size(specs, {"format": "mlx"})


def test_incomplete_write_is_caught(tmp_path):
    w = StreamingWriter(tmp_path / "z.safetensors", [OutSpec("t", "F32", (2, 2))])
    w.write("t", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="not fully written"):
        w.close()


def test_overrun_is_caught(tmp_path):
    w = StreamingWriter(tmp_path / "z.safetensors", [OutSpec("t", "F32", (2,))])
    with pytest.raises(ValueError, match="overruns"):
        w.write("t", np.zeros(3, np.float32))


def test_inconsistent_byte_range(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"t": torch.zeros(4)}, str(path))
    raw = bytearray(path.read_bytes())
    header = raw[8:].split(b"}")[0]
    fixed = header.replace(b'"shape":[4]', b'"shape":[5]')
    raw[8 : 8 + len(fixed)] = fixed
    path.write_bytes(bytes(raw))
    with pytest.raises(MixquantError, match=r"tensor t byte range 0..16 does not match F32\[5\]"):
        read_header(path)
