"""How the engine cuts a prompt into prefill pieces: equal cost per decoding step."""

import pytest

from mixquant.server.engine import MIN_PREFILL_CHUNK, PREFILL_CHUNK, PrefillCost, prefill_cost, prefill_pieces


def test_without_a_cost_model_pieces_are_fixed_chunks():
    assert prefill_pieces(1300, 0, None) == [512, 512, 276]
    assert prefill_pieces(0, 0, None) == []


@pytest.mark.parametrize("offset", [0, 700, 50_000])
def test_pieces_cover_the_prompt_and_cost_no_more_than_the_first_chunk(offset):
    cost = PrefillCost(per_token=22e6, per_key=2048.0)
    sizes = prefill_pieces(9000, offset, cost)
    assert sum(sizes) == 9000 and all(a >= b for a, b in zip(sizes[:-2], sizes[1:-1]))  # the last is what is left
    budget = cost.of(PREFILL_CHUNK, 0)
    at = offset
    for n in sizes[:-1]:
        assert MIN_PREFILL_CHUNK <= n <= PREFILL_CHUNK
        assert cost.of(n, at) <= budget or n == MIN_PREFILL_CHUNK
        assert n == MIN_PREFILL_CHUNK or cost.of(n + 1, at) > budget or n == PREFILL_CHUNK  # as large as fits
        at += n
    if offset == 0:
        assert sizes[0] == PREFILL_CHUNK and sizes[-2] < PREFILL_CHUNK


def test_a_context_too_long_for_the_budget_stops_at_the_smallest_piece():
    assert set(prefill_pieces(640, 10**7, PrefillCost(per_token=1e6, per_key=4096.0))) == {MIN_PREFILL_CHUNK}


def test_the_fixtures_cost_counts_its_attention_and_linear_layers(fixture_dir, tmp_path):
    """Two full-attention layers of 4 heads of 64; linear layers without the output head, quantized
    or not."""
    import mixquant
    from conftest import run_cli
    from mixquant.io.hf import open_hf_folder

    quant = tmp_path / "ud4"
    assert run_cli("convert", "-i", fixture_dir, "-o", quant, "-q", "--q-bits", "4", "--drop-vision", "--drop-mtp") == 0
    cost = prefill_cost(mixquant.load(fixture_dir))
    assert prefill_cost(mixquant.load(quant)) == cost
    assert cost.per_key == 4 * 2 * 4 * 64
    matrices = sum(t.shape[0] * t.shape[1] for name, t in open_hf_folder(fixture_dir).tensors.items()
                   if name.startswith("model.language_model.layers.") and len(t.shape) == 2)
    assert cost.per_token == 2 * matrices
