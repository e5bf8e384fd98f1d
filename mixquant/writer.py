"""Writing a plan's files: every tensor, block of rows by block of rows, into the safetensors file
the plan put it in, whose header was written from the plan before any data; then the shard index.

What happens to a block between the source and the file (the family's transform, AWQ scales, the
rounding) is the `encode` callable's business: (entry, part index, first row, float32 block) ->
the arrays of `entry.out_specs()` for those rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from mixquant.blocks import tensor_blocks
from mixquant.errors import MixquantError
from mixquant.io.hf import INDEX_FILE
from mixquant.io.safetensors import StreamingWriter
from mixquant.progress import Progress
from mixquant.quant.plan import SAFETENSORS_METADATA, Plan


def write_weights(source, plan: Plan, folder: Path, encode: Callable, progress: bool | None = None,
                  done: set[str] = frozenset(), completed: Callable | None = None,
                  allow_nonfinite: bool = False) -> None:
    """done: files already there whole (a resumed run); completed(name) is called after each file.
    A source block with inf or NaN is an error unless `allow_nonfinite`."""
    import mlx.core as mx

    weight_map = {}
    with Progress("converting", plan.total_tensor_bytes, len(plan.entries), "tensors", progress,
                  byte_counts=True) as bar:
        for file_name, entries in plan.files.items():
            specs = [s for e in entries for s in e.out_specs()]
            if file_name in plan.model_files:
                weight_map.update({s.name: file_name for s in specs})
            if file_name in done:
                for entry in entries:
                    bar.advance(entry.nbytes)
                continue
            writer = StreamingWriter(folder / file_name, specs, SAFETENSORS_METADATA)
            for entry in entries:
                for part, r0, block in tensor_blocks(source, entry.tensor):
                    if not allow_nonfinite:
                        check_finite(block, entry.tensor.name, source.where)
                    for spec, arr in zip(entry.out_specs(), encode(entry, part, r0, block)):
                        writer.write(spec.name, arr)
                bar.advance(entry.nbytes)
                mx.clear_cache()
            writer.close()
            if completed is not None:
                completed(file_name)
    if len(plan.model_files) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for f in plan.model_files for e in plan.files[f])},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(folder / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)


NONFINITE_FLAG = "--allow-nonfinite"


def check_finite(block: np.ndarray, name: str, where: str) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        raise MixquantError(f"{where}: {name} holds {int(bad.sum())} inf or NaN value(s); refusing to convert "
                            f"it ({NONFINITE_FLAG} keeps such tensors unquantized, as they are)")


def nonfinite_tensors(source, plan: Plan) -> list[str]:
    """Names of the plan's tensors whose source values hold inf or NaN (reads every tensor once)."""
    return [e.tensor.name for e in plan.entries
            if any(not np.isfinite(block).all() for _, _, block in tensor_blocks(source, e.tensor))]


def write_config(plan: Plan, folder: Path) -> None:
    with open(folder / "config.json", "w") as f:
        json.dump(plan.output_config(), f, indent=2)
        f.write("\n")
