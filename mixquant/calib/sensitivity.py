"""`mixquant sensitivity`: measure (or estimate) every unit's sensitivity on calibration windows.

The model is loaded unquantized in float32; the windows come from the bundled mix, a file, or the
model itself. A measured run saves its file after every unit and, run again with the same output,
model and windows, resumes: finished units are not recomputed.

Under the default calibration (`auto`) the windows are the model's own text, sampled from its
start token: the allocation's proxy ranks units by how much their rounding changes what the model
says, and measured off the lab path that ranking is best on the model's own text (docs/RESULTS.md,
"Default calibration off the lab path"), while GPTQ and distillation keep the default mix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mixquant.calib.data import AUTO, DEFAULT_CALIB, SELF, spread
from mixquant.errors import MixquantError
from mixquant.quant.sensitivity import MEASURED, PROXY, Sensitivity, hessian_bytes, measure, proxy, units_of

HESSIAN_SHARE = 0.25  # a proxy priced after GPTQ holds every linear's input Hessian: at most this share of memory

DEFAULT_WINDOWS = 8
DEFAULT_CTX = 512


def windows_hash(windows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int32).tobytes()).hexdigest()[:16]


def compute_sensitivity(src: Path, mode: str = PROXY, calib: str = DEFAULT_CALIB, n_windows: int = DEFAULT_WINDOWS,
                        ctx: int = DEFAULT_CTX, dtype: str = "bfloat16", out: Path | None = None,
                        config_dir: Path | None = None, progress=None, rounding: str = "nearest",
                        group=None) -> Sensitivity:
    """Every unit's sensitivity on `calib`. With `rounding` other than nearest a proxy is priced after
    GPTQ (mixquant.quant.sensitivity.gptq_ratio), which holds every linear's input Hessian: an error
    where those would take more than HESSIAN_SHARE of memory. group (mixquant.distributed): every
    rank gets rank 0's windows; the proxy splits them over the ranks, a measured run its units; `out`
    is given on rank 0 alone, which resumes it and writes it."""
    import mlx.core as mx

    from mixquant.calib.data import calibration_set
    from mixquant.distributed import is_main, rank0_windows
    from mixquant.loading import load, memory_bytes
    from mixquant.quant.plan import make_plan
    from mixquant.sources import arch_plan_of
    from mixquant.vocab import embedding_rows

    if mode not in (MEASURED, PROXY):
        raise MixquantError(f"--mode: {mode!r} is neither {MEASURED} nor {PROXY}")
    _, arch = arch_plan_of(Path(src), config_dir, keep_vision=False, keep_mtp=False)
    units = units_of(make_plan(arch, None, dtype))
    loaded = load(Path(src), dtype="float32", dequantize=True, config_dir=config_dir)
    spec = SELF if calib == AUTO else calib  # by default, priced on the model's own text (module docstring)
    windows = None
    if is_main(group):
        windows = calibration_set(spec, loaded.model, loaded.tokenizer, n_windows * ctx, ctx,
                                  embedding_rows(loaded.config, src), source=Path(src), config_dir=config_dir)
        windows = windows[spread(len(windows), n_windows)]
    windows = rank0_windows(windows, group, str(src), "--windows")
    after_gptq = mode == PROXY and rounding != "nearest"
    if after_gptq and hessian_bytes(units) > HESSIAN_SHARE * memory_bytes():
        raise MixquantError(f"--rounding {rounding}: the linears' input Hessians would take "
                            f"{hessian_bytes(units) / 1e9:.1f} GB, more than a quarter of this machine's memory")
    info = {"spec": str(calib), "text": spec, "windows": int(len(windows)), "ctx": int(windows.shape[1]),
            "tokens_hash": windows_hash(windows), "priced_after": "gptq" if after_gptq else "nearest"}
    sens = Sensitivity(mode, str(src), info, dtype, {})
    if mode == MEASURED:
        sens.units = _resumed(out, sens, group)
    mx_dtype = getattr(mx, dtype)
    if mode == PROXY:
        estimates = proxy(loaded.model, windows, units, mx_dtype, progress=progress, after_gptq=after_gptq,
                          group=group)
    else:
        estimates = {name: v["options"] for name, v in sens.units.items()}
        roles = {u.name: u for u in units}

        def save():
            sens.units = {name: _entry(roles[name], opts) for name, opts in estimates.items()}
            if out is not None:
                sens.save(out)

        measure(loaded.model, windows, units, mx_dtype, estimates, saved=save, progress=progress, group=group)
    sens.units = {u.name: _entry(u, estimates[u.name]) for u in units}
    if out is not None:
        sens.save(out)
    return sens


def _entry(unit, options: dict) -> dict:
    return {"role": unit.role.value, "shape": list(unit.shape), "options": options}


def _resumed(out: Path | None, fresh: Sensitivity, group) -> dict:
    """The units a partial run at `out` (read by rank 0, the only rank given `out`) finished, on
    every rank; its error, if any, on every rank."""
    from mixquant.distributed import broadcast_json

    units, problem = {}, None
    if out is not None and Path(out).exists():
        try:
            units = _resumable(Path(out), fresh).units
        except MixquantError as e:
            problem = str(e)
    units, problem = broadcast_json([units, problem], group)
    if problem:
        raise MixquantError(problem)
    return units


def _resumable(path: Path, fresh: Sensitivity) -> Sensitivity:
    """The partial run at `path` if it was made on the same model, windows and dtype; else an error."""
    old = Sensitivity.load(path)
    same = (old.mode == fresh.mode and old.source == fresh.source and old.dtype == fresh.dtype
            and old.calib == fresh.calib)
    if not same:
        raise MixquantError(f"{path}: exists and was measured on other windows, another model or dtype "
                            "(delete it, or choose another output)")
    return old
