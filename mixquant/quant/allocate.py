"""A bit budget spent where it buys the most: one option per unit, minimising the predicted total KL
divergence (the sum of the units' measured or estimated dKL) under a byte budget.

This is a multiple-choice knapsack, solved by dynamic programming over the budget cut into
STEPS equal steps (each option's bytes rounded to the nearest step): exact up to that rounding,
whatever the sizes of the units (a few large ones, such as a small model's embedding and head,
defeat a Lagrangian sweep). If the rounding made the result overshoot the exact budget, the
downgrades that cost the least dKL per byte saved bring it back; the bytes still left then go,
greedily, to the upgrades that buy the most dKL per byte. Constraints from the recipe (rules that
fix a unit's setting, or bound its bits) restrict each unit's options first.

The result is data: a recipe with one rule per unit, which `mixquant plan` prints and the model
card lists; units are assumed additive (the sum of their dKL predicts the whole model's), which
benchmarks/allocation.py checks against measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixquant.errors import MixquantError
from mixquant.quant.options import KEEP, Option
from mixquant.quant.recipe import Recipe, Rule


@dataclass
class Choice:
    unit: str
    options: list[tuple[Option, int, float]]  # (option, bytes, dKL), allowed ones only


@dataclass
class Allocation:
    picks: dict[str, tuple[Option, int, float]]  # unit -> (option, bytes, dKL)
    fixed_bytes: int  # bytes of tensors that are not units (norms, ...)
    budget: int

    @property
    def unit_bytes(self) -> int:
        return sum(b for _, b, _ in self.picks.values())

    @property
    def total_bytes(self) -> int:
        return self.unit_bytes + self.fixed_bytes

    @property
    def predicted_kld(self) -> float:
        return sum(d for _, _, d in self.picks.values())


STEPS = 20000


def allocate(choices: list[Choice], budget: int, fixed_bytes: int = 0) -> Allocation:
    """The allocation within `budget` bytes (units plus `fixed_bytes`) with the least predicted KLD."""
    import numpy as np

    room = budget - fixed_bytes
    cheapest = sum(min(b for _, b, _ in c.options) for c in choices)
    if cheapest > room:
        raise MixquantError(f"the target is below what the constraints allow: at least "
                            f"{(cheapest + fixed_bytes) / 1e9:.4f} GB ({cheapest + fixed_bytes:,} bytes), "
                            f"target {budget / 1e9:.4f} GB ({budget:,} bytes)")
    step = max(room / STEPS, 1.0)
    steps = int(room // step)
    best = np.full(steps + 1, np.inf)  # least dKL of the units so far in exactly s steps
    best[0] = 0.0
    taken = []  # per unit: the option index that reaches each step count
    for c in choices:
        new, arg = np.full(steps + 1, np.inf), np.zeros(steps + 1, np.int16)
        for k, (_, b, d) in enumerate(c.options):
            w = int(round(b / step))
            if w > steps:
                continue
            candidate = best[: steps + 1 - w] + d
            better = candidate < new[w:]
            new[w:][better], arg[w:][better] = candidate[better], k
        best = new
        taken.append(arg)
    s = int(np.argmin(best))
    picks = {}
    for c, arg in zip(reversed(choices), reversed(taken)):
        option = c.options[int(arg[s])]
        picks[c.unit] = option
        s -= int(round(option[1] / step))
    picks = {c.unit: picks[c.unit] for c in choices}
    _fit(choices, picks, room)
    _top_up(choices, picks, room)
    return Allocation(picks, fixed_bytes, budget)


def _fit(choices: list[Choice], picks: dict, room: int) -> None:
    """Downgrade, least dKL added per byte saved first, until the picks fit `room` exactly."""
    by_unit = {c.unit: c for c in choices}
    spent = sum(b for _, b, _ in picks.values())
    while spent > room:
        best, best_rate = None, None
        for unit, (_, b0, d0) in picks.items():
            for option, b, d in by_unit[unit].options:
                if b < b0:
                    rate = (d - d0) / (b0 - b)
                    if best_rate is None or rate < best_rate:
                        best, best_rate = (unit, (option, b, d)), rate
        unit, pick = best
        spent += pick[1] - picks[unit][1]
        picks[unit] = pick


def _top_up(choices: list[Choice], picks: dict, room: int) -> None:
    """Spend what the sweep left: repeatedly take the upgrade with the most dKL saved per byte that
    still fits (and any that saves dKL for no bytes)."""
    by_unit = {c.unit: c for c in choices}
    spent = sum(b for _, b, _ in picks.values())
    while True:
        best, best_rate = None, 0.0
        for unit, (_, b0, d0) in picks.items():
            for option, b, d in by_unit[unit].options:
                if d >= d0 or spent - b0 + b > room:
                    continue
                rate = (d0 - d) / max(b - b0, 1e-9)
                if rate > best_rate:
                    best, best_rate = (unit, (option, b, d)), rate
        if best is None:
            return
        unit, pick = best
        spent += pick[1] - picks[unit][1]
        picks[unit] = pick


def as_recipe(allocation: Allocation, name: str, base_rules: list[Rule], group_size: int) -> Recipe:
    """The allocation as a recipe: the recipe's own rules (constraints that also fix settings), then
    one exact-name rule per unit."""
    rules = list(base_rules)
    for unit, (option, _, dkl) in allocation.picks.items():
        note = f"dKL {dkl:.3g}"
        if option == KEEP:
            rules.append(Rule(glob=unit, keep=True, note=note))
        else:
            rules.append(Rule(glob=unit, bits=option.bits, group_size=option.group_size, note=note))
    return Recipe(name, rules, group_size, None)
