"""Composing mlx-lm's modules instead of changing them: a wrapper that stands where a module was,
holds it as `inner`, and answers for it any attribute it does not have itself (the model's code
may read, say, `layer.is_linear`)."""

from __future__ import annotations

import mlx.nn as nn


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner" or "inner" not in self:
                raise
            return getattr(self["inner"], name)
