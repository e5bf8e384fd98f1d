"""imatrix files: llama.cpp's own, our writer, gguf-py's reader, the legacy .dat format."""

from pathlib import Path

import numpy as np
import pytest

import llamacpp_tools
from conftest import run_cli
from mixquant.errors import MixquantError
from mixquant.io.imatrix import Imatrix, ImatrixEntry, read_imatrix, write_imatrix_dat, write_imatrix_gguf

LLAMA_CPP_IMATRIX = Path(__file__).parent.parent / "fixtures" / "smollm2-imatrix"


def test_reads_llama_cpp_imatrix():
    im = read_imatrix(LLAMA_CPP_IMATRIX / "imatrix.gguf")
    assert len(im.entries) == 30 * 7  # q, k, v, o, gate, up, down in 30 layers
    assert im.chunk_count == 17 and im.chunk_size == 128
    q = im.entries["blk.0.attn_q.weight"]
    assert q.in_sum2.shape == (1, 576) and q.counts.tolist() == [17 * 128]
    assert im.entries["blk.29.ffn_down.weight"].in_sum2.shape == (1, 1536)
    imp = q.importance()
    np.testing.assert_allclose(imp, q.in_sum2 / q.counts[:, None], rtol=1e-6)
    assert np.all(imp > 0)


def test_our_imatrix_correlates_with_llama_cpp(tmp_path):
    out = tmp_path / "ours.gguf"
    assert run_cli("imatrix", "-m", llamacpp_tools.smollm2_gguf(), "-o", out,
                   "--calib", LLAMA_CPP_IMATRIX / "calib.txt", "--ctx", 128) == 0
    ours, theirs = read_imatrix(out), read_imatrix(LLAMA_CPP_IMATRIX / "imatrix.gguf")
    assert set(ours.entries) == set(theirs.entries)
    for name, t in theirs.entries.items():
        r = np.corrcoef(t.importance().ravel(), ours.entries[name].importance().ravel())[0, 1]
        assert r > 0.99, f"{name}: correlation {r:.4f}"


def _sample_imatrix():
    rng = np.random.default_rng(0)
    return Imatrix(
        entries={
            "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 64), dtype=np.float32) * 40, np.array([40.0], np.float32)),
            "blk.0.ffn_down_exps.weight": ImatrixEntry(rng.random((4, 32), dtype=np.float32) * 9,
                                                       np.array([9.0, 0.0, 3.0, 1.0], np.float32)),
        },
        datasets=["calib.txt"], chunk_count=1, chunk_size=40,
    )


def test_gguf_round_trip_through_gguf_py_and_our_reader(tmp_path):
    import gguf

    im = _sample_imatrix()
    path = tmp_path / "im.gguf"
    write_imatrix_gguf(path, im)
    back = read_imatrix(path)
    assert back.datasets == ["calib.txt"] and back.chunk_count == 1 and back.chunk_size == 40
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].in_sum2, e.in_sum2)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
        np.testing.assert_array_equal(np.asarray(tensors[name + ".in_sum2"].data).reshape(e.in_sum2.shape), e.in_sum2)
        np.testing.assert_array_equal(np.asarray(tensors[name + ".counts"].data).reshape(-1), e.counts)
    assert reader.fields["general.type"].contents() == "imatrix"
    unused = back.entries["blk.0.ffn_down_exps.weight"].importance()[1]
    np.testing.assert_array_equal(unused, np.ones(32))  # an expert with no tokens gets 1.0


def test_legacy_dat_and_gguf_read_the_same(tmp_path):
    im = _sample_imatrix()
    im.entries = {k: v for k, v in im.entries.items() if "exps" not in k}  # .dat keeps no per-expert counts
    write_imatrix_gguf(tmp_path / "a.gguf", im)
    write_imatrix_dat(tmp_path / "a.dat", im)
    g, d = read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "a.dat")
    assert d.chunk_count == 1 and d.datasets == ["calib.txt"]
    for name in im.entries:
        np.testing.assert_allclose(d.entries[name].importance().ravel(), g.entries[name].importance().ravel(),
                                   rtol=1e-6)


def test_llama_cpp_imatrix_as_legacy_dat_reads_the_same(tmp_path):
    theirs = read_imatrix(LLAMA_CPP_IMATRIX / "imatrix.gguf")
    write_imatrix_dat(tmp_path / "x.dat", theirs)
    legacy = read_imatrix(tmp_path / "x.dat")
    for name, e in theirs.entries.items():
        np.testing.assert_allclose(legacy.entries[name].importance().ravel(), e.importance().ravel(), rtol=1e-5)


def test_bad_imatrix_files(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\xff\xff\xff\x7f" + b"\x00" * 8)
    with pytest.raises(MixquantError, match="not an imatrix file"):
        read_imatrix(junk)
    cut = tmp_path / "cut.dat"
    write_imatrix_dat(cut, _sample_imatrix())
    cut.write_bytes(cut.read_bytes()[:40])
    with pytest.raises(MixquantError, match="truncated legacy imatrix"):
        read_imatrix(cut)
