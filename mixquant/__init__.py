"""mixquant: mixed-precision MLX quants of Qwen3.5-family models, measured and runnable."""

__version__ = "0.1.0"
