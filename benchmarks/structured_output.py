"""What constrained decoding (response_format json_schema) costs per token.

    python benchmarks/structured_output.py [--model fixture smollm2] [--tokens 64]

For each model (the fixture; SmolLM2-135M-Instruct from its GGUF, a 49k-token vocabulary), the
server's decoding path (mlx-lm's BatchGenerator, 4 requests at a time, temperature 1, seeded) runs
the same chat prompts free and under a JSON schema's token mask (mixquant.runtime.grammar: llguidance
computes each step's mask): decode tokens/s both ways, the mask's own time per token, and whether
every masked reply parses and validates. Writes benchmarks/results/structured_output.json and its
section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "structured_output.json"
DOC = ROOT / "docs" / "RESULTS.md"
SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "temperature": {"type": "number", "minimum": -50, "maximum": 60},
                                      "sky": {"enum": ["clear", "cloudy", "rain"]}},
     "required": ["city", "temperature", "sky"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "count": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "count"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 12}]},
                                      "sure": {"type": "boolean"}},
     "required": ["answer", "sure"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 30},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                               "maxItems": 3}},
     "required": ["title", "tags"], "additionalProperties": False},
]
QUESTION = "Describe today's weather as JSON."


def source(name: str) -> Path:
    if name == "fixture":
        return ROOT / "tests" / "fixtures" / "qwen35-tiny"
    sys.path.insert(0, str(ROOT / "tests"))
    import llamacpp_tools

    return llamacpp_tools.smollm2_gguf()


def decode(model, prompt: list[int], masks: list | None, tokens: int) -> tuple[list[list[int]], float, int]:
    """4 replies to `prompt` (masked by `masks` when given): their tokens, seconds, tokens decoded."""
    from mlx_lm.generate import BatchGenerator

    from mixquant.runtime.sampling import Sampling

    gen = BatchGenerator(model.model, completion_batch_size=4, prefill_batch_size=4,
                         stop_tokens=[[t] for t in sorted(model.eos_ids)])
    n = len(masks) if masks else 4
    t0 = time.perf_counter()
    uids = gen.insert_segments([[prompt]] * n, max_tokens=[tokens] * n,
                               samplers=[Sampling(temperature=1.0).sampler(i) for i in range(n)],
                               logits_processors=[[m] for m in masks] if masks else None)
    out = {u: [] for u in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[u] for u in uids], time.perf_counter() - t0, sum(len(v) for v in out.values())


def measure(name: str, tokens: int) -> dict:
    import jsonschema

    import mixquant

    mixquant.enable_cpu_blas()
    from mixquant.loading import load
    from mixquant.runtime.chat import Model
    from mixquant.runtime.grammar import SchemaMask, json_grammar

    model = Model(load(source(name), dtype="float32", dequantize=True))
    t0 = time.perf_counter()
    table = model.token_table
    table_s = time.perf_counter() - t0
    prompt = model.encode(model.prompt([{"role": "user", "content": QUESTION}], enable_thinking=False))
    decode(model, prompt, None, 8)  # unmeasured: the first pass traces the model
    free_s = free_n = mask_s = masked_s = masked_n = steps = 0
    valid = replies = 0
    for schema in SCHEMAS:
        _, s, n = decode(model, prompt, None, tokens)
        free_s, free_n = free_s + s, free_n + n
        t0 = time.perf_counter()
        grammar = json_grammar(schema)
        compile_s = time.perf_counter() - t0
        masks = [SchemaMask(table, grammar) for _ in range(4)]
        outs, s, n = decode(model, prompt, masks, 4 * tokens)
        masked_s, masked_n = masked_s + s, masked_n + n
        mask_s += sum(m.seconds for m in masks) + compile_s
        steps += sum(m.steps for m in masks)
        for out in outs:
            replies += 1
            text = model.tokenizer.decode([t for t in out if t not in model.eos_ids])
            try:
                jsonschema.validate(json.loads(text), schema)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    row = {"model": name, "vocab": model.vocab_rows, "table_s": table_s, "free_tok_s": free_n / free_s,
           "masked_tok_s": masked_n / masked_s, "mask_ms_per_token": 1e3 * mask_s / steps, "valid": valid,
           "replies": replies}
    print(f"{name}: vocab {row['vocab']}, free {row['free_tok_s']:.1f} tok/s, masked {row['masked_tok_s']:.1f} tok/s,"
          f" mask {row['mask_ms_per_token']:.3f} ms/token, valid {valid}/{replies}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["fixture", "smollm2"], choices=["fixture", "smollm2"])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per free reply (masked: up to 4x)")
    args = parser.parse_args()
    rows = [measure(name, args.tokens) for name in args.model]
    from mixquant import cpu_blas

    out = {"machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {cpu_blas.enable()}",
           "tokens": args.tokens, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    lines = ["<!-- structured-output:begin -->", "## Structured output: what the JSON-schema mask costs", "",
             f"`python benchmarks/structured_output.py` ({out['machine']}): the server's decoding path, 4 "
             f"requests at a time at temperature 1, float32, {len(SCHEMAS)} JSON schemas (objects, arrays, enums, "
             f"anyOf, bounded numbers and strings) against the same prompt decoded free. The mask's time includes "
             f"compiling each schema; the token table is built once per model.", "",
             "| model | vocabulary | token table s | free tok/s | masked tok/s | mask ms per token | replies valid |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['vocab']} | {r['table_s']:.2f} | {r['free_tok_s']:.1f} | {r['masked_tok_s']:.1f} | "
              f"{r['mask_ms_per_token']:.3f} | {r['valid']}/{r['replies']} |" for r in out["rows"]]
    lines += ["<!-- structured-output:end -->"]
    replace_section(DOC, "structured-output", "\n".join(lines))


if __name__ == "__main__":
    main()
