"""Many candidates against one reference in one run, with mlx-lm's own quants as baselines.

The reference runs once; each candidate is converted (ours from recipe names, mlx-lm's with
`mlx_lm.convert`), evaluated against the kept reference log-probs, and reported as JSON, a
Markdown table sorted by size and a Pareto plot (KLD vs GB).
"""

from __future__ import annotations

import contextlib
import io
import json
import platform
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mixquant.errors import MixquantError
from mixquant.io.atomic import atomic_write
from mixquant.eval.kld import Reference, evaluate
from mixquant.eval.metrics import percent_difference, percent_interval
from mixquant.quant.recipe import AUTO

MLX_LM_UNIFORM_BITS = (2, 3, 4, 5, 6, 8)
MLX_LM_MIXED = ("mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6")
FAMILY_OURS = "mixquant"
FAMILY_MLX_UNIFORM = "mlx-lm uniform"
FAMILY_MLX_MIXED = "mlx-lm mixed"
FAMILY_GIVEN = "given"


@dataclass
class Candidate:
    name: str
    family: str
    path: Path | None = None  # set once it exists
    make: object = None  # callable(dest) that creates it


def parse_recipes(spec: str) -> list[tuple[str, float]]:
    """'unsloth:2-6,uniform:4,auto:3.5' -> [('unsloth', 2), ..., ('unsloth', 6), ('uniform', 4), ('auto', 3.5)]
    (auto takes target bits per weight). Every item is checked as convert would check it."""
    from mixquant.quant.auto import check_bpw
    from mixquant.quant.recipe import check_bits, unsloth

    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, bits = item.partition(":")
        if name not in ("unsloth", "uniform", AUTO) or not bits:
            raise MixquantError(f"--recipes: cannot read {item!r} (e.g. unsloth:2-6,uniform:4,auto:3.5)")
        if name == AUTO:
            try:
                target = float(bits)
            except ValueError:
                raise MixquantError(f"--recipes: cannot read the target {bits!r} in {item!r}") from None
            out.append((name, check_bpw(target, f"--recipes: {item}")))
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", bits)
        if match is None:
            raise MixquantError(f"--recipes: cannot read bits {bits!r} in {item!r} (a width, or a range like 2-6)")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if hi < lo:
            raise MixquantError(f"--recipes: the range {bits!r} in {item!r} runs backwards")
        for b in range(lo, hi + 1):
            if name == "uniform":
                check_bits(b, f"--recipes: {item}")
            else:
                unsloth(b)
            out.append((name, b))
    return out


def our_candidate(ref_path: Path, recipe: str, bits: float, group_size: int, sensitivity: Path | None = None
                  ) -> Candidate:
    """One of our quants; an auto one at `bits` bits per weight from the sensitivity file."""
    def make(dest: Path):
        from mixquant.convert import ConvertOptions, convert
        from mixquant.quant.auto import Target
        from mixquant.quant.recipe import recipe_from_options

        auto = recipe == AUTO
        options = ConvertOptions(recipe=recipe_from_options(recipe, None if auto else int(bits), group_size),
                                 keep_vision=False, keep_mtp=False, progress=False,
                                 target=Target(bpw=bits) if auto else None, sensitivity=sensitivity)
        convert(ref_path, dest, options)

    return Candidate(f"{recipe}-{bits:g}", FAMILY_OURS, make=make)


def mlx_lm_candidates(ref_path: Path, group_size: int) -> list[Candidate]:
    def maker(**kwargs):
        def make(dest: Path):
            from mlx_lm import convert as mlx_convert

            with contextlib.redirect_stdout(io.StringIO()):
                mlx_convert(str(ref_path), mlx_path=str(dest), quantize=True, q_group_size=group_size, **kwargs)

        return make

    out = [Candidate(f"mlx-lm {b}-bit", FAMILY_MLX_UNIFORM, make=maker(q_bits=b)) for b in MLX_LM_UNIFORM_BITS]
    out += [Candidate(f"mlx-lm {r}", FAMILY_MLX_MIXED, make=maker(quant_predicate=r)) for r in MLX_LM_MIXED]
    return out


def run_compare(reference: Reference, ref_path: Path, candidates: list[Candidate], out_dir: Path,
                keep_models: bool = False, log=print, tasks=None) -> dict:
    """`tasks(path)`, when given, scores each candidate folder on task suites against the reference
    ({suite: {"score", "reference", "difference", ...}}), while the folder still exists."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "models" if keep_models else Path(tempfile.mkdtemp(prefix="mixquant-compare-"))
    entries = []
    try:
        for c in candidates:
            t0 = time.perf_counter()
            path = c.path
            if path is None:
                path = work / c.name.replace(" ", "_")
                if path.exists():
                    shutil.rmtree(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                c.make(path)
            t1 = time.perf_counter()
            report = evaluate(path, reference)
            t2 = time.perf_counter()
            report.update(name=c.name, family=c.family, convert_seconds=round(t1 - t0, 2),
                          eval_seconds=round(t2 - t1, 2))
            if tasks is not None:
                report["tasks"] = tasks(path)
            if not keep_models and c.path is None:
                report["model"] = f"(temporary) {c.name}"
                shutil.rmtree(path, ignore_errors=True)
            entries.append(report)
            log(f"{c.name:<24} {report['size_bytes'] / 1e6:9.3f} MB  {report['bpw']:6.3f} bpw  "
                f"KLD {report['kld']['mean']:.5f}  p99.9 {report['kld']['p999']:.4f}  "
                f"({t1 - t0:.0f}s + {t2 - t1:.0f}s)")
    finally:
        if not keep_models:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "reference": str(ref_path),
        "text": reference.text,
        "ctx": reference.ctx,
        "chunks": len(reference.windows),
        "reference_topk": reference.topk,
        "machine": f"{platform.machine()} {platform.system()}",
        "entries": sorted(entries, key=lambda e: e["size_bytes"]),
    }
    report = json.dumps(result, indent=2) + "\n"
    atomic_write(out_dir / "report.json", lambda tmp: tmp.write_text(report))
    atomic_write(out_dir / "report.md", lambda tmp: tmp.write_text(markdown_table(result)))
    atomic_write(out_dir / "pareto.png", lambda tmp: pareto_plot(result, tmp), suffix=".partial.png")
    return result


def markdown_table(result: dict) -> str:
    lines = [
        f"Reference `{Path(result['reference']).name}`, text `{result['text']}`, {result['chunks']} windows of "
        f"{result['ctx']} tokens ({result['entries'][0]['tokens'] if result['entries'] else 0} scored).",
        "",
        "| model | family | MB | bpw | mean KLD ± se | median | p99 | p99.9 | same top | PPL ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in result["entries"]:
        k = e["kld"]
        name = f"**{e['name']}**" if e["family"] == FAMILY_OURS else e["name"]
        lines.append(
            f"| {name} | {e['family']} | {e['size_bytes'] / 1e6:.3f} | {e['bpw']:.3f} | {k['mean']:.5f} ± "
            f"{k['stderr']:.5f} | {k['median']:.5f} | {k['p99']:.4f} | {k['p999']:.4f} | "
            f"{100 * e['same_top']:.2f}% | {e['ppl']['ratio']:.4f} |"
        )
    scored = [e for e in result["entries"] if e.get("tasks")]
    if scored:
        suites = list(scored[0]["tasks"])
        first = scored[0]["tasks"]
        lines += ["", "Task scores in % with 95% intervals; the difference is the model's minus the reference's on the "
                  "same items, with its paired interval and p-value.", "",
                  "| model | " + " | ".join(f"{s} % | {s} difference" for s in suites) + " |",
                  "|---|" + "---|---|" * len(suites),
                  "| reference | " + " | ".join(f"{percent_interval(first[s]['reference'])} | -"
                                               for s in suites) + " |"]
        for e in scored:
            t = e["tasks"]
            lines.append(f"| {e['name']} | " + " | ".join(
                f"{percent_interval(t[s]['score'])} | {percent_difference(t[s]['difference'])}, "
                f"p {t[s]['difference']['p']:.3f}" for s in suites) + " |")
    return "\n".join(lines) + "\n"


FAMILY_STYLE = {
    FAMILY_OURS: dict(color="#d62728", marker="o"),
    FAMILY_MLX_UNIFORM: dict(color="#1f77b4", marker="s"),
    FAMILY_MLX_MIXED: dict(color="#2ca02c", marker="^"),
    FAMILY_GIVEN: dict(color="#7f7f7f", marker="D"),
}


def pareto_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    biggest = max((e["size_bytes"] for e in result["entries"]), default=0)
    unit, scale = ("GB", 1e9) if biggest >= 1e9 else ("MB", 1e6)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in ((axes[0], "mean", "mean KLD"), (axes[1], "p999", "99.9th percentile KLD")):
        for family, style in FAMILY_STYLE.items():
            pts = sorted((e["size_bytes"] / scale, e["kld"][key], e["name"]) for e in result["entries"]
                         if e["family"] == family)
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            ax.plot(xs, ys, linestyle="-" if family != FAMILY_GIVEN else "none", label=family, **style)
            if family in (FAMILY_OURS, FAMILY_GIVEN):
                for x, y, n in pts:
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8,
                                color=style["color"])
        ax.set_yscale("log")
        ax.set_xlabel(f"language-model weights on disk ({unit})")
        ax.set_ylabel(title + " vs reference")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(result['reference']).name}: KL divergence vs size "
                 f"({result['chunks']}x{result['ctx']} tokens of {result['text']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
