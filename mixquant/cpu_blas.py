"""An optimised BLAS for MLX's Linux CPU backend, from a pip package: an explicit step.

The Linux `mlx[cpu]` wheel links the reference BLAS (about 5 GFLOP/s for a float32 matmul on a
2-core machine). MLX binds `cblas_sgemm` lazily, on its first call, searching the libraries loaded
with RTLD_GLOBAL first; so a library that exports the plain BLAS names, loaded before MLX's first
matmul, takes over every float32 GEMM (measured here: 5.6 -> 108 GFLOP/s for 512x256 by 256x8192).

That library is `scipy-openblas32`'s OpenBLAS (a dependency on Linux: 8 MB, x86-64 and aarch64,
no system package, no gfortran). It exports its symbols with a `scipy_` prefix, so `enable()`
loads an in-memory copy (a memfd, nothing written to disk) whose dynamic symbols are renamed to
the plain names: each `scipy_X` symbol's name is pointed at the `X` inside its own string, and the
GNU hash table, which indexes names, is replaced by an ELF hash table built for the new names in
the same bytes. The code is OpenBLAS's, unchanged.

`enable()` is called by the `mixquant` command before anything imports MLX; library users call
`mixquant.enable_cpu_blas()` before MLX's first float32 matmul (importing MLX first is fine: it
binds the BLAS on first use). MIXQUANT_CPU_BLAS=0 turns it off; MIXQUANT_CPU_BLAS=PATH loads
that library (a system libopenblas.so.0 or libmkl_rt.so) instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MIXQUANT_CPU_BLAS"
PREFIX = b"scipy_"
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_HASH, DT_STRTAB, DT_SYMTAB, DT_GNU_HASH = 0, 4, 5, 6, 0x6FFFFEF5
SYM_SIZE = 24  # Elf64_Sym

_loaded: str | None = None
_handle = None  # keeps the library (and its memfd) alive


def loaded() -> str | None:
    """What enable() loaded, for reports; None when MLX uses its own BLAS."""
    return _loaded


def enable() -> str | None:
    """Load the optimised BLAS (see the module's text); returns what was loaded, or None."""
    global _loaded, _handle
    if _loaded or sys.platform != "linux":
        return _loaded
    choice = os.environ.get(ENV, "")
    if choice == "0":
        return None
    try:
        if choice:
            _handle = ctypes.CDLL(choice, mode=ctypes.RTLD_GLOBAL)
            _loaded = choice
        else:
            _handle, _loaded = _load_scipy_openblas()
    except (OSError, ValueError, ImportError) as e:
        log.warning("no optimised CPU BLAS (%s); MLX's reference BLAS is slow", e)
        return None
    return _loaded


def _load_scipy_openblas():
    import scipy_openblas32

    lib_dir = Path(scipy_openblas32.get_lib_dir())
    (path,) = [p for p in lib_dir.iterdir() if p.name.startswith("libscipy_openblas") and ".so" in p.name]
    data = bytearray(path.read_bytes())
    unprefix_symbols(data)
    fd = os.memfd_create("mixquant-openblas")
    view = memoryview(data)
    while view:  # os.write may write less than asked
        view = view[os.write(fd, view):]
    return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL), f"{path.name} (plain BLAS names)"


def _elf_hash(name: bytes) -> int:
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def unprefix_symbols(data: bytearray) -> int:
    """Rename the defined `scipy_*` dynamic symbols of a 64-bit little-endian ELF shared library to
    their plain names, in place; returns how many were renamed."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        raise ValueError("no dynamic section")

    def offset(vaddr):
        for v, o, size in loads:
            if v <= vaddr < v + size:
                return o + vaddr - v
        raise ValueError(f"address {vaddr:#x} is in no loaded segment")

    entries, gnu_slot = {}, None
    for i in range(dynamic[1] // 16):
        tag, value = struct.unpack_from("<qQ", data, dynamic[0] + 16 * i)
        if tag == DT_NULL:
            break
        entries[tag] = value
        if tag == DT_GNU_HASH:
            gnu_slot = dynamic[0] + 16 * i
    if gnu_slot is None:
        raise ValueError("no GNU hash table")
    gnu, symtab, strtab = (offset(entries[t]) for t in (DT_GNU_HASH, DT_SYMTAB, DT_STRTAB))
    n_buckets, sym_offset, bloom_words, _ = struct.unpack_from("<IIII", data, gnu)
    buckets = struct.unpack_from(f"<{n_buckets}I", data, gnu + 16 + 8 * bloom_words)
    chains = gnu + 16 + 8 * bloom_words + 4 * n_buckets
    n_syms = max(buckets, default=0)
    if n_syms:  # the last chain ends the symbol table
        while not struct.unpack_from("<I", data, chains + 4 * (n_syms - sym_offset))[0] & 1:
            n_syms += 1
        n_syms += 1
    else:
        n_syms = sym_offset
    gnu_size = 16 + 8 * bloom_words + 4 * n_buckets + 4 * (n_syms - sym_offset)

    def name_at(o):
        return bytes(data[strtab + o : data.index(b"\0", strtab + o)])

    names = [name_at(struct.unpack_from("<I", data, symtab + SYM_SIZE * i)[0]) for i in range(n_syms)]
    present = set(names)
    renamed = 0
    for i in range(1, n_syms):
        st_name, _, _, shndx = struct.unpack_from("<IBBH", data, symtab + SYM_SIZE * i)
        plain = names[i][len(PREFIX):]
        if shndx and names[i].startswith(PREFIX) and plain not in present:
            struct.pack_into("<I", data, symtab + SYM_SIZE * i, st_name + len(PREFIX))
            names[i] = plain
            renamed += 1
    n_sysv_buckets = min(gnu_size // 4 - 2 - n_syms, max(1, n_syms // 2))
    if n_sysv_buckets < 1:
        raise ValueError("no room for an ELF hash table")
    bucket, chain = [0] * n_sysv_buckets, [0] * n_syms
    for i in range(1, n_syms):
        b = _elf_hash(names[i]) % n_sysv_buckets
        chain[i], bucket[b] = bucket[b], i
    table = struct.pack(f"<II{n_sysv_buckets}I{n_syms}I", n_sysv_buckets, n_syms, *bucket, *chain)
    data[gnu : gnu + gnu_size] = table + bytes(gnu_size - len(table))
    struct.pack_into("<q", data, gnu_slot, DT_HASH)
    return renamed
