"""Recipes: an ordered list of rules that turns each tensor into a quantization decision.

A rule matches a tensor by role, by glob or regex on its output name, within a scope (the text
model, the MTP head, the vision tower). Rules are applied in order and the last one that
matches decides, so a rules file can start from a built-in recipe and override parts of it.
Nothing here touches weights: a recipe can be printed, diffed and tested on its own.
"""

from __future__ import annotations

import fnmatch

import regex
from dataclasses import dataclass, field
from pathlib import Path

from mixquant.arch.roles import (ATTN_IN, ATTN_OUT, EMBED, FFN_DOWN, FFN_GATE_UP, LM_HEAD, MTP_PROJECTIONS, ROUTERS,
                                 SSM_GATES, Role)
from mixquant.arch.tensors import SCOPE_MODEL, SCOPE_MTP, SCOPE_VISION, LogicalTensor
from mixquant.errors import MixquantError
from mixquant.io.textfile import read_toml

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
SCOPE_ANY = "any"
SCOPES = (SCOPE_MODEL, SCOPE_MTP, SCOPE_VISION, SCOPE_ANY)
ROUTER_BITS = 8
AUTO = "auto"


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role] = frozenset()
    glob: str | None = None
    regex: str | None = None
    scope: str = SCOPE_MODEL
    bits: int | None = None
    group_size: int | None = None
    keep: bool = False  # leave unquantized
    note: str = ""
    where: str = ""  # rules from a file: "FILE: rules[i]", for messages about that rule
    min_bits: int | None = None  # auto recipes: bounds on the options the allocation may choose
    max_bits: int | None = None

    def matches(self, t: LogicalTensor) -> bool:
        if self.scope != SCOPE_ANY and t.scope != self.scope:
            return False
        if self.roles and t.role not in self.roles:
            return False
        if self.glob is not None and not fnmatch.fnmatchcase(t.name, self.glob):
            return False
        if self.regex is not None and not _search(self.regex, t.name, self.where):
            return False
        return True


REGEX_SECONDS = 0.5  # a rule's regex gets this long per tensor name; past it the rule is refused
MAX_RULES = 4096


def _search(pattern: str, name: str, where: str) -> bool:
    try:
        return regex.search(pattern, name, timeout=REGEX_SECONDS) is not None
    except TimeoutError:
        raise MixquantError(f"{where or 'rule'}: regex {pattern!r} takes over {REGEX_SECONDS} s on {name!r} "
                            "(catastrophic backtracking); simplify it") from None


@dataclass(frozen=True)
class Decision:
    bits: int | None  # None: not quantized
    group_size: int | None


UNQUANTIZED = Decision(None, None)


@dataclass
class Recipe:
    name: str
    rules: list[Rule] = field(default_factory=list)
    group_size: int = DEFAULT_GROUP_SIZE
    bits: int | None = None  # the base bits, recorded as the config's default
    auto: bool = False  # the rules are constraints for an allocation still to be made
    allocation: dict | None = None  # set on the recipe an allocation made: target, predicted KLD, ...

    def decide(self, t: LogicalTensor) -> Decision:
        decision = UNQUANTIZED
        if not t.role.quantizable:
            return decision
        for rule in self.rules:
            if not rule.matches(t):
                continue
            if rule.keep:
                decision = UNQUANTIZED
            else:
                bits = rule.bits if rule.bits is not None else (decision.bits or self.bits)
                group = rule.group_size or decision.group_size or self.group_size
                decision = UNQUANTIZED if bits is None else Decision(bits, group)
        return decision

    def describe(self) -> str:
        return f"{self.name} (group size {self.group_size})"


def snap_bits(bits: int) -> int:
    """The smallest supported width at or above `bits`, capped at 8."""
    for b in SUPPORTED_BITS:
        if b >= bits:
            return b
    return SUPPORTED_BITS[-1]


def check_bits(bits: int, where: str) -> int:
    if bits not in SUPPORTED_BITS:
        raise MixquantError(f"{where}: unsupported bits {bits} (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    return bits


def check_group_size(group_size: int, where: str) -> int:
    if group_size not in GROUP_SIZES:
        raise MixquantError(f"{where}: unsupported group size {group_size} (supported: 32, 64, 128)")
    return group_size


AUTO_MTP_BITS = 8


def mtp_rules(bits: int | None) -> list[Rule]:
    """The MTP head's projections at `bits` (None: kept unquantized), its routers at 8 bits; its norms,
    as everywhere, never quantized."""
    return [Rule(roles=MTP_PROJECTIONS, scope=SCOPE_MTP, bits=bits, keep=bits is None, note="the MTP head"),
            Rule(roles=ROUTERS, scope=SCOPE_MTP, bits=None if bits is None else ROUTER_BITS,
                 keep=bits is None)]


def uniform(bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, mtp_bits: int | None = -1) -> Recipe:
    """Every linear, the embedding and lm_head at `bits`; MoE routers at 8 bits, as mlx_lm.convert does.
    The MTP head's projections at `bits` too (mtp_bits None: unquantized)."""
    check_bits(bits, "--q-bits")
    rules = [
        Rule(roles=FFN_GATE_UP | FFN_DOWN | ATTN_IN | ATTN_OUT | SSM_GATES | EMBED | LM_HEAD, bits=bits),
        Rule(roles=ROUTERS, bits=ROUTER_BITS, note="routers stay at 8 bits"),
        *mtp_rules(bits if mtp_bits == -1 else mtp_bits),
    ]
    return Recipe(f"uniform-{bits}", rules, group_size, bits)


def unsloth(base_bits: int = 3, group_size: int = DEFAULT_GROUP_SIZE, out_proj_8bit: bool = False,
            mtp_bits: int | None = -1) -> Recipe:
    """The Unsloth-Dynamic per-tensor rules, for base bits B in 2..8; the MTP head's projections at the
    attention bits (mtp_bits None: unquantized)."""
    if not 2 <= base_bits <= 8:
        raise MixquantError(f"--q-bits: unsloth base bits must be 2..8, got {base_bits}")
    b = base_bits
    rules = [
        Rule(roles=FFN_GATE_UP, bits=snap_bits(b)),
        Rule(roles=FFN_DOWN, bits=snap_bits(b + 1)),
        Rule(roles=ATTN_IN, bits=snap_bits(b + 2)),
        Rule(roles=EMBED, bits=snap_bits(b + 2)),
        Rule(roles=LM_HEAD, bits=snap_bits(b + 3)),
        Rule(roles=ATTN_OUT, bits=8) if out_proj_8bit else Rule(roles=ATTN_OUT, keep=True),
        Rule(roles=SSM_GATES, keep=True),
        Rule(roles=ROUTERS, bits=ROUTER_BITS),
        *mtp_rules(snap_bits(b + 2) if mtp_bits == -1 else mtp_bits),
    ]
    return Recipe(f"unsloth-{b}", rules, group_size, b)


RULE_KEYS = {"name", "regex", "role", "roles", "scope", "bits", "group_size", "keep", "min_bits", "max_bits"}
FILE_KEYS = {"recipe", "bits", "group_size", "out_proj_8bit", "rules"}


def from_file(path: Path, bits: int | None, group_size: int, out_proj_8bit: bool, mtp_bf16: bool = False) -> Recipe:
    """A TOML rules file: an optional base recipe, then [[rules]] applied after it, in order."""
    path = Path(path)
    if not path.exists():
        raise MixquantError(f"{path}: rules file not found")
    data = read_toml(path)
    unknown = set(data) - FILE_KEYS
    if unknown:
        raise MixquantError(f"{path}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(FILE_KEYS))})")
    for key in ("group_size", "bits"):
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool)):
            raise MixquantError(f"{path}: {key} must be an integer")
    group_size = check_group_size(data.get("group_size", group_size), f"{path}: group_size")
    if "bits" in data:
        bits = data["bits"]
        if data.get("recipe") == "unsloth" and not 2 <= bits <= 8:
            raise MixquantError(f"{path}: bits: unsloth base bits must be 2..8, got {bits}")
        if data.get("recipe") != "unsloth":
            check_bits(bits, f"{path}: bits")
    base = data.get("recipe")
    out_proj_8bit = bool(data.get("out_proj_8bit", out_proj_8bit))
    if base is None:
        recipe = Recipe(path.stem, [], group_size, check_bits(bits, f"{path}: bits") if bits is not None else None)
    elif base == AUTO:
        recipe = auto_base(group_size, mtp_bf16)
    elif base == "uniform":
        recipe = uniform(4 if bits is None else bits, group_size, mtp_bits=None if mtp_bf16 else -1)
    elif base == "unsloth":
        recipe = unsloth(3 if bits is None else bits, group_size, out_proj_8bit, mtp_bits=None if mtp_bf16 else -1)
    else:
        raise MixquantError(f"{path}: unknown base recipe {base!r} (use uniform, unsloth or auto)")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise MixquantError(f"{path}: rules must be an array of tables ([[rules]])")
    if len(rules) > MAX_RULES:
        raise MixquantError(f"{path}: {len(rules)} rules, more than the {MAX_RULES} a rules file may hold")
    for i, entry in enumerate(rules):
        recipe.rules.append(_rule_from_table(entry, f"{path}: rules[{i}]"))
    recipe.name = path.stem if base is None else f"{path.stem} (on {recipe.name})"
    return recipe


def _rule_from_table(entry: dict, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise MixquantError(f"{where}: must be a table")
    unknown = set(entry) - RULE_KEYS
    if unknown:
        raise MixquantError(f"{where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(RULE_KEYS))})")
    roles = entry.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if "role" in entry:
        roles = [*roles, entry["role"]]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise MixquantError(f"{where}: role/roles must be names (strings)")
    known = {r.value for r in Role}
    unknown_roles = [r for r in roles if r not in known]
    if unknown_roles:
        raise MixquantError(f"{where}: unknown role {unknown_roles[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("name", "regex", "scope"):
        if key in entry and not isinstance(entry[key], str):
            raise MixquantError(f"{where}: {key} must be a string")
    if not roles and "name" not in entry and "regex" not in entry:
        raise MixquantError(f"{where}: needs one of name (glob), regex or role")
    if "regex" in entry:
        try:
            regex.compile(entry["regex"])
        except regex.error as e:
            raise MixquantError(f"{where}: bad regex ({e})") from None
    scope = entry.get("scope", SCOPE_MODEL)
    if scope not in SCOPES:
        raise MixquantError(f"{where}: scope must be one of {', '.join(SCOPES)}")
    keep = entry.get("keep", False)
    if not isinstance(keep, bool):
        raise MixquantError(f"{where}: keep must be true or false")
    bits = entry.get("bits")
    if bits is not None:
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise MixquantError(f"{where}: bits must be an integer")
        check_bits(bits, f"{where}: bits")
    bounds = {}
    for key in ("min_bits", "max_bits"):
        if key in entry:
            value = entry[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise MixquantError(f"{where}: {key} must be an integer")
            bounds[key] = check_bits(value, f"{where}: {key}")
    if not keep and bits is None and "group_size" not in entry and not bounds:
        raise MixquantError(f"{where}: says neither bits, group_size, keep nor min_bits/max_bits")
    group = entry.get("group_size")
    if group is not None:
        if not isinstance(group, int) or isinstance(group, bool):
            raise MixquantError(f"{where}: group_size must be an integer")
        check_group_size(group, f"{where}: group_size")
    return Rule(frozenset(Role(r) for r in roles), entry.get("name"), entry.get("regex"), scope, bits, group, keep,
                where=where, **bounds)


def auto_base(group_size: int = DEFAULT_GROUP_SIZE, mtp_bf16: bool = False) -> Recipe:
    """The start of an auto recipe: its constraints (the allocation adds one rule per unit)."""
    return Recipe(AUTO, mtp_rules(None if mtp_bf16 else AUTO_MTP_BITS), group_size, None, auto=True)


def recipe_from_options(recipe: str, bits: int | None, group_size: int, out_proj_8bit: bool = False,
                        mtp_bf16: bool = False) -> Recipe:
    check_group_size(group_size, "--q-group-size")
    mtp_bits = None if mtp_bf16 else -1
    if recipe == AUTO:
        return auto_base(group_size, mtp_bf16)
    if recipe == "uniform":
        return uniform(4 if bits is None else bits, group_size, mtp_bits)
    if recipe == "unsloth":
        return unsloth(3 if bits is None else bits, group_size, out_proj_8bit, mtp_bits)
    path = Path(recipe)
    if path.suffix != ".toml":
        raise MixquantError(f"--q-recipe: {recipe!r} is neither uniform, unsloth, auto nor a .toml rules file")
    return from_file(path, bits, group_size, out_proj_8bit, mtp_bf16)
