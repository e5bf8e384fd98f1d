"""A logical tensor's values as they leave the source: block of rows by block of rows, float32,
with the family's transform applied (norm shift, conv1d layout). Conversion, the loading layer and
every calibration step read weights through here, so all of them see the same values."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mixquant.arch.tensors import TRANSFORMS, LogicalTensor, Part

ROW_BLOCK_BYTES = 64 * 1024 * 1024


def index_shape(shape, index) -> tuple[int, ...]:
    if index is None:
        return tuple(shape)
    index = index if isinstance(index, tuple) else (index,)
    out = [len(range(*ix.indices(dim))) for dim, ix in zip(shape, index) if isinstance(ix, slice)]
    return (*out, *shape[len(index):])


def compose(index, r0: int, r1: int):
    """`index` followed by rows r0:r1 of what it selects."""
    if index is None:
        return (slice(r0, r1),)
    index = index if isinstance(index, tuple) else (index,)
    lead = tuple(i for i in index if not isinstance(i, slice))
    rest = [i for i in index if isinstance(i, slice)]
    if rest:
        start = rest[0].start or 0
        return (*lead, slice(start + r0, start + r1), *rest[1:])
    return (*lead, slice(r0, r1))


def part_blocks(source, part: Part, block_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 block) over consecutive row ranges of the part (axis 0 after indexing),
    each at most `block_bytes` (default ROW_BLOCK_BYTES) unless one row is larger."""
    block_bytes = ROW_BLOCK_BYTES if block_bytes is None else block_bytes
    shape = index_shape(source.tensors[part.source].shape, part.index)
    if len(shape) < 2:
        yield 0, source.read(part.source, part.index)
        return
    row_bytes = 4 * int(np.prod(shape[1:]))
    step = max(1, block_bytes // max(row_bytes, 1))
    for r0 in range(0, shape[0], step):
        yield r0, source.read(part.source, compose(part.index, r0, min(shape[0], r0 + step)))


def tensor_blocks(source, tensor: LogicalTensor, block_bytes: int | None = None):
    """(part index, first row, transformed float32 block) over every part of the tensor, in order."""
    transform = TRANSFORMS[tensor.transform]
    for i, part in enumerate(tensor.parts):
        for r0, block in part_blocks(source, part, block_bytes):
            yield i, r0, transform(block)


def read_part(source, tensor: LogicalTensor, i: int) -> np.ndarray:
    """One part (expert) of the tensor, whole, transformed."""
    transform = TRANSFORMS[tensor.transform]
    return np.concatenate([transform(b) for _, b in part_blocks(source, tensor.parts[i])], axis=0)


def read_tensor(source, tensor: LogicalTensor) -> np.ndarray:
    """The whole tensor, transformed, experts stacked on a leading axis."""
    parts = [read_part(source, tensor, i) for i in range(len(tensor.parts))]
    return np.stack(parts) if tensor.stacked else parts[0]
