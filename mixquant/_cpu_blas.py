"""Make MLX's Linux CPU backend use an optimised BLAS when the system has one.

The Linux `mlx[cpu]` wheel links the reference BLAS (about 2-4 GFLOP/s for float32 matmul on this
project's 2-core machines). MLX resolves `cblas_sgemm` dynamically, so loading OpenBLAS (or MKL)
with RTLD_GLOBAL *before* MLX is imported makes MLX call it instead: measured here, a 512x256 by
256x8192 matmul went from 2.3 to 160 GFLOP/s and a forward pass of the bundled model from 4.1 s to
0.5 s. Results are float32 GEMMs either way. Nothing happens on macOS, when MLX is already
imported, when no such library is installed (`apt-get install libopenblas0`), or with
MIXQUANT_CPU_BLAS=0.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libmkl_rt.so.2", "libmkl_rt.so")
loaded: str | None = None


def accelerate() -> str | None:
    global loaded
    if loaded or sys.platform != "linux" or "mlx.core" in sys.modules:
        return loaded
    if os.environ.get("MIXQUANT_CPU_BLAS", "1") == "0":
        return None
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        break
    return loaded
