"""What an architecture table produces: logical output tensors, each built from source parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Role kinds. Only "linear", "embedding" and "experts" can be quantized.
QUANTIZABLE_KINDS = ("linear", "embedding", "experts")


@dataclass(frozen=True)
class Role:
    name: str
    kind: str  # linear | embedding | experts | norm | conv | param | vision
    transform: str | None = None  # norm_shift | conv1d_to_mlx | None
    keep_float32: bool = False  # stays float32 whatever --dtype says (A_log, as mlx-lm casts it)

    @property
    def quantizable(self) -> bool:
        return self.kind in QUANTIZABLE_KINDS


@dataclass(frozen=True)
class Part:
    """One source tensor (optionally an index into it) that becomes all or one slice of an output."""

    source: str
    index: Any = None


@dataclass
class LogicalTensor:
    """One output float tensor before quantization.

    With several parts, the parts are stacked along a new leading axis (MoE experts); with one,
    the part is the whole tensor.
    """

    name: str  # output weight name in the MLX model's namespace
    role: Role
    shape: tuple[int, ...]
    parts: list[Part]
    scope: str = "model"  # model | mtp | vision
    layer: int | None = None
    stacked: bool = False

    @property
    def module(self) -> str:
        """The module path mlx-lm's quantization config keys on."""
        return self.name[: -len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def in_features(self) -> int:
        return self.shape[-1]


@dataclass
class ArchPlan:
    """Everything an architecture decides about a source: tensors, and the config to write."""

    tensors: list[LogicalTensor]
    config: dict  # output config.json, without quantization
    dropped: list[str] = field(default_factory=list)  # source tensors deliberately not written


def _norm_shift(a):
    # Zero-centred RMSNorm weights (scale = 1 + w) become the plain multiplier MLX's RMSNorm uses.
    # Done in float32 here and rounded once to the output dtype.
    return a + 1.0


def _conv1d_to_mlx(a):
    # HF depthwise conv weight (channels, 1, kernel) -> MLX Conv1d (channels, kernel, 1).
    return a.swapaxes(1, 2)


TRANSFORMS = {
    None: lambda a: a,
    "norm_shift": _norm_shift,
    "conv1d_to_mlx": _conv1d_to_mlx,
}
