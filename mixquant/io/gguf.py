"""A llama.cpp GGUF file (single or split) as a conversion source.

The file is read with gguf-py, memory-mapped. Its tensors are presented under Hugging Face
names and layouts (see mixquant.arch.gguf_names), with a config.json synthesised from the GGUF
metadata, so the same architecture tables, recipes and writer serve GGUF and safetensors
sources. Quantized tensors are dequantized to float32 (and then re-quantized by the recipe).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixquant.arch import gguf_names
from mixquant.arch.qwen35 import text_config
from mixquant.errors import MixquantError

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
SUPPORTED = ("qwen35", "qwen35moe", "llama")
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class GGUFTensor:
    """One presented (HF-named) tensor: where its data is in the GGUF, and how to undo llama.cpp."""

    shape: tuple[int, ...]
    gguf: object  # gguf.ReaderTensor
    op: str | None
    expert: int | None = None
    gate_up: str | None = None  # "gate" | "up" for fused gate_up experts


def split_parts(path: Path) -> list[Path]:
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    n = int(m.group("n"))
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise MixquantError(f"{path}: split GGUF part {missing[0]} is missing ({n} parts expected)")
    return parts


def _reader(path: Path):
    import gguf

    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise MixquantError(f"{path}: cannot read: {e.strerror}") from None
    if head[:4] != b"GGUF":
        raise MixquantError(f"{path}: not a GGUF file")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise MixquantError(f"{path}: unsupported GGUF version {version} (2 and 3 are)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, EOFError) as e:
        text = str(e) or type(e).__name__
        raise MixquantError(f"{path}: truncated or corrupt GGUF ({text.splitlines()[0][:120]})") from None


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFSource:
    def __init__(self, path: Path, config_dir: Path | None = None):
        self.path = Path(path)
        self.parts = split_parts(self.path)
        self.readers = [_reader(p) for p in self.parts]
        meta = self.readers[0]
        self.arch = _field(meta, "general.architecture")
        if self.arch not in SUPPORTED:
            raise MixquantError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r} (supported: {', '.join(SUPPORTED)})"
            )
        self.meta = meta
        self.config_dir = Path(config_dir) if config_dir else None
        raw = {}
        for reader, part in zip(self.readers, self.parts):
            for t in reader.tensors:
                if t.name in raw:
                    raise MixquantError(f"{part}: tensor {t.name} appears twice")
                _check_size(t, part)
                raw[t.name] = t
        self.raw = raw
        self.config = self._config()
        self.tensors = self._present()
        self._cache: tuple[str, np.ndarray] | None = None
        lossy = sorted({t.tensor_type.name for t in raw.values()} - set(FLOAT_TYPES))
        if lossy:
            print(f"mixquant: warning: {self.path.name} holds quantized tensors ({', '.join(lossy)}): "
                  "the source is already lossy; they are dequantized and quantized again", file=sys.stderr)

    # -- source interface -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> str:
        return str(self.config_dir / "config.json") if self.config_dir else str(self.path)

    def read(self, name: str, index=None) -> np.ndarray:
        if self._cache is None or self._cache[0] != name:
            self._cache = None
            self._cache = (name, self._load(self.tensors[name]))
        arr = self._cache[1]
        return arr if index is None else arr[index]

    def write_side_files(self, dest: Path) -> None:
        from mixquant.io.hf import SIDE_FILES
        import shutil

        if self.config_dir:
            for name in SIDE_FILES:
                if (self.config_dir / name).is_file():
                    shutil.copy(self.config_dir / name, dest / name)
            return
        write_tokenizer(self.parts[0], dest)
        gen = {k: v for k, v in (("bos_token_id", self.config.get("bos_token_id")),
                                 ("eos_token_id", self.config.get("eos_token_id"))) if v is not None}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    # -- internals --------------------------------------------------------------------------------
    def _n_main_layers(self) -> int:
        return int(_field(self.meta, f"{self.arch}.block_count")) - int(
            _field(self.meta, f"{self.arch}.nextn_predict_layers", 0) or 0)

    def _present(self) -> dict[str, GGUFTensor]:
        out: dict[str, GGUFTensor] = {}
        n_main = self._n_main_layers()
        for name, t in self.raw.items():
            mapped = gguf_names.hf_names(self.arch, name, n_main)
            if mapped is None:
                if gguf_names.IGNORED.fullmatch(name):
                    continue
                raise MixquantError(f"{self.path}: unexpected tensor {name} for architecture {self.arch}")
            template, op = mapped
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml ne order -> row-major
            if op == "expert":
                for e in range(shape[0]):
                    out[template.replace("{E}", str(e))] = GGUFTensor(shape[1:], t, None, e)
            elif op == "expert_gate_up":
                half = shape[1] // 2
                for e in range(shape[0]):
                    for which in ("gate", "up"):
                        key = template.replace("{E}", str(e)).replace("{GATE_UP}", which)
                        out[key] = GGUFTensor((half, shape[2]), t, None, e, which)
            else:
                out[template] = GGUFTensor(_presented_shape(op, shape), t, op)
        if self.config.get("tie_word_embeddings"):
            out.pop("lm_head.weight", None)
        return out

    def _load(self, vt: GGUFTensor) -> np.ndarray:
        t = vt.gguf
        data = t.data if vt.expert is None else t.data[vt.expert]
        arr = dequantize(data, t.tensor_type)
        if vt.gate_up is not None:
            half = arr.shape[0] // 2
            arr = arr[:half] if vt.gate_up == "gate" else arr[half:]
        return np.ascontiguousarray(self._undo(vt.op, arr))

    def _undo(self, op: str | None, a: np.ndarray) -> np.ndarray:
        c = text_config(self.config)
        if op is None:
            return a
        if op == "norm_unshift":
            return a - 1.0
        if op == "as_row":
            return a.reshape(1, -1)
        if op in ("rope_unpermute_q", "rope_unpermute_k"):
            heads = c["num_attention_heads"] if op.endswith("q") else c["num_key_value_heads"]
            return gguf_names.rope_unpermute(a, heads)
        n_k, dk, dv = c["linear_num_key_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"]
        if op == "qkv_v_rows":
            qk = 2 * n_k * dk
            return np.concatenate([a[:qk], gguf_names.untile_v(a[qk:], 0, n_k, dv)])
        if op == "v_rows":
            return gguf_names.untile_v(a, 0, n_k, dv)
        if op == "v_heads":
            return gguf_names.untile_v(a.reshape(a.shape[0], -1), 0, n_k, 1).reshape(a.shape)
        if op == "ssm_a":
            return np.log(-gguf_names.untile_v(a.reshape(-1, 1), 0, n_k, 1).reshape(-1))
        if op == "conv1d":
            qk = 2 * n_k * dk
            a = np.concatenate([a[:qk], gguf_names.untile_v(a[qk:], 0, n_k, dv)])
            return a[:, None, :]
        if op == "v_cols":
            return gguf_names.untile_v(a, 1, n_k, dv)
        raise AssertionError(op)

    def _config(self) -> dict:
        if self.config_dir:
            from mixquant.io.hf import load_json

            return load_json(self.config_dir / "config.json")
        return synthesize_config(self.arch, self.meta, self.raw, self._n_main_layers())


def _presented_shape(op: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if op == "conv1d":
        return (shape[0], 1, shape[1])
    if op == "as_row":
        return (1, shape[-1])
    return shape


def _check_size(t, part: Path) -> None:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
    dims = [int(d) for d in t.shape.tolist()]  # ggml order: dims[0] is the row length
    if dims[0] % block:
        raise MixquantError(f"{part}: tensor {t.name} rows of {dims[0]} values do not fit {t.tensor_type.name} "
                            f"blocks of {block}")
    expected = int(np.prod(dims)) // block * type_size
    if t.data.nbytes != expected:
        raise MixquantError(f"{part}: tensor {t.name} has {t.data.nbytes} bytes, its type {t.tensor_type.name} and "
                            f"shape {list(reversed(dims))} need {expected}")


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
    """float32 values of a GGUF tensor (row-major numpy shape)."""
    import gguf

    name = qtype.name
    if name == "F32":
        return np.asarray(data, dtype=np.float32)
    if name == "F16":
        return np.asarray(data).astype(np.float32)
    if name == "BF16":
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float32, copy=False)


def synthesize_config(arch: str, meta, raw: dict, n_layers: int) -> dict:
    """A Hugging Face config.json from GGUF metadata."""

    def f(key, default=None):
        return _field(meta, f"{arch}.{key}", default)

    vocab = int(raw["token_embd.weight"].shape[-1])  # ggml order: (n_embd, n_vocab)
    tie = "output.weight" not in raw
    hidden = int(f("embedding_length"))
    n_heads = int(f("attention.head_count"))
    n_kv = int(f("attention.head_count_kv", n_heads))
    head_dim = int(f("attention.key_length", hidden // n_heads))
    common = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(f("context_length", 4096)),
        "tie_word_embeddings": tie,
    }
    bos = _field(meta, "tokenizer.ggml.bos_token_id")
    eos = _field(meta, "tokenizer.ggml.eos_token_id")
    if arch == "llama":
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **common,
            "intermediate_size": int(f("feed_forward_length")),
            "head_dim": head_dim,
            "rope_theta": float(f("rope.freq_base", 10000.0)),  # top level: mlx-lm's llama reads only this
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }
    else:
        rope_dim = int(f("rope.dimension_count", head_dim // 4))
        sections = f("rope.dimension_sections")
        rope = {"rope_type": "default", "rope_theta": float(f("rope.freq_base", 1e7)),
                "partial_rotary_factor": rope_dim / head_dim, "mrope_interleaved": True}
        if sections:
            rope["mrope_section"] = [int(s) for s in list(sections)[:3]]
        n_v = int(f("ssm.time_step_rank"))
        text = {
            "model_type": "qwen3_5_moe_text" if arch == "qwen35moe" else "qwen3_5_text",
            **common,
            "head_dim": head_dim,
            "attn_output_gate": True,
            "full_attention_interval": int(f("full_attention_interval", 4)),
            "linear_conv_kernel_dim": int(f("ssm.conv_kernel")),
            "linear_key_head_dim": int(f("ssm.state_size")),
            "linear_num_key_heads": int(f("ssm.group_count")),
            "linear_num_value_heads": n_v,
            "linear_value_head_dim": int(f("ssm.inner_size")) // n_v,
            "rope_parameters": rope,
            "mtp_num_hidden_layers": int(f("nextn_predict_layers", 0) or 0),
        }
        if arch == "qwen35moe":
            text.update(num_experts=int(f("expert_count")), num_experts_per_tok=int(f("expert_used_count")),
                        moe_intermediate_size=int(f("expert_feed_forward_length")),
                        shared_expert_intermediate_size=int(f("expert_shared_feed_forward_length", 0)))
        else:
            text["intermediate_size"] = int(f("feed_forward_length"))
        config = text
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos is not None:
        config["eos_token_id"] = int(eos)
    return config


def write_tokenizer(gguf_path: Path, dest: Path) -> None:
    """tokenizer.json + tokenizer_config.json (chat template included) rebuilt from tokenizer.ggml.*"""
    import contextlib
    import io

    from transformers import AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types here; the message says which part failed
        raise MixquantError(f"{gguf_path}: cannot rebuild the tokenizer ({type(e).__name__}: {e})") from None
    tok.save_pretrained(str(dest))
    template = _field(_reader(gguf_path), "tokenizer.chat_template")
    if template:
        (dest / "chat_template.jinja").write_text(template)


def open_gguf(path: Path, config_dir: Path | None = None) -> GGUFSource:
    return GGUFSource(path, config_dir)
