"""Quality presets: the steps a one-flag conversion takes, as data.

`mixquant convert -i M -o OUT --target-bpw 3.6` allocates bits by measured sensitivity (`auto`) and
rounds with the default preset; `--quality fast|balanced|best` picks another. Each preset names
its rounding and distillation; their quality and time are measured by benchmarks/calibration.py
(docs/RESULTS.md, "Default calibration off the lab path"). The expected time is the measured rate
of each step on this project's 2-core x86_64 CPU, per billion parameters (and thousand
calibration tokens, or distillation step), scaled to the model: a projection, printed before
starting.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixquant.errors import MixquantError


@dataclass(frozen=True)
class Preset:
    name: str
    rounding: str  # nearest | gptq | learned
    distill_steps: int  # 0: none
    summary: str


PRESETS = {p.name: p for p in (
    Preset("fast", "nearest", 0, "allocation by the proxy sensitivity, rounding to nearest"),
    Preset("balanced", "gptq", 0, "allocation by the proxy sensitivity, GPTQ"),
    Preset("best", "gptq", 256, "allocation by the proxy sensitivity, GPTQ, then 256 steps of distillation"),
)}
DEFAULT_PRESET = "balanced"

# Measured rates on this project's 2-core x86_64 CPU (OpenBLAS), per billion parameters: GPTQ per thousand
# calibration tokens and distillation per step from SmolLM2-135M (benchmarks/results/rounding-smollm2.json:
# auto 3.6 gptq 130 s on 8192 tokens; + 64 distillation steps 566 s); the proxy per thousand tokens of its
# windows (14 s for 8 windows of 512 on the 11M-parameter fixture) and sampling per thousand sampled tokens
# (22 s for 8192 on the fixture). Small models carry fixed costs, so larger ones are overestimated.
GPTQ_S = 118.0
DISTILL_S_PER_STEP = 66.0
PROXY_S = 310.0
SAMPLING_S = 244.0
PROXY_TOKENS = 8 * 512  # the proxy's default windows (mixquant.calib.sensitivity.DEFAULT_WINDOWS)


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise MixquantError(f"--quality: {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def expected_seconds(p: Preset, params: int, calib_tokens: int, sampled: bool) -> float:
    """The preset's projected seconds for a model of `params` parameters on `calib_tokens` tokens
    (`sampled`: the default calibration, which samples the proxy's windows from the model and half
    of the rounding's tokens)."""
    g = params / 1e9
    total = PROXY_S * g * PROXY_TOKENS / 1e3
    if sampled:
        total += SAMPLING_S * g * PROXY_TOKENS / 1e3
    if p.rounding != "nearest":
        total += GPTQ_S * g * calib_tokens / 1e3 + (SAMPLING_S * g * calib_tokens / 2e3 if sampled else 0.0)
    return total + DISTILL_S_PER_STEP * g * p.distill_steps
