"""The loading layer: an mlx-lm model and tokenizer for any model mixquant reads.

- An MLX folder (ours, mlx-lm's, anyone's) is loaded by mlx-lm itself.
- A Hugging Face folder or a GGUF file is built in memory: the family's table and the unquantized
  plan give every output tensor under mlx-lm's names and layout, read through the same row-block
  path conversion uses; mlx-lm's model class receives them. Nothing is written to disk.

On MLX's CPU backend the quantized matmul kernels run about 10x slower than float32 GEMM, so a
quantized model is measured with its weights dequantized to float32 by default: the weights are
exactly the quantized values and the computation is the reference's. Where mlx-lm would run the
Gated DeltaNet recurrence token by token (CPU, CUDA), prompts go through mixquant.kernels'
chunked form instead.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixquant.arch import family_for_config
from mixquant.arch.tensors import SCOPE_MTP
from mixquant.blocks import read_tensor
from mixquant.errors import MixquantError
from mixquant.io.hf import load_json, read_chat_template
from mixquant.io.output import CONFIG_MARKER

log = logging.getLogger(__name__)

MLX, HF, GGUF = "mlx", "hf", "gguf"
QUANTIZED_CONFIG_KEYS = ("quantization", "quantization_config")


@dataclass
class Loaded:
    model: object  # the mlx-lm model
    tokenizer: object  # mlx-lm's TokenizerWrapper
    config: dict  # the config mlx-lm built the model from
    path: Path  # what was asked for: the folder or the GGUF file
    kind: str  # mlx | hf | gguf
    template: str | None = None  # the chat template's source
    specials: dict = field(default_factory=dict)  # bos/eos/pad/unk token strings, for the template
    generation_config: dict = field(default_factory=dict)
    mtp: object = None  # the MTP head and the main model's parts it runs with (arch's MTPParts), when asked
    compute_note: str | None = None  # load_for_running: which compute path it chose and why, to say once


def source_kind(path: Path) -> str:
    """mlx, hf or gguf; anything else is a one-line error."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUF
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MixquantError(f"{path}: not a model folder (no config.json)")
    config = load_json(path / "config.json")
    if CONFIG_MARKER in config or any(k in config for k in QUANTIZED_CONFIG_KEYS):
        return MLX
    from mixquant.arch import FAMILIES

    if config.get("model_type") not in {t for f in FAMILIES for t in f.model_types}:
        return MLX  # a model mlx-lm knows and mixquant does not: mlx-lm loads it as it is
    from mixquant.io.hf import open_hf_folder

    prefix = family_for_config(config, path).mlx_prefix
    names = open_hf_folder(path).tensors
    return MLX if prefix is not None and any(n.startswith(prefix) for n in names) else HF


def default_dequantize() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def load(path: Path, *, dtype: str | None = None, dequantize: bool | None = False, mtp: bool = False,
         config_dir: Path | None = None, shard=None) -> Loaded:
    """The model at `path` as mlx-lm runs it.

    dtype: for HF and GGUF sources the float dtype the weights are built in (default bfloat16, as a
    conversion writes them); for MLX folders, a dtype the unquantized parameters are cast to.
    dequantize: replace quantized layers by float32 ones holding their dequantized weights (None:
    on CPU only). mtp: also build the MTP head (into `mtp`). config_dir: a GGUF
    source's config and tokenizer files, as `convert --config-dir` takes them. shard: a
    mixquant.distributed.Shard, the model split over its processes (an MLX folder is read lazily,
    so a pipeline rank reads only its layers; HF and GGUF sources are built whole first)."""
    from mixquant.kernels import adopt_kernels, uses_token_loop

    path = Path(path)
    kind = source_kind(path)
    if shard is not None and mtp:
        raise MixquantError(f"{path}: --mtp with --shard: the MTP head does not run sharded yet")
    loaded, mtp_weights = (_load_mlx(path, mtp, lazy=shard is not None) if kind == MLX
                           else _load_source(path, kind, dtype or "bfloat16", mtp, config_dir))
    if shard is not None:
        import mlx.core as mx

        from mixquant.distributed import shard_model

        shard_model(loaded.model, shard, str(path))
        mx.eval(loaded.model.parameters())
    adopt_kernels(loaded.model, chunked=uses_token_loop())
    if mtp:
        loaded.mtp = _mtp_parts(loaded, mtp_weights)
    if dequantize is None:
        dequantize = default_dequantize()
    if dequantize:
        dequantize_model(loaded.model)
        if loaded.mtp is not None:
            dequantize_model(loaded.mtp.head)
    elif dtype is not None and kind == MLX:
        import mlx.core as mx

        loaded.model.set_dtype(getattr(mx, dtype))
        if loaded.mtp is not None:
            loaded.mtp.head.set_dtype(getattr(mx, dtype))
    return loaded


def _mtp_parts(loaded: Loaded, weights: dict):
    family = family_for_config(loaded.config, loaded.path)
    if family.mtp is None:
        raise MixquantError(f"{loaded.path}: {family.name} models have no MTP head")
    if not weights:
        raise MixquantError(f"{loaded.path}: no MTP head in this model (a mixquant conversion keeps it in "
                            f"mtp.safetensors unless --drop-mtp)")
    return family.mtp(loaded.model, weights, loaded.config.get("quantization"), str(loaded.path))


def check_mlx_folder(path: Path) -> None:
    """What mlx-lm would crash on, as one-line errors first: truncated or corrupt safetensors
    files, a missing or unreadable tokenizer, config values no loader can use."""
    from mixquant.arch import check_config_values
    from mixquant.io.hf import check_tokenizer_files
    from mixquant.io.safetensors import read_header

    check_config_values(load_json(path / "config.json"), path / "config.json")
    shards = sorted(path.glob("*.safetensors"))
    if not any(p.name.startswith("model") for p in shards):
        raise MixquantError(f"{path}: no model*.safetensors file")
    for shard in shards:
        read_header(shard)
    check_tokenizer_files(path)


def _load_mlx(path: Path, mtp: bool, lazy: bool = False) -> tuple[Loaded, dict]:
    from mlx_lm import load as mlx_load

    check_mlx_folder(path)
    try:
        model, tokenizer, config = mlx_load(str(path), return_config=True, lazy=lazy)
    except (FileNotFoundError, ValueError) as e:
        raise MixquantError(f"{path}: mlx-lm cannot load it ({e})") from None
    loaded = Loaded(model, tokenizer, config, path, MLX)
    _read_chat_files(loaded, path)
    return loaded, _mtp_sidecar(path) if mtp else {}


def _mtp_sidecar(path: Path) -> dict:
    import mlx.core as mx

    from mixquant.arch.tensors import MTP_FILE

    sidecar = path / MTP_FILE
    return dict(mx.load(str(sidecar))) if sidecar.is_file() else {}


def _load_source(path: Path, kind: str, dtype: str, mtp: bool,
                 config_dir: Path | None = None) -> tuple[Loaded, dict]:
    import mlx.core as mx

    from mixquant.quant.encode import DTYPE_NAMES
    from mixquant.quant.plan import make_plan
    from mixquant.sources import open_source

    source = open_source(path, config_dir)
    family = family_for_config(source.config, source.config_path)
    if getattr(source, "root", None) is not None:
        from mixquant.io.hf import check_tokenizer_files

        check_tokenizer_files(source.root)
    arch = family.build(source, keep_vision=False, keep_mtp=mtp)
    plan = make_plan(arch, None, dtype)
    weights, mtp_weights = {}, {}
    for entry in plan.entries:
        values = mx.array(np.ascontiguousarray(read_tensor(source, entry.tensor), dtype=np.float32))
        values = values.astype(getattr(mx, DTYPE_NAMES[entry.dtype]))
        (mtp_weights if entry.tensor.scope == SCOPE_MTP else weights)[entry.tensor.name] = values
    config = plan.output_config()
    model = build_model(config, weights, source.where)
    with side_files(source) as folder:
        tokenizer = load_tokenizer(folder, config)
        loaded = Loaded(model, tokenizer, config, path, kind)
        _read_chat_files(loaded, folder)
    return loaded, mtp_weights


def build_model(config: dict, weights: dict, where: str):
    """mlx-lm's model class for `config`, holding `weights` (already in mlx-lm's names and layout)."""
    import mlx.core as mx

    try:
        module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    except ImportError:
        raise MixquantError(f"{where}: mlx-lm has no model type {config['model_type']!r}") from None
    model = module.Model(module.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


@contextmanager
def side_files(source):
    """A folder with the source's tokenizer, chat template and generation config: the HF folder
    itself, or (GGUF) a temporary one they are rebuilt into."""
    root = getattr(source, "root", None)
    if root is not None:
        yield Path(root)
        return
    with tempfile.TemporaryDirectory(prefix="mixquant-tokenizer-") as tmp:
        source.write_side_files(Path(tmp))
        with open(Path(tmp) / "config.json", "w") as f:
            json.dump(source.config, f)
        yield Path(tmp)


def _read_chat_files(loaded: Loaded, folder: Path) -> None:
    loaded.template, loaded.specials = read_chat_template(folder)
    gen = folder / "generation_config.json"
    loaded.generation_config = load_json(gen) if gen.is_file() else {}


def load_tokenizer(path: Path, config: dict | None = None):
    """mlx-lm's tokenizer wrapper for a model folder or a GGUF file, without loading weights."""
    path = Path(path)
    if path.is_file():
        from mixquant.sources import open_source

        source = open_source(path)
        with side_files(source) as folder:
            return load_tokenizer(folder, source.config)
    if not (path / "config.json").is_file():
        raise MixquantError(f"{path}: not a model folder (no config.json)")
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    config = config if config is not None else load_json(path / "config.json")
    eos = config.get("eos_token_id")
    try:
        return mlx_load_tokenizer(path, eos_token_ids=eos)
    except (OSError, ValueError) as e:
        raise MixquantError(f"{path}: cannot read its tokenizer ({e})") from None


def dequantize_model(model) -> None:
    """Replace quantized layers by float32 ones holding the dequantized weights; cast the rest."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    def weight_of(m):  # in float32 from the start: dequantizing in the scales' bfloat16 would round again
        return mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32), m.group_size,
                             m.bits, mode=m.mode)

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
        elif isinstance(m, (nn.QuantizedAllToShardedLinear, nn.QuantizedShardedToAllLinear)):  # --shard tensor
            out_dims, in_dims, n = m.weight.shape[0], m.weight.shape[1] * 32 // m.bits, m.group.size()
            new = (nn.AllToShardedLinear(in_dims, out_dims * n, "bias" in m, m.group)
                   if isinstance(m, nn.QuantizedAllToShardedLinear)
                   else nn.ShardedToAllLinear(in_dims * n, out_dims, "bias" in m, m.group))
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


FAST_CPU_SHARE = 0.5  # float32 weights may take this share of memory before the kernels are kept


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
NOTE = 25  # a logging level between INFO and WARNING: what the CLI says once, as "note"


def float32_bytes(model) -> int:
    """What the model's weights take once dequantized to float32."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    total = 0
    for _, m in model.named_modules():
        own = dict(tree_flatten(m.parameters()))
        own = {k: v for k, v in own.items() if "." not in k}  # this module's own arrays, not its children's
        bits = getattr(m, "bits", None) if isinstance(m, nn.Module) else None
        if bits and "weight" in own and "scales" in own:
            total += own.pop("weight").size * 32 // bits
            own.pop("scales")
            own.pop("biases", None)
        total += sum(v.size for v in own.values())
    return 4 * total


def load_for_running(path: Path, *, native: bool = False, mtp: bool = False, shard=None) -> Loaded:
    """A model to decode with, in the compute path that is fastest on this backend: on MLX's CPU
    backend the weights dequantized to float32 (where batching and MTP verification gain, through
    an optimised BLAS), when they fit in FAST_CPU_SHARE of memory; elsewhere, or `native`, the
    quantized kernels. `compute_note` says which, for the caller to log once the model is ready.
    shard: as load's (the float32 budget is then this rank's part)."""
    loaded = load(path, mtp=mtp, shard=shard)
    if native or not default_dequantize():
        return loaded
    need = float32_bytes(loaded.model) + (float32_bytes(loaded.mtp.head) if loaded.mtp is not None else 0)
    budget = int(FAST_CPU_SHARE * memory_bytes())
    if need > budget:
        loaded.compute_note = (f"MLX's CPU backend: keeping the quantized kernels (float32 weights would take "
                               f"{need / 1e9:.1f} GB, over {budget / 1e9:.1f} GB)")
        return loaded
    dequantize_model(loaded.model)
    if loaded.mtp is not None:
        dequantize_model(loaded.mtp.head)
    loaded.compute_note = (f"MLX's CPU backend: computing in float32 with the weights dequantized ({need / 1e9:.2f} "
                           "GB; faster here than the quantized kernels); --native keeps them quantized")
    return loaded


def say_compute_path(loaded: Loaded) -> None:
    if loaded.compute_note:
        log.log(NOTE, loaded.compute_note)


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def text_weight_bytes(path: Path) -> int:
    """Bytes of the language model's tensors in model*.safetensors (vision tower and MTP excluded)."""
    from mixquant.io.safetensors import read_header

    path = Path(path)
    if path.is_file():
        return path.stat().st_size  # a GGUF: the whole file
    config = load_json(path / "config.json")
    family = family_for_config(config, path / "config.json") if _known(config) else None
    excluded = family.excluded_prefixes if family is not None else ()
    return sum(info.nbytes for shard in sorted(path.glob("model*.safetensors"))
               for name, info in read_header(shard).items() if not name.startswith(excluded))


def _known(config: dict) -> bool:
    from mixquant.arch import FAMILIES

    return config.get("model_type") in {t for f in FAMILIES for t in f.model_types}
