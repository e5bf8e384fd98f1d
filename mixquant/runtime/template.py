"""Chat templates: the model's own Jinja template, unmodified, rendered the way transformers does
(sandboxed, trim_blocks/lstrip_blocks, `tojson` without HTML escaping, `raise_exception`,
`strftime_now`), with `enable_thinking` and any other keyword passed through."""

from __future__ import annotations

import json
import time
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from mixquant.errors import MixquantError

MAX_RENDER_CHARS = 64 << 20  # a prompt, rendered: far past any context length
MAX_RANGE_STEPS = 10_000_000  # range() items one render may iterate over, all loops together
MAX_RENDER_SECONDS = 10.0

_budget: ContextVar[list] = ContextVar("template_budget")  # [range steps left, deadline]


class TemplateLimit(Exception):
    pass


def _spend(steps: int) -> None:
    budget = _budget.get(None)
    if budget is None:
        return
    budget[0] -= steps
    if budget[0] < 0:
        raise TemplateLimit(f"loops over more than {MAX_RANGE_STEPS} range() items")
    if time.monotonic() > budget[1]:
        raise TemplateLimit(f"rendering took over {MAX_RENDER_SECONDS:g} s")


def _bounded_range(*args):
    r = range(*args)
    _spend(0)
    for i, value in enumerate(r):
        if i % 1024 == 0:
            _spend(1024)
        yield value


def _sized(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        """The sandbox, with repetition and powers bounded ("x" * 10**8 would take gigabytes)."""

        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    size = _sized(seq)
                    if size is not None and isinstance(n, int) and size * n > MAX_RENDER_CHARS:
                        raise TemplateLimit(f"a repetition of {size * n} items")
            elif isinstance(left, int) and isinstance(right, int) and abs(right) > 4096:
                raise TemplateLimit(f"a power {left} ** {right}")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["range"] = _bounded_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str, messages: list[dict], *, tools=None, add_generation_prompt: bool = True,
           specials: dict | None = None, **kwargs) -> str:
    """The prompt text for `messages`. Template errors (raise_exception) become MixquantError."""
    import jinja2

    context = dict(specials or {})
    context.update({k: v for k, v in kwargs.items() if v is not None})
    token = _budget.set([MAX_RANGE_STEPS, time.monotonic() + MAX_RENDER_SECONDS])
    try:
        pieces, size = [], 0
        for piece in compile_template(template).generate(messages=messages, tools=tools,
                                                         add_generation_prompt=add_generation_prompt, **context):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise TemplateLimit(f"its output passed {MAX_RENDER_CHARS} characters")
            _spend(0)
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit as e:
        raise MixquantError(f"chat template: stopped, {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise MixquantError(f"chat template: {e}") from None
    except (OverflowError, RecursionError, MemoryError, TypeError, ValueError) as e:
        raise MixquantError(f"chat template: {type(e).__name__}: {e}") from None
    finally:
        _budget.reset(token)
