"""Measured allocation against every fixed recipe, at each one's own size.

    python benchmarks/allocation.py --model fixture [--calib heldout-tail] [--measured]
    python benchmarks/allocation.py --model smollm2 [--calib mix]

Calibration: the default (`auto`) unless --calib says; heldout-tail is in-domain text (the
evaluation file's own tail), for a labelled second column only.

For each peer quant (mlx-lm's uniform 3/4/5/6-bit and mixed_3_4/3_6/4_6, our unsloth-2/3/4), an
`auto` quant is made at the peer's size (language-model tensor bytes, as plan counts them) from
the sensitivity file, and both are evaluated on the bundled held-out text (32 windows of 512
tokens that no calibration sees; calibration is the bundled mix, text sampled from the model, or
for the fixture the held-out file's tail after the evaluated part). With --measured (fixture) the
measured sensitivities are computed too, and the proxy is checked against them: Spearman rank
correlation over all units x options, allocations from each at 3.5 and 4.5 bpw, and the measured
KLD of allocated models against the sum their sensitivities predict.

Writes benchmarks/results/allocation-<model>.json, docs/pareto_allocation_<model>.png and the
model's section of docs/RESULTS.md. Machine and BLAS are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import replace_section  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "qwen35-tiny"
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "RESULTS.md"
PEER_MLX = [("mlx-lm 3-bit", dict(q_bits=3)), ("mlx-lm 4-bit", dict(q_bits=4)), ("mlx-lm 5-bit", dict(q_bits=5)),
            ("mlx-lm 6-bit", dict(q_bits=6)), ("mlx-lm mixed_3_4", dict(quant_predicate="mixed_3_4")),
            ("mlx-lm mixed_3_6", dict(quant_predicate="mixed_3_6")),
            ("mlx-lm mixed_4_6", dict(quant_predicate="mixed_4_6"))]
PEER_OURS = [("unsloth-2", 2), ("unsloth-3", 3), ("unsloth-4", 4)]


def source_of(model: str, work: Path) -> Path:
    if model == "fixture":
        return FIXTURE
    sys.path.insert(0, str(ROOT / "tests"))
    import llamacpp_tools

    return llamacpp_tools.smollm2_gguf()


def hf_folder(src: Path, work: Path) -> Path:
    """mlx_lm.convert needs a folder: the fixture is one; a GGUF is converted to an unquantized one."""
    if src.is_dir():
        return src
    from mixquant.convert import ConvertOptions, convert

    out = work / "float"
    if not out.exists():
        convert(src, out, ConvertOptions(dtype="float32", progress=False))
    return out


def heldout_tail(work: Path, tokenizer, chunks: int, longer: Path | None = None) -> str:
    """The held-out text past the evaluated windows (and a 1000-character gap), written into `work`:
    of the bundled evaluation text, or of `longer`, a file that begins with it (the fixture's own
    held-out file, 1.9 MB, for calibration budgets the bundled text's tail cannot hold)."""
    from mixquant.eval.kld import read_eval_text

    text, _ = read_eval_text(None)
    evaluated = len(tokenizer.decode(tokenizer.encode(text)[: chunks * 512]))
    if longer is not None:
        full = longer.read_text(encoding="utf-8")
        if not full.startswith(text):
            raise SystemExit(f"{longer}: does not begin with the evaluation text; its tail could overlap it")
        text = full
    path = work / ("heldout-tail.txt" if longer is None else "fixture-heldout-tail.txt")
    tail = text[evaluated + 1000 :]
    if not path.exists() or path.read_text(encoding="utf-8") != tail:  # kept as it is: caches key on its mtime
        path.write_text(tail, encoding="utf-8")
    return str(path)


def work_folder(work: str | None, prefix: str) -> Path:
    folder = Path(work) if work else Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def calibration_of(model: str, calib: str | None, work: Path, src: Path, chunks: int) -> tuple[str, str]:
    """(name for reports, calibration to pass on): `calib`, or by default the default calibration
    (`auto`, what a user gets); a held-out tail (in-domain text, a labelled second column) (`heldout-tail`, or `fixture-heldout-tail` from the fixture's longer
    file) is written into `work` and its path passed on."""
    from mixquant.loading import load_tokenizer

    name = calib or "auto"
    if name == "fixture-heldout-tail":
        return name, heldout_tail(work, load_tokenizer(src), chunks, FIXTURE / "heldout.txt")
    if name == "heldout-tail":
        return name, heldout_tail(work, load_tokenizer(src), chunks)
    return name, name


def reference_of(src: Path, work: Path, chunks: int):
    """The float32 reference on `chunks` held-out windows of 512 tokens, kept in `work`."""
    from mixquant.eval.kld import Reference, compute_reference

    path = work / "reference.npz"
    if path.exists():
        return Reference.load(path)
    reference = compute_reference(src, None, 512, chunks, topk="auto")
    reference.save(path)
    return reference


def kld_row(name: str, report: dict, **extra) -> dict:
    k = report["kld"]
    return {"name": name, "bytes": report["size_bytes"], "bpw": report["bpw"], "mean": k["mean"],
            "stderr": k["stderr"], "p999": k["p999"], "same_top": report["same_top"], **extra}


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("fixture", "smollm2"), default="fixture")
    ap.add_argument("--calib", default=None, help="auto (default) | mix | self | heldout-tail (fixture) | FILE")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--chunks", type=int, default=32, help="evaluation windows of 512 tokens")
    ap.add_argument("--measured", action="store_true", help="also measure sensitivities (slow) and compare")
    ap.add_argument("--work", default=None, help="keep intermediate files here (reused when present)")
    args = ap.parse_args()

    import mixquant

    blas = mixquant.enable_cpu_blas()
    from mlx_lm import convert as mlx_convert

    from mixquant.calib.sensitivity import compute_sensitivity
    from mixquant.convert import ConvertOptions, convert
    from mixquant.eval.kld import evaluate
    from mixquant.quant.auto import Target
    from mixquant.quant.recipe import auto_base, unsloth
    from mixquant.quant.sensitivity import MEASURED, PROXY, Sensitivity

    work = work_folder(args.work, "mixquant-alloc-")
    src = source_of(args.model, work)
    calib_name, calib = calibration_of(args.model, args.calib, work, src, args.chunks)
    t_start = time.time()
    reference = reference_of(src, work, args.chunks)

    calib_check = CalibrationKL(src, calib, args.windows) if args.measured else None

    def evaluated(name: str, make) -> dict:
        cache = work / f"eval-{name.replace(' ', '_')}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        path = work / "models" / name.replace(" ", "_")
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        plan = make(path)
        report = evaluate(path, reference)
        allocation = getattr(getattr(plan, "recipe", None), "allocation", None)
        if allocation and calib_check is not None:  # additivity: predicted sum vs the model, same windows
            report["predicted_kld"] = allocation["predicted_kld"]
            report["calib_kld"] = calib_check(path)
        shutil.rmtree(path, ignore_errors=True)
        cache.write_text(json.dumps(report))
        print(f"{name:<28} {report['size_bytes'] / 1e6:8.3f} MB  {report['bpw']:6.3f} bpw  "
              f"KLD {report['kld']['mean']:.5f} ± {report['kld']['stderr']:.5f}  p99.9 {report['kld']['p999']:.4f}",
              flush=True)
        return report

    folder = hf_folder(src, work)
    peers = []
    for name, kw in PEER_MLX:
        def make(dest, kw=kw):
            mlx_convert(str(folder), mlx_path=str(dest), quantize=True, q_group_size=64, **kw)
        peers.append(("mlx-lm", name, evaluated(name, make)))
    for name, bits in PEER_OURS:
        def make(dest, bits=bits):
            convert(src, dest, ConvertOptions(recipe=unsloth(bits), keep_vision=False, keep_mtp=False,
                                              progress=False))
        peers.append(("mixquant unsloth", name, evaluated(name, make)))

    sens_files = {}
    for mode in ([PROXY, MEASURED] if args.measured else [PROXY]):
        path = work / f"sensitivity-{mode}.json"
        t0 = time.time()
        if not path.exists() or mode == MEASURED:
            compute_sensitivity(src, mode, calib, args.windows, 512, out=path)
        sens_files[mode] = path
        print(f"{mode} sensitivity: {time.time() - t0:.0f} s", flush=True)

    def auto(target: Target, mode: str, label: str) -> dict:
        def make(dest):
            return convert(src, dest, ConvertOptions(recipe=auto_base(), target=target,
                                              sensitivity=sens_files[mode], keep_vision=False, keep_mtp=False,
                                              progress=False))
        return evaluated(label, make)

    rows = []
    for family, name, peer in peers:
        mine = auto(Target(bytes=peer["size_bytes"]), PROXY, f"auto@{name}")
        rows.append({"peer": kld_row(name, peer, family=family), "auto": kld_row(f"auto @ {name}", mine),
                     "mean_ratio": mine["kld"]["mean"] / peer["kld"]["mean"],
                     "p999_ratio": mine["kld"]["p999"] / peer["kld"]["p999"],
                     "size_ratio": mine["size_bytes"] / peer["size_bytes"]})
    result = {"model": args.model, "source": str(src), "calib": calib_name,
              "windows": args.windows, "chunks": args.chunks,
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, BLAS: {blas}",
              "rows": rows}
    if args.measured:
        result["proxy_vs_measured"] = compare_modes(sens_files, auto, Sensitivity)
    result["seconds"] = round(time.time() - t_start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"allocation-{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, ROOT / "docs" / f"pareto_allocation_{args.model}.png")
    write_doc(result)
    for r in rows:
        ok = r["mean_ratio"] <= 0.8 and r["p999_ratio"] <= 0.8 and abs(r["size_ratio"] - 1) <= 0.01
        print(f"{r['peer']['name']:<20} mean x{r['mean_ratio']:.3f}  p99.9 x{r['p999_ratio']:.3f}  "
              f"size x{r['size_ratio']:.4f}  {'ok' if ok else 'MISSED'}")


def compare_modes(sens_files, auto, Sensitivity) -> dict:
    """Proxy against measured: rank correlation, allocations from each, additivity."""
    from mixquant.quant.auto import Target
    from mixquant.quant.sensitivity import MEASURED, PROXY

    proxy, measured = (Sensitivity.load(sens_files[m]) for m in (PROXY, MEASURED))
    a, b = [], []
    for unit, entry in measured.units.items():
        for key, value in entry["options"].items():
            a.append(value)
            b.append(proxy.units[unit]["options"][key])
    out = {"spearman": spearman(a, b), "points": len(a), "targets": []}
    for bpw in (3.5, 4.5):
        row = {"bpw": bpw}
        for mode in (PROXY, MEASURED):
            report = auto(Target(bpw=bpw), mode, f"auto-{mode}@{bpw}")
            row[mode] = {"mean": report["kld"]["mean"], "stderr": report["kld"]["stderr"],
                         "p999": report["kld"]["p999"], "bpw": report["bpw"]}
            row[mode]["predicted_kld"] = report.get("predicted_kld")
            row[mode]["calib_kld"] = report.get("calib_kld")
        row["proxy_over_measured"] = row[PROXY]["mean"] / row[MEASURED]["mean"]
        out["targets"].append(row)
    return out


class CalibrationKL:
    """Mean KL of a model against the unquantized one on the sensitivity's own calibration windows,
    every position: what the sum of per-unit dKL predicts, if the units add up."""

    def __init__(self, src, calib, n_windows):
        import mlx.core as mx

        from mixquant.calib.data import calibration_set
        from mixquant.loading import load
        from mixquant.vocab import embedding_rows

        reference = load(src, dtype="float32", dequantize=True)
        self.windows = calibration_set(calib, reference.model, reference.tokenizer, n_windows * 512, 512,
                                       embedding_rows(reference.config, src))[:n_windows]
        self.refs = [self._logprobs(reference.model, w) for w in self.windows]
        self.mx = mx

    @staticmethod
    def _logprobs(model, window):
        import mlx.core as mx

        lg = model(mx.array(window[None]))[0].astype(mx.float32)
        out = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
        mx.eval(out)
        return out

    def __call__(self, path) -> float:
        from mixquant.loading import load

        mx = self.mx
        model = load(path, dequantize=True).model
        kls = [(mx.exp(r) * (r - self._logprobs(model, w))).sum(-1) for r, w in zip(self.refs, self.windows)]
        return float(mx.concatenate(kls).mean())


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "mean", "mean KLD"), (axes[1], "p999", "p99.9 KLD")):
        for family, style in (("mlx-lm", dict(color="#1f77b4", marker="s")),
                              ("mixquant unsloth", dict(color="#7f7f7f", marker="D"))):
            pts = sorted((r["peer"]["bytes"] / 1e6, r["peer"][key], r["peer"]["name"]) for r in result["rows"]
                         if r["peer"]["family"] == family)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", label=family, **style)
        pts = sorted((r["auto"]["bytes"] / 1e6, r["auto"][key]) for r in result["rows"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#d62728", marker="o", label="mixquant auto")
        ax.set_yscale("log")
        ax.set_xlabel("language-model weights (MB)")
        ax.set_ylabel(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']}: auto at each peer's size ({result['chunks']} held-out windows of 512)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


IN_DOMAIN = {"heldout-tail": " (in-domain text: the evaluation file's own tail, the lab path; the default path is in "
                             "the section \"Default calibration off the lab path\")"}


def write_doc(result: dict) -> None:
    key = f"allocation-{result['model']}"
    lines = [f"<!-- {key}:begin -->", f"## Measured allocation on {result['model']}: `auto` at each peer's size", "",
             f"`python benchmarks/allocation.py --model {result['model']}"
             f"{' --measured' if 'proxy_vs_measured' in result else ''}"
             f"{'' if result['calib'] == 'auto' else ' --calib ' + result['calib']}` ({result['machine']}; "
             f"{result['seconds']} s). Sensitivity: proxy on {result['windows']} windows of 512 tokens of "
             f"{result['calib']}{IN_DOMAIN.get(result['calib'], '')}; evaluation: {result['chunks']} windows of 512 tokens of the bundled held-out text.",
             "", f"![Pareto](pareto_allocation_{result['model']}.png)", "",
             "| peer | bpw | mean KLD ± se | p99.9 | auto bpw | auto mean KLD ± se | auto p99.9 | mean ratio | "
             "p99.9 ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        p, a = r["peer"], r["auto"]
        lines.append(f"| {p['name']} | {p['bpw']:.3f} | {p['mean']:.5f} ± {p['stderr']:.5f} | {p['p999']:.4f} | "
                     f"{a['bpw']:.3f} | {a['mean']:.5f} ± {a['stderr']:.5f} | {a['p999']:.4f} | "
                     f"{r['mean_ratio']:.3f} | {r['p999_ratio']:.3f} |")
    if "proxy_vs_measured" in result:
        c = result["proxy_vs_measured"]
        lines += ["", f"Proxy against measured sensitivity: Spearman rank correlation {c['spearman']:.3f} over "
                      f"{c['points']} units x options.", "",
                  "| target | from proxy: bpw, mean KLD | from measured: bpw, mean KLD | proxy / measured |",
                  "|---:|---:|---:|---:|"]
        for t in c["targets"]:
            lines.append(f"| {t['bpw']} | {t['proxy']['bpw']:.3f}, {t['proxy']['mean']:.5f} | "
                         f"{t['measured']['bpw']:.3f}, {t['measured']['mean']:.5f} | {t['proxy_over_measured']:.3f} |")
        lines += ["", "Additivity, on the calibration windows the sensitivities were measured on (every position): "
                      "the sum of the chosen options' measured dKL against the allocated model's own KLD.", "",
                  "| allocation | predicted (sum) | measured | measured / predicted |", "|---|---:|---:|---:|"]
        for t in c["targets"]:
            for mode in ("proxy", "measured"):
                m = t[mode]
                if m.get("predicted_kld"):
                    lines.append(f"| from {mode} at {t['bpw']} bpw | {m['predicted_kld']:.5f} | "
                                 f"{m['calib_kld']:.5f} | {m['calib_kld'] / m['predicted_kld']:.3f} |")
    lines.append(f"<!-- {key}:end -->")
    replace_section(DOC, key, "\n".join(lines))


if __name__ == "__main__":
    main()
