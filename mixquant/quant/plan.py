"""The conversion plan: per output tensor, its role, shape, bits, group size and bytes.

Built from an architecture's tensor list and a recipe without reading a weight; the writer
follows it exactly, so its byte counts are what lands on disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import prod

from mixquant.arch.tensors import (MTP_FILE, SCOPE_MODEL, SCOPE_MTP, SCOPE_VISION, ArchPlan, LogicalTensor,
                                   quantized_names)
from mixquant.errors import MixquantError
from mixquant.io.output import CONFIG_MARKER
from mixquant.io.safetensors import OutSpec, file_size
from mixquant.quant.recipe import Recipe

DTYPE_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MODEL_FILE = "model"  # model.safetensors or model-0000K-of-0000N.safetensors
SAFETENSORS_METADATA = {"format": "mlx"}
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class TensorPlan:
    tensor: LogicalTensor
    bits: int | None
    group_size: int | None
    dtype: str  # safetensors tag of the float data (unquantized weight, or scales and biases)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def params(self) -> int:
        return prod(self.tensor.shape)

    def out_specs(self) -> list[OutSpec]:
        t = self.tensor
        if not self.quantized:
            return [OutSpec(t.name, self.dtype, t.shape)]
        *lead, in_features = t.shape
        codes, scales, biases = quantized_names(t.module)
        groups = in_features // self.group_size
        return [
            OutSpec(codes, "U32", (*lead, in_features * self.bits // 32)),
            OutSpec(scales, self.dtype, (*lead, groups)),
            OutSpec(biases, self.dtype, (*lead, groups)),
        ]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.out_specs())

    @property
    def file_kind(self) -> str:
        return MTP_FILE if self.tensor.scope == SCOPE_MTP else MODEL_FILE


@dataclass
class Plan:
    entries: list[TensorPlan]
    arch: ArchPlan
    recipe: Recipe | None
    dtype: str  # bfloat16 | float16 | float32
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    warnings: list[str] = field(default_factory=list)  # e.g. a rules-file rule that matches no tensor

    def __post_init__(self):
        self.files = self._layout()

    # -- totals ---------------------------------------------------------------------------------
    def scope_totals(self, scope: str) -> tuple[int, int]:
        es = [e for e in self.entries if e.tensor.scope == scope]
        return sum(e.params for e in es), sum(e.nbytes for e in es)

    @property
    def total_tensor_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the text model (scales and biases counted; MTP and vision not)."""
        params, nbytes = self.scope_totals(SCOPE_MODEL)
        return 8 * nbytes / params if params else 0.0

    # -- file layout ----------------------------------------------------------------------------
    def _layout(self) -> dict[str, list[TensorPlan]]:
        """File name -> entries, in order. Model tensors fill shards up to max_shard_bytes."""
        max_shard_bytes = self.max_shard_bytes
        groups: list[list[TensorPlan]] = [[]]
        size = 0
        for e in self.entries:
            if e.file_kind != MODEL_FILE:
                continue
            if groups[-1] and size + e.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        n = len(groups)
        files = {}
        for i, g in enumerate(groups):
            files["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"] = g
        mtp = [e for e in self.entries if e.file_kind == MTP_FILE]
        if mtp:
            files[MTP_FILE] = mtp
        return files

    @property
    def file_bytes(self) -> int:
        """Exact bytes of all safetensors files the writer will produce (headers included)."""
        return sum(file_size([s for e in es for s in e.out_specs()], SAFETENSORS_METADATA)
                   for es in self.files.values())

    @property
    def model_files(self) -> list[str]:
        return [f for f in self.files if f != MTP_FILE]

    # -- config ---------------------------------------------------------------------------------
    def quantization_config(self) -> dict | None:
        """mlx-lm's `quantization` block: defaults plus an entry for every quantizable module."""
        if self.recipe is None:
            return None
        quantized = [e for e in self.entries if e.quantized]
        base_bits = self.recipe.bits or (quantized[0].bits if quantized else 4)
        q: dict = {"group_size": self.recipe.group_size, "bits": base_bits, "mode": "affine"}
        for e in self.entries:
            if not e.tensor.role.quantizable:
                continue
            q[e.tensor.module] = (
                {"group_size": e.group_size, "bits": e.bits, "mode": "affine"} if e.quantized else False
            )
        return q

    def output_config(self) -> dict:
        from mixquant import __version__

        config = json.loads(json.dumps(self.arch.config))
        config[CONFIG_MARKER] = {"version": __version__, "recipe": self.recipe.name if self.recipe else "none"}
        if MTP_FILE in self.files:  # the sidecar mlx-lm does not read; its modules' bits are in `quantization`
            config[CONFIG_MARKER]["mtp"] = {"file": MTP_FILE}
        q = self.quantization_config()
        if q is not None:
            config["quantization"] = q
            config["quantization_config"] = q
        return config

    # -- presentation ---------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        return [
            {
                "name": e.tensor.name,
                "role": e.tensor.role.value,
                "scope": e.tensor.scope,
                "shape": list(e.tensor.shape),
                "bits": e.bits,
                "group_size": e.group_size,
                "dtype": "U32" if e.quantized else e.dtype,
                "bytes": e.nbytes,
            }
            for e in self.entries
        ]

    def summary(self) -> dict:
        params, nbytes = self.scope_totals(SCOPE_MODEL)
        return {
            "recipe": self.recipe.name if self.recipe else "none",
            "dtype": self.dtype,
            "tensors": len(self.entries),
            "model_params": params,
            "model_bytes": nbytes,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "mtp_bytes": self.scope_totals(SCOPE_MTP)[1],
            "vision_bytes": self.scope_totals(SCOPE_VISION)[1],
            "file_bytes": self.file_bytes,
            "files": list(self.files),
            **({"cache": cache} if (cache := self.cache_summary()) else {}),
            **({"allocation": self.recipe.allocation} if self.recipe and self.recipe.allocation else {}),
        }

    def attention(self):
        """The model's attention layers and fixed state (mixquant.arch.tensors.Attention), or None."""
        from mixquant.arch import family_for_config

        family = family_for_config(self.arch.config, "config.json")
        return family.attention(self.arch.config, "config.json") if family.attention else None

    def cache_summary(self) -> dict | None:
        """A sequence's cache at each context of mixquant.kvbytes.CONTEXTS, in the model's dtype and at
        8 and 4 bits."""
        from mixquant.kvbytes import DTYPE_BYTES, fixed_bytes, kv_bytes_per_token, kv_table

        a = self.attention()
        if a is None:
            return None
        db = DTYPE_BYTES[self.dtype]
        return {"kv_bytes_per_token": {self.dtype: kv_bytes_per_token(a, db), "8-bit": kv_bytes_per_token(a, db, 8),
                                       "4-bit": kv_bytes_per_token(a, db, 4)},
                "fixed_bytes": fixed_bytes(a, db), "contexts": kv_table(a, self.dtype)}

    def to_json(self) -> dict:
        return {"summary": self.summary(), "tensors": self.rows(), "dropped": self.arch.dropped,
                "warnings": self.warnings}

    def format_table(self) -> str:
        rows = self.rows()
        header = ("name", "role", "shape", "bits", "group", "bytes")
        cells = [
            (
                r["name"],
                r["role"],
                "x".join(map(str, r["shape"])),
                str(r["bits"]) if r["bits"] else r["dtype"].lower(),
                str(r["group_size"] or "-"),
                f"{r['bytes']:,}",
            )
            for r in rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        right = {2, 3, 4, 5}

        def line(c):
            return "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths)))

        s = self.summary()
        out = [line(header), line(["-" * w for w in widths]), *map(line, cells), ""]
        out.append(f"recipe: {s['recipe']}   dtype: {s['dtype']}   tensors: {s['tensors']}")
        out.append(
            f"text model: {s['model_params']:,} params, {s['model_bytes'] / 1e9:.4f} GB, "
            f"{s['bits_per_weight']:.3f} bits per weight"
        )
        if s["mtp_bytes"]:
            out.append(f"mtp head: {s['mtp_bytes'] / 1e9:.4f} GB (sidecar {MTP_FILE})")
        if s["vision_bytes"]:
            out.append(f"vision tower: {s['vision_bytes'] / 1e9:.4f} GB (unquantized)")
        out.append(f"files: {', '.join(s['files'])}   total {s['file_bytes'] / 1e9:.4f} GB on disk")
        if "cache" in s:
            from mixquant.kvbytes import format_kv

            out += format_kv(self.attention(), self.dtype, s["model_bytes"])
        if "allocation" in s:
            a = s["allocation"]
            out.append(f"allocation: target {a['target']} = {a['target_bytes'] / 1e9:.4f} GB for the text model, "
                       f"{s['model_bytes'] / 1e9:.4f} GB used; predicted mean KLD {a['predicted_kld']:.5f} "
                       f"({a['sensitivity']} sensitivity on {a['calib']['spec']}"
                       f"{', priced after GPTQ' if a['calib'].get('priced_after') == 'gptq' else ''})")
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)


def make_plan(arch: ArchPlan, recipe: Recipe | None, dtype: str = "bfloat16",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Plan:
    if dtype not in DTYPE_TAGS:
        raise MixquantError(f"--dtype: unsupported {dtype!r} (use bfloat16, float16 or float32)")
    tag = DTYPE_TAGS[dtype]
    entries = []
    for t in arch.tensors:
        float_tag = "F32" if t.keep_float32 else tag
        decision = recipe.decide(t) if recipe else None
        if decision is None or decision.bits is None:
            entries.append(TensorPlan(t, None, None, float_tag))
            continue
        if t.in_features % decision.group_size:
            raise MixquantError(
                f"group size {decision.group_size} does not divide the input dimension {t.in_features} "
                f"of {t.name} (shape {list(t.shape)})"
            )
        entries.append(TensorPlan(t, decision.bits, decision.group_size, float_tag))
    warnings = []
    if recipe is not None:
        quantizable = [t for t in arch.tensors if t.role.quantizable]
        warnings = [f"{rule.where} matches no quantizable tensor" for rule in recipe.rules
                    if rule.where and not any(rule.matches(t) for t in quantizable)]
    return Plan(entries, arch, recipe, dtype, max_shard_bytes, warnings)
