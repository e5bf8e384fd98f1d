"""The bit budget: the knapsack against brute force, sizes on target, constraints, errors."""

import itertools

import numpy as np
import pytest

from mixquant.errors import MixquantError
from mixquant.quant.allocate import Choice, allocate
from mixquant.quant.options import KEEP, Option, all_options


def _convex_choices(rng, n_units):
    """Units whose dKL falls off as a power of their bytes, each with its own sensitivity."""
    out = []
    for u in range(n_units):
        size, sens = int(rng.integers(1000, 20000)), float(rng.lognormal(0, 2))
        opts = []
        for k, bits in enumerate((2, 3, 4, 5, 6, 8)):
            b = size * bits // 8 + size // 16
            opts.append((Option(bits, 64), b, sens * 2.0 ** (-2 * bits)))
        out.append(Choice(f"u{u}", opts))
    return out


def _brute_force(choices, room):
    best = None
    for picks in itertools.product(*(c.options for c in choices)):
        b = sum(p[1] for p in picks)
        d = sum(p[2] for p in picks)
        if b <= room and (best is None or d < best):
            best = d
    return best


@pytest.mark.parametrize("seed", range(6))
def test_close_to_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    choices = _convex_choices(rng, 4)
    lo = sum(min(o[1] for o in c.options) for c in choices)
    hi = sum(max(o[1] for o in c.options) for c in choices)
    for frac in (0.1, 0.3, 0.5, 0.8):
        budget = int(lo + frac * (hi - lo))
        a = allocate(choices, budget)
        assert a.total_bytes <= budget
        assert a.predicted_kld <= 1.05 * _brute_force(choices, budget) + 1e-15


def test_fixed_bytes_count_against_the_budget_and_the_minimum_is_an_error():
    choices = _convex_choices(np.random.default_rng(9), 3)
    cheapest = sum(min(o[1] for o in c.options) for c in choices)
    a = allocate(choices, cheapest + 500 + 10_000, fixed_bytes=500)
    assert a.total_bytes <= cheapest + 10_500 and a.fixed_bytes == 500
    with pytest.raises(MixquantError, match="the target is below what the constraints allow"):
        allocate(choices, cheapest + 499, fixed_bytes=500)


def test_a_budget_for_everything_takes_the_best_options():
    choices = _convex_choices(np.random.default_rng(3), 5)
    a = allocate(choices, 10**12)
    assert all(p[0].bits == 8 for p in a.picks.values())


def test_option_bytes_count_scales_and_biases():
    assert Option(4, 64).bytes((256, 512)) == 256 * 512 // 2 + 2 * 256 * 8 * 2
    assert Option(3, 128).bytes((4, 256, 128), "float32") == 4 * 256 * 128 * 3 // 8 + 2 * 4 * 256 * 4
    assert KEEP.bytes((10, 64)) == 1280
    assert Option(3, 64).bpw() == 3.5 and Option(3, 128).bpw() == 3.25 and Option(4, 64).bpw() == 4.5
    assert [o.key for o in all_options(96)] == [f"{b}b32" for b in (2, 3, 4, 5, 6, 8)] + ["keep"]
    assert Option.parse("5b128") == Option(5, 128) and Option.parse("keep") == KEEP
