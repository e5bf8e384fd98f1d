"""The end-to-end check of the AWQ search: the mean KL divergence, on a few calibration windows,
between the float model and the model as quantized so far.

Per-group output error (the AWQ paper's objective) decides the exponent; on small models its gain
is of the same size as the change any re-rounding makes to the model's output, so a group's
candidate is kept only where it also lowers this divergence. The model is mlx-lm's own float
model; quantized tensors are replaced by their dequantized values, so a candidate costs one
forward pass over the windows and never touches the norms (x W_eff^T with W_eff = deq(Q(W s)) / s
is what the folded, quantized model computes).
"""

from __future__ import annotations

import numpy as np

from mixquant.eval.kld import forward_logits
from mixquant.eval.metrics import kl_per_token, log_softmax


class Judge:
    def __init__(self, model, windows: np.ndarray):
        self.model = model
        self.windows = windows
        self.modules = dict(model.named_modules())
        self.reference = [self._logprobs(w) for w in windows]
        self.original: dict[str, np.ndarray] = {}

    def covers(self, module: str) -> bool:
        return module in self.modules and hasattr(self.modules[module], "weight")

    def weight(self, module: str) -> np.ndarray:
        """The module's float weight as the model was loaded."""
        if module not in self.original:
            self.original[module] = np.array(self.modules[module].weight)
        return self.original[module]

    def set(self, module: str, value: np.ndarray) -> None:
        import mlx.core as mx

        self.weight(module)
        self.modules[module].weight = mx.array(value.astype(np.float32))

    def divergence(self) -> float:
        """Mean KL(float || current) over every position of the windows."""
        total, count = 0.0, 0
        for w, ref in zip(self.windows, self.reference):
            q = self._logprobs(w)
            total += float(kl_per_token(ref.astype(np.float64), q.astype(np.float64)).sum())
            count += len(ref)
        return total / count

    def _logprobs(self, window: np.ndarray) -> np.ndarray:
        """Log-probs [ctx, V] in float32 (windows x ctx x vocab of them is the judge's largest
        allocation); the current model's are rounded the same way, so an unchanged model diverges by 0."""
        return log_softmax(forward_logits(self.model, window)).astype(np.float32)

    def try_weights(self, updates: dict[str, np.ndarray]) -> float:
        """The divergence with these module weights; the model is left as it was."""
        before = {m: np.array(self.modules[m].weight) for m in updates}
        for m, v in updates.items():
            self.set(m, v)
        try:
            return self.divergence()
        finally:
            for m, v in before.items():
                self.set(m, v)
