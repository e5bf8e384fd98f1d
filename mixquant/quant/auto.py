"""`--q-recipe auto`: a recipe made by allocating a byte budget over measured sensitivities.

Every quantizable tensor of the text model is a unit; its allowed options are all of
mixquant.quant.options, narrowed by the constraints: MoE routers never below 8 bits (as mlx-lm
keeps them), and a rules file's rules (`recipe = "auto"`): a rule with bits / group_size / keep
fixes the units it matches, one with min_bits / max_bits bounds them. The MTP head and the vision
tower are not units: they follow the base rules (kept unquantized unless a rule says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from mixquant.arch.roles import ROUTERS
from mixquant.arch.tensors import SCOPE_MODEL
from mixquant.errors import MixquantError
from mixquant.quant.allocate import Allocation, Choice, allocate, as_recipe
from mixquant.quant.options import Option, all_options
from mixquant.quant.recipe import AUTO, ROUTER_BITS, Recipe, Rule
from mixquant.quant.sensitivity import Sensitivity, units_of


MIN_BPW, MAX_BPW = 1.0, 32.0


def check_bpw(value, where: str) -> float:
    """A target in bits per weight: a finite number within MIN_BPW..MAX_BPW (CLI and compare alike)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not MIN_BPW <= value <= MAX_BPW:
        raise MixquantError(f"{where}: must be within {MIN_BPW:g}..{MAX_BPW:g} bits per weight, got {value!r}")
    return float(value)


@dataclass
class Target:
    bpw: float | None = None
    bytes: int | None = None  # language-model tensor bytes, as plan counts them

    def budget(self, params: int) -> int:
        return self.bytes if self.bytes is not None else int(self.bpw * params / 8)

    def describe(self) -> str:
        return f"{self.bpw:.2f} bpw" if self.bpw is not None else f"{self.bytes / 1e9:.4f} GB"


def allowed_options(tensor, rules: list[Rule]) -> list[Option] | None:
    """The options of a unit (its LogicalTensor) under the rules; None when a rule fixes its setting
    (then it is not allocated)."""
    options = all_options(tensor.in_features)
    if tensor.role in ROUTERS:
        options = [o for o in options if o.bits is None or o.bits >= ROUTER_BITS]
    fixed = False
    for rule in rules:
        if not rule.matches(tensor):
            continue
        if rule.keep or rule.bits is not None or rule.group_size is not None:
            fixed = True
        if rule.min_bits is not None:
            options = [o for o in options if o.bits is None or o.bits >= rule.min_bits]
        if rule.max_bits is not None:
            options = [o for o in options if o.bits is not None and o.bits <= rule.max_bits]
    return None if fixed else options


def auto_recipe(unquantized_plan, sensitivity: Sensitivity, target: Target, rules: list[Rule], group_size: int,
                where: str) -> tuple[Recipe, Allocation]:
    """The recipe that spends the target's bytes where the sensitivities say they buy the most."""
    from mixquant.quant.plan import make_plan

    units = units_of(unquantized_plan)
    sensitivity.check_covers(units, where)
    dtype = unquantized_plan.dtype
    fixed_plan = make_plan(unquantized_plan.arch, Recipe("auto-constraints", list(rules), group_size, None), dtype)
    tensors = {e.tensor.name: e.tensor for e in unquantized_plan.entries}
    choices = []
    for u in units:
        options = allowed_options(tensors[u.name], rules)
        measured = sensitivity.units[u.name]["options"]
        options = [o for o in options or [] if o.key in measured]
        if options:
            choices.append(Choice(u.name, [(o, o.bytes(u.shape, dtype), measured[o.key]) for o in options]))
    allocated = {c.unit for c in choices}
    fixed_bytes = sum(e.nbytes for e in fixed_plan.entries
                      if e.tensor.scope == SCOPE_MODEL and e.tensor.name not in allocated)
    params = sum(e.params for e in unquantized_plan.entries if e.tensor.scope == SCOPE_MODEL)
    allocation = allocate(choices, target.budget(params), fixed_bytes)
    name = f"{AUTO}-{target.describe().replace(' ', '')}"
    recipe = as_recipe(allocation, name, rules, group_size)
    recipe.allocation = {"target": target.describe(), "target_bytes": allocation.budget,
                         "predicted_kld": allocation.predicted_kld, "sensitivity": sensitivity.mode,
                         "calib": sensitivity.calib, "units": len(choices),
                         "fixed_units": len(units) - len(choices)}
    return recipe, allocation
