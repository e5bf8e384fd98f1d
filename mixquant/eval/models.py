"""Loading models for measurement: mlx-lm's classes, optionally dequantized to float32.

On MLX's CPU backend the quantized matmul kernels run about 10x slower than float32 GEMM, so by
default a quantized model is evaluated with its weights dequantized to float32: the weights are
exactly the quantized values and the computation is the reference's, so the KL divergence
measures what the quantization did to the weights. On a GPU the native kernels are used.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mixquant.errors import MixquantError

TEXT_EXCLUDED_PREFIXES = ("model.visual.", "vision_tower.", "mtp.")


def default_dequantize() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def dequantize_model(model) -> None:
    """Replace quantized layers by float32 ones holding the dequantized weights; cast the rest."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    def weight_of(m):
        return mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode).astype(mx.float32)

    replacements = []
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            out_dims, in_dims = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits
            new = nn.Linear(in_dims, out_dims, bias="bias" in m)
        elif isinstance(m, nn.QuantizedEmbedding):
            new = nn.Embedding(m.num_embeddings, m.dims)
        elif isinstance(m, QuantizedSwitchLinear):
            experts, out_dims = m.weight.shape[:2]
            new = SwitchLinear(m.weight.shape[-1] * 32 // m.bits, out_dims, experts, bias="bias" in m)
        else:
            continue
        new.weight = weight_of(m)
        if "bias" in m:
            new.bias = m.bias.astype(mx.float32)
        replacements.append((path, new))
    if replacements:
        model.update_modules(tree_unflatten(replacements))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())


def is_hf_source(path: Path) -> bool:
    """An unconverted Hugging Face folder of an architecture mixquant converts itself."""
    from mixquant.arch import ARCHITECTURES
    from mixquant.io.hf import load_json

    config_path = path / "config.json"
    if not config_path.is_file():
        return False
    config = load_json(config_path)
    if config.get("model_type") not in ARCHITECTURES or "quantization" in config:
        return False
    from mixquant.io.hf import open_hf_folder

    names = open_hf_folder(path).tensors
    return not any(n.startswith("language_model.") for n in names)


@contextmanager
def mlx_folder(path: Path, dtype: str = "float32"):
    """An MLX model folder for `path`: itself, or a temporary unquantized conversion of an HF folder
    or a GGUF file (mixquant's own sanitisation, in `dtype`, text model only)."""
    path = Path(path)
    is_gguf = path.is_file() and path.suffix == ".gguf"
    if not is_gguf and (not path.is_dir() or not (path / "config.json").is_file()):
        raise MixquantError(f"{path}: not a model folder (no config.json)")
    if not is_gguf and not is_hf_source(path):
        yield path
        return
    from mixquant.convert import ConvertOptions, convert

    tmp = Path(tempfile.mkdtemp(prefix="mixquant-ref-"))
    try:
        out = tmp / path.stem
        convert(path, out, ConvertOptions(dtype=dtype, keep_vision=False, keep_mtp=False, progress=False))
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(path: Path, dequantize: bool | None = None):
    """mlx-lm model and tokenizer from an MLX folder; dequantized to float32 on CPU by default."""
    from mlx_lm import load

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MixquantError(f"{path}: not a model folder (no config.json)")
    model, tokenizer = load(str(path))
    if dequantize is None:
        dequantize = default_dequantize()
    if dequantize:
        dequantize_model(model)
    return model, tokenizer


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def text_weight_bytes(path: Path) -> int:
    """Bytes of the language model's tensors in model*.safetensors (vision tower and MTP excluded)."""
    from mixquant.io.safetensors import read_header

    total = 0
    for shard in sorted(Path(path).glob("model*.safetensors")):
        for name, info in read_header(shard).items():
            if not name.startswith(TEXT_EXCLUDED_PREFIXES):
                total += info.nbytes
    return total
