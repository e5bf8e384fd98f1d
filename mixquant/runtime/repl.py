"""`mixquant chat MODEL`: an interactive chat with streaming output.

Commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset),
/think on|off (thinking mode), /exit (or Ctrl-D).
"""

from __future__ import annotations

import sys

from mixquant.errors import MixquantError
from mixquant.runtime.chat import ChatSession, load_model

HELP = "commands: /reset, /system TEXT, /think on|off, /exit"
DIM, RESET = "\033[2m", "\033[0m"


def run(model_path, max_tokens: int = 512, temperature: float | None = None, out=None, mtp: int = 0,
        err=None, native: bool = False, kv=None, shard=None) -> int:
    """The chat loop; replies go to `out` (default: standard output), errors to `err` (default: standard error). kv: the KV cache
    settings (a mixquant.runtime.kv.KVQuant, or None); shard: a mixquant.distributed.Shard (every
    rank reads the same input, as mlx.launch relays it to each)."""
    out = out if out is not None else sys.stdout
    if sys.stdin is None or sys.stdin.closed:
        raise MixquantError("chat: standard input is closed (chat reads your messages from it)")
    model = load_model(model_path, mtp=bool(mtp), native=native, kv=kv, shard=shard)
    session = ChatSession(model)
    messages: list[dict] = []
    system: str | None = None
    thinking: bool | None = None
    color = out.isatty()
    print(f"mixquant chat: {model_path} ({HELP})", file=out, flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt, OSError, RuntimeError, ValueError):  # end of input, or none left
            print(file=out)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages, _ = [], session.reset()
            print("(conversation reset)", file=out, flush=True)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            messages, _ = [], session.reset()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=out, flush=True)
            continue
        if line.startswith("/think"):
            arg = line[len("/think"):].strip()
            if arg not in ("on", "off"):
                print("usage: /think on|off", file=out, flush=True)
                continue
            thinking = arg == "on"
            print(f"(thinking {arg})", file=out, flush=True)
            continue
        if line.startswith("/"):
            print(HELP, file=out, flush=True)
            continue
        messages.append({"role": "user", "content": line})
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        result = None
        try:
            for event in session.chat_stream(convo, max_new_tokens=max_tokens, temperature=temperature,
                                             enable_thinking=thinking, mtp=mtp or False):
                if event.type == "thinking":
                    out.write(f"{DIM}{event.text}{RESET}" if color else event.text)
                elif event.type == "text":
                    out.write(event.text)
                elif event.type == "tool_call":
                    out.write(f"\n[tool call {event.tool_call.name} {event.tool_call.arguments}]")
                elif event.type == "done":
                    result = event.result
                out.flush()
        except MixquantError as e:
            messages.pop()
            print(file=out, flush=True)
            print(f"mixquant: error: {e}", file=err or sys.stderr, flush=True)
            continue
        t = result.timings
        print(f"\n[{result.num_tokens} tokens, prefill {t['prefill_tokens']} at {t['prefill_tok_s']:.1f} tok/s, "
              f"decode {t['decode_tok_s']:.1f} tok/s]", file=out, flush=True)
        reply = {"role": "assistant", "content": result.text}
        if result.thinking:
            reply["reasoning_content"] = result.thinking
        if result.tool_calls:
            reply["tool_calls"] = [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                   for c in result.tool_calls]
        messages.append(reply)
