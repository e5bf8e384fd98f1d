"""mixquant: mixed-precision MLX quants of Qwen3.5-family models, measured and runnable."""

from mixquant import _cpu_blas

_cpu_blas.accelerate()  # must run before anything imports mlx

__version__ = "0.1.0"
