"""`mixquant compare` (one run, our recipes and mlx-lm's baselines) and `mixquant bench`."""

import json

import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def compare_report(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    assert run_cli("compare", fixture_dir, "--recipes", "unsloth:2-6", "--baselines", "mlx-lm",
                   "--ctx", 64, "--chunks", 1, "--out", out) == 0
    return out


def test_compare_has_every_family(compare_report):
    report = json.loads((compare_report / "report.json").read_text())
    by_family = {}
    for e in report["entries"]:
        by_family.setdefault(e["family"], []).append(e["name"])
    assert sorted(by_family["mixquant"]) == [f"unsloth-{b}" for b in range(2, 7)]
    assert len(by_family["mlx-lm uniform"]) >= 5
    assert len(by_family["mlx-lm mixed"]) >= 2
    sizes = [e["size_bytes"] for e in report["entries"]]
    assert sizes == sorted(sizes)
    ours = {e["name"]: e for e in report["entries"]}
    assert ours["unsloth-2"]["kld"]["mean"] > ours["unsloth-6"]["kld"]["mean"]
    assert ours["mlx-lm 2-bit"]["kld"]["mean"] > ours["mlx-lm 8-bit"]["kld"]["mean"]


def test_compare_writes_markdown_and_png(compare_report):
    md = (compare_report / "report.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 15
    sizes = [float(r.split("|")[3]) for r in rows]
    assert sizes == sorted(sizes)
    assert any("**unsloth-3**" in r for r in rows)
    png = (compare_report / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert not (compare_report / "models").exists()


def test_compare_given_candidates_against_saved_reference(fixture_dir, tmp_path):
    ref = tmp_path / "ref.npz"
    assert run_cli("eval", "--reference", fixture_dir, "--ctx", 64, "--chunks", 1, "--save-reference", ref) == 0
    q = tmp_path / "q4"
    assert run_cli("convert", "-i", fixture_dir, "-o", q, "-q", "--q-bits", "4") == 0
    out = tmp_path / "report"
    assert run_cli("compare", ref, q, "--out", out) == 0
    entries = json.loads((out / "report.json").read_text())["entries"]
    assert [(e["name"], e["family"]) for e in entries] == [("q4", "given")]


def test_compare_recipes_need_the_hf_reference(tmp_path, fixture_dir, capsys):
    ref = tmp_path / "ref.npz"
    run_cli("eval", "--reference", fixture_dir, "--ctx", 64, "--chunks", 1, "--save-reference", ref)
    capsys.readouterr()
    assert run_cli("compare", ref, "--recipes", "unsloth:3", "--out", tmp_path / "o") == 2
    assert "need the unquantized Hugging Face folder" in capsys.readouterr().err
    assert run_cli("compare", fixture_dir, "--recipes", "fancy:3", "--out", tmp_path / "o") == 2
    assert "--recipes: cannot read 'fancy:3'" in capsys.readouterr().err


def test_bench_compare_prints_both_and_ratio(fixture_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert run_cli("convert", "-i", fixture_dir, "-o", q, "-q", "--q-bits", "4", "--drop-vision") == 0
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert run_cli("bench", q, "--compare", q, "--prompt-tokens", 16, "--gen-tokens", 8, "--turns", 2,
                   "--turn-tokens", 8, "--repeats", 1, "--json", out) == 0
    text = capsys.readouterr().out
    assert text.count("\nq ") == 2 and "ratio (second / first): prefill" in text
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2
    for r in data["results"]:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["turn2_decode_tok_s"] > 0
        assert r["peak_memory_bytes"] > 0
    assert set(data["ratio"]) == {"prefill_tok_s", "decode_tok_s", "turn2_decode_tok_s"}
