"""How a family maps llama.cpp's GGUF tensors back to Hugging Face names and layouts.

A family's GGUFSpec lists, per GGUF tensor name pattern, the Hugging Face name it presents and a
layout op. The op becomes a Layout: a map from presented rows to file rows (llama.cpp reorders
V heads, rope halves, stacks experts) plus what is done to each block of rows (a column
permutation) or, for 1-D tensors, to the whole tensor. Row maps keep reading by row blocks: a
block of presented rows is a gather of runs of file rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

EXPERTS = "experts"  # [n_expert, rows, cols] in the file: one presented tensor per expert
EXPERTS_GATE_UP = "experts_gate_up"  # the same with gate and up fused along rows


def expert_slices(template: str, op: str, shape: tuple[int, ...]):
    """(presented name, presented shape, first file row) of each expert (and gate/up half) of a
    stacked [n_expert, rows, cols] GGUF tensor."""
    halves = ("gate", "up") if op == EXPERTS_GATE_UP else (None,)
    rows = shape[1] // len(halves)
    for e in range(shape[0]):
        for k, which in enumerate(halves):
            name = template.replace("{E}", str(e))
            yield (name.replace("{GATE_UP}", which) if which else name), (rows, shape[2]), e * shape[1] + k * rows


def identity(a):
    return a


@dataclass(frozen=True)
class Layout:
    rows: Callable[[np.ndarray], np.ndarray] | None = None  # reorders an array along axis 0 as the op does
    columns: Callable[[np.ndarray], np.ndarray] | None = None  # applied to every block of rows
    whole: Callable[[np.ndarray], np.ndarray] = identity  # 1-D tensors: applied to the whole tensor
    shape: Callable[[tuple[int, ...]], tuple[int, ...]] = tuple
    block: Callable[[np.ndarray], np.ndarray] = identity  # final reshape of a block (conv1d: add an axis)


@dataclass(frozen=True)
class GGUFSpec:
    archs: tuple[str, ...]  # general.architecture values
    globals: list[tuple[str, str, str | None]]  # (GGUF name regex, HF name, op)
    block: list[tuple[str, str, str | None]]  # the same within blk.N. (HF names relative to the layer)
    nextn: list[tuple[str, str, str | None]]  # MTP blocks' own tensors (beyond the decoder layer's)
    ignored: re.Pattern  # tensors llama.cpp derives from the config (rope_freqs, ...)
    layout: Callable[[str | None, dict], Layout]  # (op, config) -> Layout
    config: Callable  # (arch, GGUFFile, raw tensors, n_main_layers) -> HF config.json
    main_layers: Callable  # (arch, GGUFFile) -> decoder layers that are not MTP blocks
    arch_for: Callable  # output config -> the GGUF architecture of that model
    hf_name_of: Callable = lambda name: name  # output tensor name -> its text-only Hugging Face name
    layer_prefix: str = "model.layers.{L}."
    mtp_prefix: str = "mtp.layers.{L}."

    def name_of(self, output_name: str) -> str | None:
        """The llama.cpp name of an output tensor of the main model (what its imatrix entry is called)."""
        return self.gguf_name(self.hf_name_of(output_name))

    def hf_name(self, gguf_name: str, n_main_layers: int) -> tuple[str, str | None] | None:
        """(HF name, op) of one GGUF tensor, or None if it is not one of this family's weights."""
        for pattern, template, op in self.globals:
            if re.fullmatch(pattern, gguf_name):
                return template, op
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
        if not m:
            return None
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= n_main_layers:  # an MTP block
            for pattern, template, op in self.nextn:
                if re.fullmatch(pattern, rest):
                    return template, op
            prefix = self.mtp_prefix.format(L=layer - n_main_layers)
        else:
            prefix = self.layer_prefix.format(L=layer)
        for pattern, template, op in self.block:
            if re.fullmatch(pattern, rest):
                return prefix + template, op
        return None

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a Hugging Face weight name (the inverse of hf_name, main layers only);
        per-expert names map to the stacked tensor."""
        for pattern, template, _ in self.globals:
            if template == hf_name:
                return _literal(pattern)
        m = re.fullmatch(re.escape(self.layer_prefix).replace(r"\{L\}", r"(\d+)") + "(.+)", hf_name)
        if not m:
            return None
        layer, rest = m.group(1), re.sub(r"\.experts\.\d+\.", ".experts.{E}.", m.group(2))
        for pattern, template, _ in self.block:
            if template == rest or template.replace("{GATE_UP}", "gate") == rest or \
                    template.replace("{GATE_UP}", "up") == rest:
                return f"blk.{layer}." + _literal(pattern)
        return None


def _literal(pattern: str) -> str:
    return pattern.replace("\\", "")


# --- layout functions (numpy, on arrays in row-major order) -------------------------------------

def untile_v(a: np.ndarray, axis: int, n_k: int, head_dim: int) -> np.ndarray:
    """Inverse of llama.cpp's V-head reorder along `axis`: tiled (r, n_k, d) back to grouped (n_k, r, d)."""
    a = np.moveaxis(a, axis, 0)
    r = a.shape[0] // (n_k * head_dim)
    out = a.reshape(r, n_k, head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return np.moveaxis(out, 0, axis)


def tile_v(a: np.ndarray, axis: int, n_k: int, head_dim: int) -> np.ndarray:
    """llama.cpp's V-head reorder along `axis`: grouped (n_k, r, d) to tiled (r, n_k, d)."""
    a = np.moveaxis(a, axis, 0)
    r = a.shape[0] // (n_k * head_dim)
    out = a.reshape(n_k, r, head_dim, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
    return np.moveaxis(out, 0, axis)


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's llama permute: (n_head, d/2, 2) -> (n_head, 2, d/2) rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def field(meta, key: str, default=None, kind=int):
    """A numeric metadata value, or a one-line error naming the file and the key."""
    from mixquant.errors import MixquantError

    value = meta.get(key, default)
    if value is None:
        raise MixquantError(f"{meta.path}: metadata {key} is missing")
    if isinstance(value, (str, bytes, bool, list)) or (hasattr(value, "shape") and value.shape != ()):
        raise MixquantError(f"{meta.path}: metadata {key} is not a number ({value!r})")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise MixquantError(f"{meta.path}: metadata {key} is not a number ({value!r})") from None
    if kind is int and out != value:
        raise MixquantError(f"{meta.path}: metadata {key} is not a whole number ({value!r})")
    return out
