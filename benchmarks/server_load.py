"""`mixquant serve` under load: concurrent streaming clients on the bundled fixture.

    python benchmarks/server_load.py [--clients 1 4 8 16] [--tokens 64] [--rounds 3] [--native]

Converts the fixture to its unsloth-4 quant and starts `mixquant serve` on it with the defaults (on
MLX's CPU backend that computes in float32 with the weights dequantized, where batched decoding
gains through an optimised BLAS; --native serves with the quantized kernels) in a subprocess, then for each client count runs that many clients at once, each streaming a chat
completion of --tokens tokens (end-of-sequence ignored through a long max_tokens and counting
content chunks), once unmeasured (MLX traces its compiled steps once per batch size) and then
--rounds times. Reports aggregate tokens/s (all tokens over wall time), p50/p95
time to first token, errors; then a two-turn conversation: the second turn's cached prompt tokens
and time to first token against the first's. Writes benchmarks/results/server_load.json and its
section of docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402
from mixquant.server.engine import PREFILL_CHUNK, prefill_cost, prefill_pieces  # noqa: E402
FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
RESULTS = ROOT / "benchmarks" / "results" / "server_load.json"
DOC = ROOT / "docs" / "RESULTS.md"
QUESTIONS = ["Write a Python function that parses a config file.", "Explain what a hash map is.",
             "How do I sort a list of dictionaries by a key?", "What does the with statement do?"]


def stream_once(url: str, question: str, tokens: int) -> dict:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                       "temperature": 0.7, "stream": True,
                       "chat_template_kwargs": {"enable_thinking": False}}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    times, error = [], None
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - counted, not raised: the benchmark reports errors
        error = repr(e)
    return {"ttft": (times[0] if times else time.perf_counter()) - t0, "chunks": len(times),
            "seconds": time.perf_counter() - t0, "gaps": [b - a for a, b in zip(times, times[1:])], "error": error}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def chunk_seconds(quant: Path, prompt_tokens: int) -> list[float]:
    """The prefill time of each piece the server cuts the long prompt into (prefill_pieces), alone, in
    the server's compute path: the median of 3 passes."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mixquant.loading import load_for_running
    from mixquant.runtime.chat import Model

    chat = Model(load_for_running(quant))
    model = chat.model
    prompt = chat.rendered([{"role": "user", "content": long_prompt_text(prompt_tokens)}], enable_thinking=False)[1]
    pieces = prefill_pieces(len(prompt), 0, prefill_cost(chat))
    passes = []
    for _ in range(3):
        cache, times, start = make_prompt_cache(model), [], 0
        for n in pieces:
            t0 = time.perf_counter()
            model(mx.array(prompt[start: start + n])[None], cache=cache)
            start += n
            mx.eval([c.state for c in cache])  # as the server prefills: the cache, not the prompt's logits
            times.append(time.perf_counter() - t0)
        passes.append(times)
    return [statistics.median(p[i] for p in passes) for i in range(len(passes[0]))]


def long_prompt_text(prompt_tokens: int) -> str:
    return (ROOT / "tests" / "fixtures" / "qwen35-tiny" / "heldout.txt").read_text()[: 4 * prompt_tokens]


def long_prompt_round(url: str, prompt_tokens: int, tokens: int, chunks_alone: list[float]) -> dict:
    """Four streaming clients alone, then again while a fifth sends a prompt of about `prompt_tokens`
    tokens: their p99 inter-token latency (between chunks that carry text), the long prompt's time to
    first token alone, and its prefill time per piece: on average from that time to first token, and
    each piece's alone (`chunks_alone`)."""
    text = long_prompt_text(prompt_tokens)

    def long_request():
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                           "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            usage = json.loads(r.read())["usage"]
        return time.perf_counter() - t0, usage["prompt_tokens"]

    long_request()  # unmeasured: its prompt then sits in the prefix cache, so vary it below
    text = text[1:]
    alone_s, n_prompt = long_request()
    text = text[1:]
    solo = load_round(url, 4, tokens)
    holder: dict = {}
    worker = threading.Thread(target=lambda: holder.update(zip(("seconds", "prompt"), long_request())))
    t0 = time.perf_counter()
    clients = threading.Thread(target=lambda: holder.update(load=load_round(url, 4, tokens)))
    clients.start()
    time.sleep(0.5)
    worker.start()
    clients.join()
    worker.join()
    chunks = len(chunks_alone)
    return {"prompt_tokens": n_prompt, "prefill_s": alone_s, "chunk_s": alone_s / chunks, "chunks": chunks,
            "chunk_s_first": chunks_alone[0], "chunk_s_slowest": max(chunks_alone),
            "solo_p99": p99([g for r in solo["results"] for g in r["gaps"]]),
            "loaded_p99": p99([g for r in holder["load"]["results"] for g in r["gaps"]]),
            "long_s_loaded": holder["seconds"], "wall": time.perf_counter() - t0,
            "errors": sum(r["error"] is not None for r in holder["load"]["results"])}


def load_round(url: str, clients: int, tokens: int) -> dict:
    results = [None] * clients
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, stream_once(url, QUESTIONS[i % len(QUESTIONS)] + f" (client {i})", tokens))) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall": wall, "results": results}


def two_turns(url: str) -> dict:
    def ask(messages):
        body = json.dumps({"model": "m", "messages": messages, "max_tokens": 32, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True},
                           "chat_template_kwargs": {"enable_thinking": False}}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
        t0, first, text, usage = time.perf_counter(), None, "", None
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    text += chunk["choices"][0]["delta"]["content"]
        return (first or time.perf_counter()) - t0, text, usage

    long_question = (ROOT / "tests" / "fixtures" / "qwen35-tiny" / "heldout.txt").read_text()[:6000]
    messages = [{"role": "user", "content": "Summarise this file:\n" + long_question}]
    ttft1, reply, usage1 = ask(messages)
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Shorter, please."}]
    ttft2, _, usage2 = ask(messages)
    return {"turn1_ttft": ttft1, "turn1_prompt_tokens": usage1["prompt_tokens"],
            "turn1_cached": usage1["prompt_tokens_details"]["cached_tokens"], "turn2_ttft": ttft2,
            "turn2_prompt_tokens": usage2["prompt_tokens"],
            "turn2_cached": usage2["prompt_tokens_details"]["cached_tokens"]}


def wait_ready(url: str) -> None:
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--native", action="store_true", help="serve with the quantized kernels")
    parser.add_argument("--long-prompt", type=int, default=4096, help="tokens of the long prompt's round")
    args = parser.parse_args()
    import tempfile

    import mixquant

    mixquant.enable_cpu_blas()
    from mixquant.convert import ConvertOptions, convert
    from mixquant.quant.recipe import unsloth

    tmp = tempfile.TemporaryDirectory()
    quant = Path(tmp.name) / "qwen35-tiny-unsloth4"
    convert(FIXTURE, quant, ConvertOptions(recipe=unsloth(4), keep_vision=False, keep_mtp=False, progress=False))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mixquant.cli", "serve", str(quant), "--port", str(port),
           "--max-concurrency", str(max(args.clients)), "--max-tokens", str(max(args.tokens, 64))]
    if args.native:
        cmd.append("--native")
    server = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        stream_once(url, "warm up", 8)
        rows = []
        for clients in args.clients:
            load_round(url, clients, args.tokens)
            rounds = [load_round(url, clients, args.tokens) for _ in range(args.rounds)]
            results = [r for rnd in rounds for r in rnd["results"]]
            ttfts = sorted(r["ttft"] for r in results)
            rows.append({
                "clients": clients,
                "tok_s": statistics.median(sum(r["chunks"] for r in rnd["results"]) / rnd["wall"] for rnd in rounds),
                "ttft_p50": ttfts[len(ttfts) // 2], "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
                "errors": sum(r["error"] is not None for r in results),
                "completed": sum(r["error"] is None for r in results), "requests": len(results)})
            print(f"{clients:>3} clients: {rows[-1]['tok_s']:.1f} tok/s, TTFT p50 {rows[-1]['ttft_p50']:.2f} s, "
                  f"p95 {rows[-1]['ttft_p95']:.2f} s, errors {rows[-1]['errors']}", flush=True)
        turns = two_turns(url)
        alone = chunk_seconds(quant, args.long_prompt)  # the server idle meanwhile
        long = long_prompt_round(url, args.long_prompt, args.tokens, alone)
        print(f"long prompt ({long['prompt_tokens']} tokens, {long['chunk_s']:.2f} s per chunk): four streams' p99 "
              f"inter-token {long['solo_p99']:.3f} s alone, {long['loaded_p99']:.3f} s beside it; chunks alone "
              f"{long['chunk_s_first']:.2f} s (first) to {long['chunk_s_slowest']:.2f} s (slowest)", flush=True)
        print(f"two turns: TTFT {turns['turn1_ttft']:.2f} s -> {turns['turn2_ttft']:.2f} s, cached prompt tokens "
              f"{turns['turn1_cached']} -> {turns['turn2_cached']} of {turns['turn2_prompt_tokens']}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
        tmp.cleanup()
    from mixquant import cpu_blas

    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {cpu_blas.enable()}"
    out = {"machine": machine, "weights": "quantized kernels (--native)" if args.native else
           "the default compute path (here: float32, the weights dequantized)",
           "tokens": args.tokens, "rounds": args.rounds, "rows": rows, "two_turns": turns, "long_prompt": long}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    write_doc(out)


def write_doc(out: dict) -> None:
    single = next(r["tok_s"] for r in out["rows"] if r["clients"] == 1)
    t = out["two_turns"]
    lines = ["<!-- server-load:begin -->", "## Server under load", "",
             f"`python benchmarks/server_load.py` ({out['machine']}): `mixquant serve` on the fixture's "
             f"unsloth-4 quant, {out['weights']}, each client streaming {out['tokens']} tokens at temperature 0.7, "
             f"median of {out['rounds']} rounds after an unmeasured one.", "",
             "| clients | aggregate tok/s | vs 1 client | TTFT p50 s | TTFT p95 s | completed | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['tok_s']:.1f} | {r['tok_s'] / single:.2f}x | {r['ttft_p50']:.2f} | "
              f"{r['ttft_p95']:.2f} | {r['completed']}/{r['requests']} | {r['errors']} |" for r in out["rows"]]
    lines += ["", f"A two-turn conversation (a {t['turn1_prompt_tokens']}-token first prompt): time to first token "
              f"{t['turn1_ttft']:.2f} s on turn 1, {t['turn2_ttft']:.2f} s on turn 2, which found "
              f"{t['turn2_cached']} of its {t['turn2_prompt_tokens']} prompt tokens in the prefix cache."]
    g = out.get("long_prompt")
    if g:
        bound = 2 * g["solo_p99"] + g["chunk_s"]
        slowest = 2 * g["solo_p99"] + g.get("chunk_s_slowest", g["chunk_s"])
        lines += ["", f"A long prompt beside streams (prefill interleaved with decoding, one piece of the prompt per "
                  f"decoding step: {PREFILL_CHUNK} tokens, fewer the later they come, cut so that each costs the "
                  f"FLOPs of the first, since a later piece attends to more positions): four clients streaming "
                  f"{out['tokens']} tokens, then the same while a fifth sends a {g['prompt_tokens']}-token prompt "
                  f"in {g.get('chunks', '?')} pieces ({g['prefill_s']:.2f} s to its first token alone, "
                  f"{g['chunk_s']:.3f} s per piece on average; {g['long_s_loaded']:.2f} s beside the streams). Alone, "
                  f"in the server's compute path, the first piece takes {g['chunk_s_first']:.3f} s and the slowest "
                  f"{g['chunk_s_slowest']:.3f} s. Inter-token latency is measured between chunks that carry text.", "",
                  "| streams' p99 inter-token s | alone | beside the long prompt | bound: 2x alone + the average "
                  "piece | bound: 2x alone + the slowest piece | errors |", "|---|---:|---:|---:|---:|---:|",
                  f"| four streaming clients | {g['solo_p99']:.3f} | {g['loaded_p99']:.3f} | {bound:.3f} "
                  f"({'met' if g['loaded_p99'] <= bound else 'not met'}) | {slowest:.3f} "
                  f"({'met' if g['loaded_p99'] <= slowest else 'not met'}) | {g['errors']} |"]
    lines += ["<!-- server-load:end -->"]
    replace_section(DOC, "server-load", "\n".join(lines))


if __name__ == "__main__":
    main()
