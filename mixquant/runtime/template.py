"""Chat templates: the model's own Jinja template, unmodified, rendered the way transformers does
(sandboxed, trim_blocks/lstrip_blocks, `tojson` without HTML escaping, `raise_exception`,
`strftime_now`), with `enable_thinking` and any other keyword passed through."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from mixquant.errors import MixquantError

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
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
    try:
        return compile_template(template).render(messages=messages, tools=tools,
                                                 add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise MixquantError(f"chat template: {e}") from None
