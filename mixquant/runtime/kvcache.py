"""The caches behind a per-layer KV allocation (mixquant.runtime.kv): MixedKVCache for one sequence,
BatchMixedKVCache for mlx-lm's BatchGenerator (the server), both composed from mlx-lm's cache classes.

A stored tensor is a tuple: (values,) in the model's dtype, or (packed, scales, biases) as
mx.quantize gives them. Where a layer's K and V share a width the cache exposes `bits` and
`group_size`, and mlx-lm's attention reads it packed exactly as it reads a QuantizedKVCache;
otherwise attention is handed K and V dequantized. A cache's `spec` is a mixquant.runtime.kv.LayerKV
(its K and V widths, each a Width)."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, _BaseCache, create_attention_mask, dynamic_roll

# A stored tensor is a tuple: (values,) in the model's dtype, or (packed, scales, biases).

def _quantize(x, w) -> tuple:
    return (x,) if w.bits is None else tuple(mx.quantize(x, group_size=w.group_size, bits=w.bits))


def _dequantize(parts: tuple, w):
    return parts[0] if len(parts) == 1 else mx.dequantize(*parts, group_size=w.group_size, bits=w.bits)


def _map(f, parts: tuple) -> tuple:
    return tuple(f(p) for p in parts)


def _grow(parts: tuple, new_len: int) -> tuple:
    def grow(p):
        pad = mx.zeros((*p.shape[:2], new_len - p.shape[2], p.shape[3]), dtype=p.dtype)
        return mx.concatenate([p, pad], axis=2)

    return _map(grow, parts)


def _write(buf: tuple, new: tuple, at: int) -> None:
    for b, n in zip(buf, new):
        b[..., at: at + n.shape[2], :] = n


def _capacity(n: int, step: int) -> int:
    return (n + step - 1) // step * step


class _Stored:
    """K and V of one layer, in one phase: float (until `start`) or quantized."""

    def __init__(self, spec, start: int):
        self.spec, self.start = spec, start
        self.keys = self.values = None  # tuples of arrays, [batch, heads, capacity, ...]
        self.quantized = False

    def _expose(self) -> None:
        """`bits` (mlx-lm's sign of a packed cache) only while K and V are packed at one width."""
        k, v = self.spec.k, self.spec.v
        if self.quantized and k == v and k.bits is not None:
            self.bits, self.group_size = k.bits, k.group_size
        else:
            self.__dict__.pop("bits", None)
            self.__dict__.pop("group_size", None)

    def _put(self, keys, values, at: int, step: int) -> None:
        k, v = self._encode(keys, self.spec.k), self._encode(values, self.spec.v)
        if self.keys is None:
            cap = _capacity(at + keys.shape[2], step)
            self.keys, self.values = _grow(_map(lambda p: p[..., :0, :], k), cap), \
                _grow(_map(lambda p: p[..., :0, :], v), cap)
        elif at + keys.shape[2] > self.keys[0].shape[2]:
            cap = _capacity(at + keys.shape[2], step)
            self.keys = _grow(_map(lambda p: p[..., :at, :], self.keys), cap)
            self.values = _grow(_map(lambda p: p[..., :at, :], self.values), cap)
        _write(self.keys, k, at)
        _write(self.values, v, at)

    def _encode(self, x, w) -> tuple:
        return _quantize(x, w) if self.quantized else (x,)

    def _settle(self, held: int) -> None:
        """Pack now if the next call would (it holds `held` positions): before its contents are kept."""
        if not self.quantized and held and held >= self.start:
            self._convert()

    def _convert(self) -> None:
        """Float to quantized: every stored position packed at the layer's widths."""
        if self.keys is not None:
            self.keys = _quantize(self.keys[0], self.spec.k)
            self.values = _quantize(self.values[0], self.spec.v)
        self.quantized = True
        self._expose()

    def _fetch(self, n: int):
        k = _map(lambda p: p[..., :n, :], self.keys)
        v = _map(lambda p: p[..., :n, :], self.values)
        if hasattr(self, "bits"):
            return k, v
        return _dequantize(k, self.spec.k), _dequantize(v, self.spec.v)

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(p.nbytes for p in self.keys + self.values)


class MixedKVCache(_Stored, _BaseCache):
    """One sequence's KV for one attention layer at its LayerKV. It stores the model's dtype until a
    call finds it holding `start` tokens or more (mlx-lm's quantized_kv_start), then packs everything:
    the call that reaches `start` attends in float and later ones to the packed cache, as mlx-lm's
    generate_step, which quantizes between calls, does."""

    step = 256

    def __init__(self, spec, start: int = 0):
        super().__init__(spec, start)
        self.offset = 0

    def update_and_fetch(self, keys, values):
        prev = self.offset
        self._settle(prev)
        self._put(keys, values, prev, self.step)
        self.offset += keys.shape[2]
        return self._fetch(self.offset)

    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v

    def contents(self) -> tuple[tuple, tuple]:
        """K and V up to the offset, as new arrays (for snapshots), packed if they are due to be."""
        self._settle(self.offset)
        if self.keys is None:
            return (), ()
        return tuple(_map(lambda p: mx.contiguous(p[..., : self.offset, :]), t) for t in (self.keys, self.values))

    @classmethod
    def restored(cls, spec, start: int, quantized: bool, keys: tuple, values: tuple, offset: int):
        c = cls(spec, start)
        c.quantized = quantized
        c._expose()
        if keys:
            c.keys, c.values, c.offset = keys, values, offset
        return c

    @classmethod
    def merge(cls, caches):
        return BatchMixedKVCache.merge(caches)


class BatchMixedKVCache(_Stored, BatchKVCache):
    """MixedKVCache for a batch (left-padded, as mlx-lm's BatchKVCache): what the server decodes.
    The batch turns packed as MixedKVCache does (its buffers' length counting), or when it meets a
    packed cache (merge, extend)."""

    def __init__(self, spec, start: int, left_padding):
        BatchKVCache.__init__(self, left_padding)
        _Stored.__init__(self, spec, start)

    def update_and_fetch(self, keys, values):
        prev = self._idx
        self._settle(prev)
        self._put(keys, values, prev, self.step)
        self.offset = self.offset + keys.shape[2]
        self._idx += keys.shape[2]
        return self._fetch(self._idx)

    def keys_and_values(self):
        return self._fetch(self._idx)

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys = _map(lambda p: dynamic_roll(p, padding[:, None], axis=2), self.keys)
            self.values = _map(lambda p: dynamic_roll(p, padding[:, None], axis=2), self.values)
            self.offset = self.offset - padding
            self.left_padding += padding
            self._right_padding = None

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys = _map(lambda p: p[batch_indices], self.keys)
            self.values = _map(lambda p: p[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys = _map(lambda p: p[..., min_left_pad:, :], self.keys)
                self.values = _map(lambda p: p[..., min_left_pad:, :], self.values)
            self._idx -= min_left_pad
            self.left_padding -= min_left_pad

    def extend(self, other):
        if self.quantized != other.quantized:
            for c in (self, other):
                if not c.quantized:
                    c._convert()
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        max_idx = max(self._idx, other._idx)
        max_size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        like = (self if self.keys is not None else other)

        def pad(c):
            if c.keys is None:
                rows = c.offset.shape[0]
                k, v = (_map(lambda p: mx.zeros((rows, *p.shape[1:2], 0, p.shape[3]), p.dtype), t)
                        for t in (like.keys, like.values))
            else:
                k, v = c.keys, c.values
            left = max_idx - c._idx
            right = max_size - k[0].shape[2] - left
            if right < 0:
                k, v = (_map(lambda p: p[..., :right, :], t) for t in (k, v))
                right = 0
            if left or right:
                k, v = (_map(lambda p: mx.pad(p, [(0, 0), (0, 0), (left, right), (0, 0)]), t) for t in (k, v))
            return k, v, c.offset, c.left_padding + left

        (k1, v1, o1, l1), (k2, v2, o2, l2) = pad(self), pad(other)
        self.keys = tuple(mx.concatenate([a, b]) for a, b in zip(k1, k2))
        self.values = tuple(mx.concatenate([a, b]) for a, b in zip(v1, v2))
        self.offset, self.left_padding = mx.concatenate([o1, o2]), mx.concatenate([l1, l2])
        self._idx = max_idx

    def extract(self, idx):
        self._settle(self._idx)
        mx.eval(self.left_padding)
        padding = self.left_padding.tolist()[idx]
        keys, values = (_map(lambda p: mx.contiguous(p[idx: idx + 1, :, padding: self._idx]), t)
                        for t in (self.keys, self.values))
        return MixedKVCache.restored(self.spec, self.start, self.quantized, keys, values, self._idx - padding)

    @classmethod
    def merge(cls, caches):
        first = caches[0]
        lengths = [c.size() for c in caches]
        max_length = max(lengths)
        padding = [max_length - n for n in lengths]
        batch = cls(first.spec, first.start, padding)
        if any(c.quantized for c in caches):
            batch.quantized = True
            batch._expose()
        if max_length == 0:
            return batch
        full = [c for c in caches if c.keys is not None]
        for c in full:
            if c.quantized != batch.quantized:
                c._convert()
        template_k, template_v = full[0].keys, full[0].values

        def zeros(t):
            return _map(lambda p: mx.zeros((len(caches), p.shape[1], max_length, p.shape[3]), p.dtype), t)

        keys, values = zeros(template_k), zeros(template_v)
        for i, (p, c) in enumerate(zip(padding, caches)):
            if c.keys is None:
                continue
            for dst, src in zip(keys + values, c.keys + c.values):
                dst[i: i + 1, :, p: p + c.offset] = src[..., : c.offset, :]
        batch.keys, batch.values = keys, values
        batch.offset += max_length
        batch._idx = max_length
        return batch

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None
