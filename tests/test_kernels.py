"""The chunked Gated DeltaNet prefill equals mlx-lm's token-by-token recurrence."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.gated_delta import compute_g, gated_delta_ops, normalize_qk

from mixquant.kernels import chunk_prefill, chunked_gated_delta


def _inputs(seed, T, Hk=2, Hv=8, Dk=64, Dv=32, decay_near_one=False):
    rng = np.random.default_rng(seed)
    q, k = (mx.array(rng.normal(size=(1, T, Hk, Dk)).astype(np.float32)) for _ in range(2))
    q, k = normalize_qk(q, k, inv_scale=Dk**-0.5, eps=1e-6)
    v = mx.array(rng.normal(size=(1, T, Hv, Dv)).astype(np.float32))
    a = mx.array((rng.normal(size=(1, T, Hv)) - (6 if decay_near_one else 0)).astype(np.float32))
    A_log = mx.array(np.log(rng.uniform(1, 16, Hv)).astype(np.float32))
    g = compute_g(A_log, a, mx.zeros(Hv))
    beta = mx.sigmoid(mx.array((rng.normal(size=(1, T, Hv)) + (3 if decay_near_one else 0)).astype(np.float32)))
    state = mx.array(rng.normal(size=(1, Hv, Dv, Dk)).astype(np.float32) * 0.1)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 15, 16, 100, 512])
@pytest.mark.parametrize("hard", [False, True])
def test_equals_the_recurrence(T, hard):
    q, k, v, g, beta, state = _inputs(T, T, decay_near_one=hard)
    for s0 in (None, state):
        y_ref, s_ref = gated_delta_ops(q, k, v, g, beta, s0 if s0 is not None else mx.zeros(state.shape))
        y, s = chunked_gated_delta(q, k, v, g, beta, s0)
        assert float(mx.abs(y - y_ref).max()) <= 1e-5 * max(1.0, float(mx.abs(y_ref).max()))
        assert float(mx.abs(s - s_ref).max()) <= 1e-4 * max(1.0, float(mx.abs(s_ref).max()))


def test_fixture_logits_and_continued_decode(fixture_dir):
    """A 512-token prompt through the chunked form gives the token loop's logits (1e-4, float32),
    and decoding on from its cache gives the same next logits."""
    from mlx_lm.models.cache import make_prompt_cache

    from mixquant.loading import load

    model = load(fixture_dir, dtype="float32", dequantize=True).model  # chunked where mlx-lm would loop
    reference = load(fixture_dir, dtype="float32", dequantize=True).model
    plain = _unchunked(reference)
    ids = mx.array(np.random.default_rng(5).integers(0, 8166, (1, 512)))
    out = {}
    for name, m in (("chunked", model), ("loop", plain)):
        cache = make_prompt_cache(m)
        logits = m(ids, cache=cache)
        nxt = m(ids[:, :1], cache=cache)
        out[name] = (np.array(logits), np.array(nxt))
    assert np.abs(out["chunked"][0] - out["loop"][0]).max() <= 1e-4
    assert np.abs(out["chunked"][1] - out["loop"][1]).max() <= 1e-4


def _unchunked(model):
    """The model with mlx-lm's own Gated DeltaNet modules back."""
    from mlx.utils import tree_unflatten
    from mlx_lm.models.qwen3_5 import GatedDeltaNet

    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, GatedDeltaNet) and type(module) is not GatedDeltaNet:
            plain = GatedDeltaNet.__new__(GatedDeltaNet)
            dict.update(plain, module)
            plain.__dict__.update(module.__dict__)
            swaps.append((path, plain))
    assert swaps and chunk_prefill(model) == 0  # the loaded model was already chunked
    model.update_modules(tree_unflatten(swaps))
    return model


@pytest.mark.parametrize("which", ["float32", "unsloth-4"])
def test_greedy_output_is_the_plain_paths(which, fixture_dir, tmp_path):
    """20 prompts, greedy: mlx-lm's own Gated DeltaNet modules and ours (chunked prompts) decode the same
    tokens."""
    from mlx_lm.generate import generate_step

    from conftest import run_cli
    from mixquant.loading import load, load_tokenizer

    path = fixture_dir
    if which != "float32":
        path = tmp_path / "ud4"
        assert run_cli("convert", "-i", fixture_dir, "-o", path, "-q", "--q-bits", "4", "--drop-vision",
                       "--drop-mtp") == 0
    ours = load(path, dtype="float32", dequantize=True).model
    plain = _unchunked(load(path, dtype="float32", dequantize=True).model)
    ids = load_tokenizer(fixture_dir).encode((fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:100_000])
    step = len(ids) // 20
    for i in range(20):
        prompt = mx.array(ids[i * step : i * step + 48])
        decoded = [[t for t, _ in generate_step(prompt, m, max_tokens=24)] for m in (ours, plain)]
        assert decoded[0] == decoded[1], i


def test_batched_prefill_with_padding_equals_mlx_lms_own(fixture_dir):
    """mlx-lm's BatchGenerator prefills prompts of different lengths together (right-padded, with a
    mask and each prompt's length) and merges empty caches with an all-true mask: the chunked form
    gives the log-probabilities (1e-4, float32) and greedy tokens of mlx-lm's own modules."""
    from mlx_lm.generate import BatchGenerator

    from mixquant.loading import load, load_tokenizer

    ids = load_tokenizer(fixture_dir).encode((fixture_dir / "heldout.txt").read_text(encoding="utf-8")[:20_000])
    prompts = [ids[:40], ids[100:237], ids[300:397]]
    out = {}
    for name, model in (("chunked", load(fixture_dir, dtype="float32", dequantize=True).model),
                        ("loop", _unchunked(load(fixture_dir, dtype="float32", dequantize=True).model))):
        gen = BatchGenerator(model, prefill_step_size=64, stop_tokens=[])
        uids = gen.insert(prompts, max_tokens=[12] * len(prompts))
        got = {u: [] for u in uids}
        while any(len(v) < 12 for v in got.values()):
            for r in gen.next()[1]:
                got[r.uid].append((r.token, np.array(r.logprobs)))
        gen.close()
        out[name] = [got[u] for u in uids]
    for ours, theirs in zip(out["chunked"], out["loop"]):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        assert max(np.abs(a - b).max() for (_, a), (_, b) in zip(ours, theirs)) <= 1e-4
