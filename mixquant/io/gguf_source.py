"""A llama.cpp GGUF file (single or split) as a conversion source.

Its tensors are presented under Hugging Face names and layouts (the family's GGUFSpec says how),
with a config.json synthesised from the GGUF metadata, so the same architecture tables, recipes
and writer serve GGUF and safetensors sources. Tensors are read a block of rows at a time:
llama.cpp's row reorderings (V heads, rope halves, stacked experts) become a map from presented
rows to file rows, so a block of presented rows is a gather of runs of file rows. Quantized
tensors are dequantized to float32 (and then re-quantized by the recipe).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixquant.arch import family_for_config, family_for_gguf
from mixquant.arch.gguf_layout import EXPERTS, EXPERTS_GATE_UP, Layout, expert_slices
from mixquant.errors import MixquantError
from mixquant.io.gguf import GGUFFile, TensorInfo, read_all, read_gguf, read_rows
from mixquant.io.hf import SIDE_FILES, load_json

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
FLOAT_TYPES = ("F32", "F16", "BF16")
KEY_ARCHITECTURE = "general.architecture"
KEY_CHAT_TEMPLATE = "tokenizer.chat_template"


@dataclass
class GGUFTensor:
    """One presented (HF-named) tensor: where its rows are in the GGUF, and how to undo llama.cpp."""

    shape: tuple[int, ...]
    info: TensorInfo
    layout: Layout
    first_row: int = 0  # file row of presented row 0 (experts, fused gate/up halves)

    def file_rows(self, rows: np.ndarray) -> np.ndarray:
        if self.layout.rows is not None:
            rows = self.layout.rows(np.arange(self.shape[0])[:, None]).reshape(-1)[rows]
        return self.first_row + rows


def split_parts(path: Path) -> list[Path]:
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    n, i = int(m.group("n")), int(m.group("i"))
    if n == 0 or not 1 <= i <= n:
        raise MixquantError(f"{path}: split GGUF name says part {i} of {n}; parts count from 1 to their number")
    parts = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise MixquantError(f"{path}: split GGUF part {missing[0]} is missing ({n} parts expected)")
    return parts


def source_name(path: Path) -> str:
    """The model's name: the GGUF file without its split suffix."""
    m = SPLIT_NAME.match(path.name)
    return f"{m.group('stem')}.gguf" if m else path.name


TOKENIZER_PREFIX = "tokenizer.ggml."
MAX_TOKENIZER_ENTRIES = 1 << 20  # tokens, scores, types or merges: real vocabularies have up to ~262k


def check_tokenizer_arrays(meta, path: Path) -> None:
    """The tokenizer's arrays within what any real vocabulary needs (rebuilding a tokenizer from a
    2M-entry array takes gigabytes)."""
    for key, value in meta.fields.items():
        if key.startswith(TOKENIZER_PREFIX) and hasattr(value, "__len__") and not isinstance(value, str) \
                and len(value) > MAX_TOKENIZER_ENTRIES:
            raise MixquantError(f"{path}: {key} has {len(value)} entries, more than the {MAX_TOKENIZER_ENTRIES} "
                                "any real tokenizer needs")


class GGUFSource:
    def __init__(self, path: Path, config_dir: Path | None = None):
        self.path = Path(path)
        self.parts = split_parts(self.path)
        self.files: list[GGUFFile] = [read_gguf(p) for p in self.parts]
        self.meta = self.files[0]
        self.arch = self.meta.get(KEY_ARCHITECTURE)
        check_tokenizer_arrays(self.meta, self.path)
        self.family = family_for_gguf(self.arch, self.path)
        self.spec = self.family.gguf
        self.config_dir = Path(config_dir) if config_dir else None
        raw: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in file.tensors.items():
                if name in raw:
                    raise MixquantError(f"{file.path}: tensor {name} appears twice")
                raw[name] = info
        self.raw = raw
        n_main = self.spec.main_layers(self.arch, self.meta)
        self.config = (load_json(self.config_dir / "config.json") if self.config_dir
                       else self.spec.config(self.arch, self.meta, raw, n_main))
        if self.config_dir and family_for_config(self.config, self.config_path) is not self.family:
            raise MixquantError(f"{self.config_path}: model_type {self.config.get('model_type')!r} is not a "
                                f"{self.family.name} model, which {self.path.name} ({self.arch}) is")
        self.tensors = self._present(n_main)
        lossy = sorted({t.type_name for t in raw.values()} - set(FLOAT_TYPES))
        self.warnings = [f"{self.path.name} holds quantized tensors ({', '.join(lossy)}): the source is already "
                         "lossy; they are dequantized and quantized again"] if lossy else []

    # -- source interface -------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return source_name(self.path)

    @property
    def config_path(self) -> str:
        return str(self.config_dir / "config.json") if self.config_dir else str(self.path)

    def read(self, name: str, index=None) -> np.ndarray:
        """float32 values of a presented tensor, or of rows `index` = (slice,) of it."""
        t = self.tensors[name]
        if len(t.info.shape) < 2:  # norms, biases, gates: small, read whole
            whole = t.layout.whole(read_all(t.info))
            return whole if index is None else whole[index]
        rows = np.arange(t.shape[0])
        if index is not None:
            rows = rows[index[0]]
        block = read_rows(t.info, t.file_rows(rows))
        if t.layout.columns is not None:
            block = t.layout.columns(block)
        return t.layout.block(block)

    def write_side_files(self, dest: Path) -> None:
        if self.config_dir:
            for name in SIDE_FILES:
                if (self.config_dir / name).is_file():
                    shutil.copy(self.config_dir / name, dest / name)
            return
        write_tokenizer(self.parts[0], dest)
        template = self.meta.get(KEY_CHAT_TEMPLATE)
        if isinstance(template, str) and template:
            (dest / "chat_template.jinja").write_text(template)
        gen = {k: v for k, v in (("bos_token_id", self.config.get("bos_token_id")),
                                 ("eos_token_id", self.config.get("eos_token_id"))) if v is not None}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    # -- internals --------------------------------------------------------------------------------
    def _present(self, n_main: int) -> dict[str, GGUFTensor]:
        out: dict[str, GGUFTensor] = {}
        for name, info in self.raw.items():
            mapped = self.spec.hf_name(name, n_main)
            if mapped is None:
                if self.spec.ignored.fullmatch(name):
                    continue
                raise MixquantError(f"{self.path}: unexpected tensor {name} for architecture {self.arch}")
            template, op = mapped
            shape = info.shape
            if op in (EXPERTS, EXPERTS_GATE_UP):
                if len(shape) != 3 or (op == EXPERTS_GATE_UP and shape[1] % 2):
                    raise MixquantError(f"{info.path}: tensor {name} has shape {list(shape)}, not stacked experts")
                for key, rows, first_row in expert_slices(template, op, shape):
                    out[key] = GGUFTensor(rows, info, Layout(), first_row)
            else:
                if len(shape) > 2:
                    raise MixquantError(f"{info.path}: tensor {name} has unexpected shape {list(shape)}")
                layout = self.spec.layout(op, self.config)
                out[template] = GGUFTensor(tuple(layout.shape(shape)), info, layout)
        return out


def write_tokenizer(gguf_path: Path, dest: Path) -> None:
    """tokenizer.json + tokenizer_config.json rebuilt from tokenizer.ggml.* by transformers."""
    import contextlib
    import io

    from transformers import AutoTokenizer

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types here; the message says which part failed
        raise MixquantError(f"{gguf_path}: cannot rebuild the tokenizer ({type(e).__name__}: {e})") from None
    tok.save_pretrained(str(dest))


def open_gguf(path: Path, config_dir: Path | None = None) -> GGUFSource:
    return GGUFSource(path, config_dir)
