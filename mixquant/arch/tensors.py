"""What an architecture table produces (logical output tensors, each built from source parts) and
what a family file declares about itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mixquant.arch.roles import Role
from mixquant.errors import MixquantError

WEIGHT_SUFFIX = ".weight"
QUANTIZED_SUFFIXES = (".weight", ".scales", ".biases")  # what mlx-lm's quantized layers hold
SCOPE_MODEL, SCOPE_MTP, SCOPE_VISION = "model", "mtp", "vision"
MTP_FILE = "mtp.safetensors"  # the MTP head's sidecar: mlx-lm loads only model*.safetensors, so never sees it
KEEP_FLOAT32 = frozenset({Role.SSM_A_LOG})  # mlx-lm keeps A_log in float32 whatever the model's dtype


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
    scope: str = SCOPE_MODEL  # SCOPE_MODEL | SCOPE_MTP | SCOPE_VISION
    layer: int | None = None
    stacked: bool = False
    transform: str | None = None  # a TRANSFORMS key applied to each block read from the source
    keep_float32: bool = False  # stays float32 whatever --dtype says (A_log, as mlx-lm casts it)

    @property
    def module(self) -> str:
        """The module path mlx-lm's quantization config (and the model's module tree) keys on."""
        return self.name.removesuffix(WEIGHT_SUFFIX)

    @property
    def in_features(self) -> int:
        return self.shape[-1]

    @property
    def n_matrices(self) -> int:
        return len(self.parts) if self.stacked else 1


def quantized_names(module: str) -> tuple[str, str, str]:
    """The names of a quantized module's codes, scales and biases."""
    return tuple(module + s for s in QUANTIZED_SUFFIXES)


def weight_name(module: str) -> str:
    """The output name of a module's weight (the inverse of LogicalTensor.module)."""
    return module + WEIGHT_SUFFIX


@dataclass
class ArchPlan:
    """Everything an architecture decides about a source: tensors, and the config to write."""

    tensors: list[LogicalTensor]
    config: dict  # output config.json, without quantization
    dropped: list[str] = field(default_factory=list)  # source tensors deliberately not written


@dataclass(frozen=True)
class NormGroup:
    """A norm whose output the `consumers` read: scales folded into the norm move to their columns."""

    name: str  # for reports: "attn", "mlp"
    norm: Role
    consumers: tuple[Role, ...]


@dataclass(frozen=True)
class Structure:
    """What folding channel scales (AWQ) needs to know of a layer.

    `up_down`: (up, down) pairs where down reads up's output (times the gate's), so down's input
    channels can be scaled against up's rows; `mlp`: the (gate, up, down) of a dense MLP, whose
    gate/up scales are judged by the whole block's output."""

    norm_groups: tuple[NormGroup, ...]
    up_down: tuple[tuple[Role, Role], ...]
    mlp: tuple[Role, Role, Role] | None = None


@dataclass(frozen=True)
class Attention:
    """The layers that keep a KV cache growing with the context, and their heads; and the state of
    fixed size the other layers keep per sequence (Gated DeltaNet: a convolution window in the
    model's dtype and a recurrent state in float32), whatever the context."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    window_elements: int = 0
    state_elements: int = 0


@dataclass(frozen=True)
class Family:
    """One family of models: `arch/<family>.py` defines one of these and everything it points to."""

    name: str
    model_types: tuple[str, ...]  # config.json model_type values
    build: Callable  # (source, keep_vision, keep_mtp) -> ArchPlan
    structure: Structure
    gguf: Any = None  # the family's GGUFSpec (mixquant.arch.gguf_layout), if llama.cpp has it
    # tensors whose input channels llama.cpp orders differently (qwen35's ssm_out): (output name, values,
    # config, inverse) -> values in llama.cpp's order (or back from it)
    imatrix_order: Callable | None = None
    # tensor names that only an MLX folder has (HF folders of this family never do); None: the two
    # layouts are the same
    mlx_prefix: str | None = None
    # tensors of an MLX folder that are not the language model (vision tower, MTP head)
    excluded_prefixes: tuple[str, ...] = ()
    # (mlx-lm model, mtp.* tensors, quantization block, where) -> the parts MTP speculative decoding
    # runs (mixquant.arch.qwen35.MTPParts); None: the family has no MTP head
    mtp: Callable | None = None
    # config -> the language model's own config (a VLM wraps it in text_config); None: it is the config
    text_config: Callable | None = None
    # (config, where) -> Attention: the full-attention layers, whose KV cache grows with the context
    attention: Callable | None = None


def _norm_shift(a):
    # Zero-centred RMSNorm weights (scale = 1 + w) become the plain multiplier MLX's RMSNorm uses.
    # Done in float32 here and rounded once to the output dtype.
    return a + 1.0


def _conv1d_to_mlx(a):
    # HF depthwise conv weight (channels, 1, kernel) -> MLX Conv1d (channels, kernel, 1).
    return a.swapaxes(1, 2)


NORM_SHIFT, CONV1D_TO_MLX = "norm_shift", "conv1d_to_mlx"
TRANSFORMS = {
    None: lambda a: a,
    NORM_SHIFT: _norm_shift,
    CONV1D_TO_MLX: _conv1d_to_mlx,
}


def output_shape(transform: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if transform == CONV1D_TO_MLX:
        return (shape[0], shape[2], shape[1])
    return tuple(shape)


# --- helpers for family tables -----------------------------------------------------------------

class Claims:
    """Source tensors handed out to outputs; whatever is left over at the end is an error."""

    def __init__(self, source):
        self.source = source
        self.claimed: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> Part:
        info = self.source.tensors.get(name)
        if info is None:
            raise MixquantError(f"{self.source.where}: missing tensor {name}")
        if tuple(info.shape) != tuple(shape):
            raise MixquantError(
                f"{self.source.where}: tensor {name} has shape {list(info.shape)}, the config implies {list(shape)}"
            )
        self.claimed.add(name)
        return Part(name)

    def has(self, name: str) -> bool:
        return name in self.source.tensors

    def check_all_claimed(self, family: str) -> None:
        extra = sorted(set(self.source.tensors) - self.claimed)
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise MixquantError(f"{self.source.where}: unexpected tensor {extra[0]}{more} for {family}")


def rows_to_tensors(claims: Claims, rows, src_prefix, out_prefix, scope, layer=None, transform=None):
    """LogicalTensors for table rows (name relative to the prefixes, role, source shape); `transform`:
    role -> TRANSFORMS key, for the roles this family stores differently from mlx-lm."""
    out = []
    for rel, role, shape in rows:
        part = claims.take(src_prefix + rel, shape)
        t = (transform or {}).get(role)
        out.append(LogicalTensor(out_prefix + rel, role, output_shape(t, shape), [part], scope, layer, transform=t,
                                 keep_float32=role in KEEP_FLOAT32))
    return out


def stacked_experts(claims: Claims, n_experts: int, projections, src_prefix: str, out_prefix: str, scope: str,
                    layer: int):
    """Per-expert tensors (experts.E.gate_proj.weight) or fused ones (experts.gate_up_proj) -> stacked
    into mlx-lm's switch_mlp."""
    out = []
    fused_gate_up = src_prefix + "mlp.experts.gate_up_proj"
    fused_down = src_prefix + "mlp.experts.down_proj"
    fused = claims.has(fused_gate_up) or claims.has(fused_down)
    (_, _, (inter, hidden)), *_ = projections
    if fused:
        claims.take(fused_gate_up, (n_experts, 2 * inter, hidden))
        claims.take(fused_down, (n_experts, hidden, inter))
    for proj, role, shape in projections:
        if not fused:
            parts = [claims.take(f"{src_prefix}mlp.experts.{e}.{proj}.weight", shape) for e in range(n_experts)]
        elif proj == "down_proj":
            parts = [Part(fused_down, e) for e in range(n_experts)]
        else:
            rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
            parts = [Part(fused_gate_up, (e, rows)) for e in range(n_experts)]
        name = f"{out_prefix}mlp.switch_mlp.{proj}.weight"
        out.append(LogicalTensor(name, role, (n_experts, *shape), parts, scope, layer, stacked=True))
    return out
