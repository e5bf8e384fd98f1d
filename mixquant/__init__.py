"""mixquant: mixed-precision MLX quants of Qwen3.5-family models, measured and runnable.

`import mixquant` loads neither MLX nor torch; the names below import what they need when first
used. On Linux, call `mixquant.enable_cpu_blas()` before anything imports MLX to give MLX's CPU
backend an optimised BLAS (the `mixquant` command does this itself).
"""

from __future__ import annotations

__version__ = "0.2.0"

_LAZY = {
    "load": "mixquant.runtime.chat",
    "Model": "mixquant.runtime.chat",
    "ChatSession": "mixquant.runtime.chat",
    "ChatResult": "mixquant.runtime.chat",
    "create_tool_definition": "mixquant.runtime.chat",
    "parse_tool_calls": "mixquant.runtime.toolcalls",
}

__all__ = [*_LAZY, "enable_cpu_blas", "__version__"]


def enable_cpu_blas() -> str | None:
    """Load an optimised BLAS for MLX's Linux CPU backend (see mixquant.cpu_blas); call it before
    importing MLX. Returns what was loaded, or None."""
    from mixquant import cpu_blas

    return cpu_blas.enable()


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mixquant' has no attribute {name!r}")
