"""What a unit of the model can be stored as, and what that costs in bytes.

A unit is what must share one setting: a tensor, or an MoE expert stack (mlx-lm keeps all experts
of a projection in one SwitchLinear). Its options are MLX affine quantization at 2, 3, 4, 5, 6 or 8
bits with groups of 32, 64 or 128 inputs (where the group divides the input width), or "keep":
stored unquantized in the output's float dtype. Bytes are exact: codes, plus a scale and a bias per
group in the float dtype, as the plan counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from mixquant.quant.recipe import GROUP_SIZES, SUPPORTED_BITS

FLOAT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, order=True)
class Option:
    bits: int | None  # None: keep (unquantized)
    group_size: int | None = None

    @property
    def key(self) -> str:
        return "keep" if self.bits is None else f"{self.bits}b{self.group_size}"

    @classmethod
    def parse(cls, key: str) -> "Option":
        if key == "keep":
            return KEEP
        bits, group = key.split("b")
        return cls(int(bits), int(group))

    def bytes(self, shape: tuple[int, ...], dtype: str = "bfloat16") -> int:
        n = prod(shape)
        if self.bits is None:
            return n * FLOAT_BYTES[dtype]
        *lead, width = shape
        groups = prod(lead) * (width // self.group_size)
        return n * self.bits // 8 + 2 * groups * FLOAT_BYTES[dtype]

    def bpw(self, dtype: str = "bfloat16") -> float:
        if self.bits is None:
            return 8.0 * FLOAT_BYTES[dtype]
        return self.bits + 16.0 * FLOAT_BYTES[dtype] / self.group_size


KEEP = Option(None, None)


def all_options(in_features: int, keep: bool = True) -> list[Option]:
    out = [Option(b, g) for b in SUPPORTED_BITS for g in GROUP_SIZES if in_features % g == 0]
    return out + [KEEP] if keep else out
