"""mixquant: mixed-precision MLX quants of Qwen3.5-family models, measured and runnable."""

from mixquant import _cpu_blas

_cpu_blas.accelerate()  # must run before anything imports mlx

__version__ = "0.1.0"

from mixquant.runtime.chat import ChatResult, ChatSession, Model, create_tool_definition, load  # noqa: E402
from mixquant.runtime.toolcalls import parse_tool_calls  # noqa: E402

__all__ = ["ChatResult", "ChatSession", "Model", "create_tool_definition", "load", "parse_tool_calls"]
