"""The README.md written beside a converted model: what was done, and every tensor's bits."""

from __future__ import annotations

from collections import Counter, defaultdict

from mixquant.arch.tensors import MTP_FILE
from mixquant.quant.plan import Plan


def _bits_label(bits, dtype) -> str:
    return f"{bits}-bit" if bits else dtype.lower()


def model_card(plan: Plan, source_name: str, awq: dict | None = None, methods: dict | None = None,
               kv: dict | None = None) -> str:
    s = plan.summary()
    lines = [
        f"# {source_name} — mixquant {s['recipe']}",
        "",
        "Converted with mixquant for MLX; loads with `mlx_lm.load`.",
        "",
        "| | |",
        "|---|---|",
        f"| recipe | {s['recipe']} |",
        f"| float dtype | {s['dtype']} |",
        f"| text model | {s['model_params']:,} params, {s['model_bytes'] / 1e9:.4f} GB |",
        f"| bits per weight | {s['bits_per_weight']:.3f} (scales and biases included) |",
        f"| files | {', '.join(s['files'])} ({s['file_bytes'] / 1e9:.4f} GB) |",
    ]
    if "cache" in s:
        c = s["cache"]
        per = ", ".join(f"{k} {v / 1024:.2f} KiB" for k, v in c["kv_bytes_per_token"].items())
        lines.append(f"| KV cache per token | {per}; plus {c['fixed_bytes'] / 1e6:.2f} MB of fixed state per sequence |")
        for row in c["contexts"]:
            cells = ", ".join(f"{k} {(s['model_bytes'] + v) / 1e9:.3f} GB" for k, v in row.items() if k != "tokens")
            lines.append(f"| weights + cache at {row['tokens'] // 1024}k tokens | {cells} |")
    if kv is not None:
        from mixquant.kvplan import describe

        lines.append(f"| KV cache with `--kv-bits auto` | {describe(kv)} |")
    if s["mtp_bytes"]:
        lines.append(f"| MTP head | `{MTP_FILE}` sidecar, {s['mtp_bytes'] / 1e9:.4f} GB |")
    if s["vision_bytes"]:
        lines.append(f"| vision tower | kept unquantized, {s['vision_bytes'] / 1e9:.4f} GB |")
    if "allocation" in s:
        a = s["allocation"]
        lines.append(f"| allocation | target {a['target']} ({a['target_bytes']:,} bytes); predicted mean KL divergence "
                     f"{a['predicted_kld']:.5f} from {a['sensitivity']} sensitivity on {a['calib']['spec']}"
                     f"{', priced after GPTQ' if a['calib'].get('priced_after') == 'gptq' else ''} |")
    if methods and methods.get("preset"):
        from mixquant.quant.presets import PRESETS

        lines.append(f"| preset | `--quality {methods['preset']}`: {PRESETS[methods['preset']].summary} |")
    if methods and methods.get("calibration"):
        from mixquant.calib.data import describe

        lines.append(f"| calibration | {describe(methods['calibration'])} |")
    if plan.arch.dropped:
        lines.append(f"| dropped | {len(plan.arch.dropped)} source tensors |")

    if methods and (methods.get("rounding") != "nearest" or "distillation" in methods):
        lines += ["", "## Rounding", ""]
        if methods.get("rounding") == "gptq":
            lines.append(f"GPTQ (act-order, layer by layer on the quantized layers' outputs) on calibration text "
                         f"({methods['calibration']}); the embedding rounded to nearest.")
        if methods.get("rounding") == "learned":
            lines.append(f"Learned rounding (AutoRound-style: per-weight rounding offsets trained "
                         f"{methods['learn_steps']} steps per decoder layer on its output, layer by layer on the "
                         f"quantized layers' outputs) on calibration text ({methods['calibration']}); the head by "
                         f"GPTQ, the embedding rounded to nearest.")
        d = methods.get("distillation")
        if d:
            verdict = "kept" if d["kept"] else "not kept (it did not lower the held-out divergence)"
            what = ("Scales, biases and every unquantized float tensor of the text model" if d.get("floats") else
                    "Scales, biases and norm multipliers" if d.get("norms") else "Scales and biases")
            annealed = " (the learning rate annealed toward zero over the second half)" if d.get("anneal") else ""
            rate = f" at learning rate {d['lr']:g}" if "lr" in d else ""
            lines.append(f"{what} distilled for {d['steps']} steps{rate}{annealed} on the KL divergence to the "
                         f"unquantized model: held-out mean KL {d['heldout_before']:.5f} -> {d['heldout_after']:.5f}, "
                         f"{verdict}.")
            if d.get("heldout_checks"):
                best = f"; the state after step {d['best_step']} is the one kept" if d["kept"] else ""
                lines.append("Held-out mean KL at each check (step: KL): "
                             + ", ".join(f"{s}: {kl:.5f}" for s, kl in d["heldout_checks"]) + best + ".")
    if awq:
        lines += ["", "## AWQ", "",
                  f"Channel scales folded into the preceding norms (and the up projections' rows) before quantization; "
                  f"importance from {awq['importance']}, alpha {awq['alpha']} "
                  f"({awq['groups']} groups, mean alpha {awq['mean_alpha']:.2f}); "
                  f"{awq['clipped']} tensors quantized with the importance-weighted clipping fit."]
        if awq.get("judged"):
            before, after = awq["judged"]
            lines.append(f"End-to-end check on calibration windows: mean KL divergence {before:.5f} without AWQ, "
                         f"{after:.5f} with it.")
        if awq["skipped"]:
            lines.append("")
            lines.append("Groups left unscaled because the imatrix does not cover them:")
            lines += [f"- {k}: {why}" for k, why in awq["skipped"].items()]

    by_role: dict[str, Counter] = defaultdict(Counter)
    role_bytes: Counter = Counter()
    for e in plan.entries:
        by_role[e.tensor.role.value][_bits_label(e.bits, e.dtype)] += 1
        role_bytes[e.tensor.role.value] += e.nbytes
    lines += ["", "## Bits by role", "", "| role | bits (tensors) | bytes |", "|---|---|---:|"]
    for role, counts in by_role.items():
        bits = ", ".join(f"{b} ({n})" for b, n in counts.items())
        lines.append(f"| {role} | {bits} | {role_bytes[role]:,} |")

    lines += ["", "## Every tensor", "", "| tensor | role | shape | bits | group | bytes |", "|---|---|---|---|---:|---:|"]
    for r in plan.rows():
        shape = "×".join(map(str, r["shape"]))
        bits = r["bits"] if r["bits"] else r["dtype"].lower()
        lines.append(f"| `{r['name']}` | {r['role']} | {shape} | {bits} | {r['group_size'] or '–'} | {r['bytes']:,} |")
    return "\n".join(lines) + "\n"
