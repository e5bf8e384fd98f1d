"""`mixquant eval` on the real fixture: agreement with a direct computation, reference caching."""

import json

import numpy as np
import pytest

from conftest import run_cli

CTX, CHUNKS = 128, 3


@pytest.fixture(scope="module")
def uniform4(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("u4") / "uniform4"
    assert run_cli("convert", "-i", fixture_dir, "-o", out, "--q-recipe", "uniform", "--q-bits", "4",
                   "--drop-vision", "--drop-mtp") == 0
    return out


@pytest.fixture(scope="module")
def saved_reference(fixture_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert run_cli("eval", "--reference", fixture_dir, "--ctx", CTX, "--chunks", CHUNKS, "--topk", "0",
                   "--save-reference", path) == 0
    return path


def test_eval_matches_direct_numpy_computation(fixture_dir, uniform4, tmp_path):
    """Reference logits from transformers (float64) and candidate logits from mlx-lm, KLD by hand."""
    import torch
    import transformers as tf

    from mixquant.bundled import EVAL_TEXT
    from mixquant.loading import load

    report_path = tmp_path / "r.json"
    assert run_cli("eval", "--model", uniform4, "--reference", fixture_dir, "--ctx", CTX, "--chunks", CHUNKS,
                   "--json", report_path) == 0
    report = json.loads(report_path.read_text())

    tokenizer = tf.AutoTokenizer.from_pretrained(fixture_dir)
    ids = tokenizer(EVAL_TEXT.read_text())["input_ids"][: CTX * CHUNKS]
    windows = np.array(ids).reshape(CHUNKS, CTX)
    ref_model = tf.AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float64)
    import mlx.core as mx

    q_model = load(uniform4, dequantize=True).model
    klds = []
    for w in windows:
        with torch.no_grad():
            r = ref_model(torch.tensor(w[None])).logits[0].numpy()[CTX // 2 : CTX - 1]
        q = np.array(q_model(mx.array(w[None]))[0].astype(mx.float32)).astype(np.float64)[CTX // 2 : CTX - 1]
        lr = r - r.max(-1, keepdims=True)
        lr -= np.log(np.exp(lr).sum(-1, keepdims=True))
        lq = q - q.max(-1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
        klds.append((np.exp(lr) * (lr - lq)).sum(-1))
    direct = np.concatenate(klds)
    assert report["tokens"] == len(direct) == CHUNKS * (CTX // 2 - 1)
    assert abs(report["kld"]["mean"] - direct.mean()) <= 1e-4
    assert 0.005 < report["kld"]["mean"] < 0.2  # 4-bit costs this trained model something real


def test_report_fields(uniform4, saved_reference, tmp_path):
    out = tmp_path / "r.json"
    assert run_cli("eval", "--model", uniform4, "--reference", saved_reference, "--json", out) == 0
    r = json.loads(out.read_text())
    assert set(r["kld"]) == {"mean", "stderr", "median", "p90", "p95", "p99", "p999", "max"}
    assert r["kld"]["median"] <= r["kld"]["p90"] <= r["kld"]["p99"] <= r["kld"]["p999"] <= r["kld"]["max"]
    assert 0.5 < r["same_top"] <= 1 and set(r["delta_p"]) == {"mean", "rms"}
    assert set(r["ppl"]) >= {"model", "reference"} and r["tokens"] == CHUNKS * (CTX // 2 - 1)
    size = sum(p.stat().st_size for p in uniform4.glob("model*.safetensors"))
    assert 0.99 * size < r["size_bytes"] <= size
    assert 4.0 < r["bpw"] < 5.0


def test_saved_reference_is_reused_without_running_the_reference(uniform4, saved_reference, fixture_dir,
                                                                 tmp_path, monkeypatch):
    import mixquant.eval.kld as kld

    forwards = {"n": 0}
    loaded = []
    real_forward, real_load = kld.forward_logits, kld.load

    def counting_forward(model, window):
        forwards["n"] += 1
        return real_forward(model, window)

    def recording_load(path, **kwargs):
        loaded.append(str(path))
        return real_load(path, **kwargs)

    monkeypatch.setattr(kld, "forward_logits", counting_forward)
    monkeypatch.setattr(kld, "load", recording_load)
    second = tmp_path / "second"
    assert run_cli("convert", "-i", fixture_dir, "-o", second, "-q", "--q-bits", "3", "--drop-vision") == 0
    reports = []
    for candidate in (uniform4, second):
        out = tmp_path / f"{candidate.name}.json"
        assert run_cli("eval", "--model", candidate, "--reference", saved_reference, "--json", out) == 0
        reports.append(json.loads(out.read_text()))
    assert loaded == [str(uniform4), str(second)]
    assert forwards["n"] == 2 * CHUNKS  # one pass per window per candidate, none for the reference
    assert reports[0]["kld"]["mean"] != reports[1]["kld"]["mean"]


def test_saved_and_live_reference_agree(uniform4, saved_reference, fixture_dir, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    run_cli("eval", "--model", uniform4, "--reference", saved_reference, "--json", a)
    run_cli("eval", "--model", uniform4, "--reference", fixture_dir, "--ctx", CTX, "--chunks", CHUNKS, "--json", b)
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert abs(ra["kld"]["mean"] - rb["kld"]["mean"]) < 1e-6
    assert ra["tokens"] == rb["tokens"]


def test_topk_reference_is_close_to_full(uniform4, fixture_dir, tmp_path):
    ref = tmp_path / "top.npz"
    assert run_cli("eval", "--reference", fixture_dir, "--ctx", CTX, "--chunks", 1, "--topk", 64,
                   "--save-reference", ref) == 0
    out_top, out_full = tmp_path / "t.json", tmp_path / "f.json"
    run_cli("eval", "--model", uniform4, "--reference", ref, "--json", out_top)
    run_cli("eval", "--model", uniform4, "--reference", fixture_dir, "--ctx", CTX, "--chunks", 1, "--topk", 0,
            "--json", out_full)
    top, full = json.loads(out_top.read_text()), json.loads(out_full.read_text())
    assert top["reference_topk"] == 64
    assert 0.8 * full["kld"]["mean"] <= top["kld"]["mean"] <= full["kld"]["mean"] + 1e-12  # tail lumped
    assert top["ppl"] == pytest.approx(full["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{tmp}/nope", "--reference", "{ref}"], "not a model folder"),
        (["--model", "{u4}", "--reference", "{tmp}/junk.npz"], "not a readable mixquant reference file"),
        (["--model", "{u4}", "--reference", "{fixture}", "--text", "{tmp}/short.txt"], "fewer than one window"),
        (["--model", "{u4}", "--reference", "{fixture}", "--text", "{tmp}/missing.txt"], "text file not found"),
        (["--reference", "{fixture}"], "give --model"),
    ],
)
def test_eval_errors(argv, message, uniform4, saved_reference, fixture_dir, tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"PK not really")
    (tmp_path / "short.txt").write_text("def f(): pass\n")
    subs = {"tmp": tmp_path, "ref": saved_reference, "u4": uniform4, "fixture": fixture_dir}
    capsys.readouterr()
    assert run_cli("eval", *[a.format(**subs) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixquant: error:") and message in err[0]
