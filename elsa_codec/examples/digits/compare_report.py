"""``elsa compare``'s outputs: long-format CSV, markdown table, plot (:mod:`elsa_codec.examples.digits.compare`)."""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics

import torch

__all__ = ["write", "markdown", "plot"]


def write(rows: list[dict], out: str, meta: dict) -> None:
    """``results.csv`` (one line per row and metric), ``table.md``, ``accuracy_vs_sparsity.png``, ``run.json``."""
    meta = dict(meta, machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with open(os.path.join(out, "results.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "kind", "seed", "level", "sparsity", "metric", "value"])
        for r in rows:
            for m in ("accuracy", "seconds", "drawn_at"):
                w.writerow([r["model"], r["method"], r["kind"], r["seed"], r["level"], f"{r['sparsity']:.6f}", m,
                            f"{r[m]:.6f}"])
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown(rows, meta))
    with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    plot(rows, os.path.join(out, "accuracy_vs_sparsity.png"))


def _stat(vals) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals)
    return f"{m:.1f}" if len(vals) == 1 else f"{m:.1f} ± {statistics.stdev(vals):.1f}"


def _acc(rows, model, method, kind, level):
    key = (model, method, kind, level)
    return [r["accuracy"] for r in rows if (r["model"], r["method"], r["kind"], r["level"]) == key]


def _seconds(rows, model, method, kind) -> float:
    """Mean over seeds of a method's training time: the ELSA run, or the sum of its separate networks."""
    per_seed: dict = {}
    for r in rows:
        if (r["model"], r["method"], r["kind"]) == (model, method, kind):
            if kind == "ELSA":
                per_seed[r["seed"]] = r["seconds"]
            else:
                per_seed[r["seed"]] = per_seed.get(r["seed"], 0.0) + r["seconds"]
    return statistics.mean(per_seed.values()) if per_seed else float("nan")


def markdown(rows: list[dict], meta: dict) -> str:
    """Per model: accuracy (%) of ELSA / separate per method and level, mean ± std over seeds, and
    each method's training time relative to magnitude pruning."""
    levels = meta["levels"]
    out = ["# Sparsification methods: ELSA levels against separate networks\n",
           f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; {meta['jobs']} processes of 1 thread; "
           f"whole run {meta['seconds'] / 60:.1f} min.  ",
           f"Seeds {meta['seeds']}; {meta['dense_steps']} dense steps, then {meta['steps']} sparsify + "
           f"{meta['densify_steps']} densify steps per ELSA level; a separate network gets "
           f"{meta['steps'] + meta['densify_steps']} steps. Test accuracy (%) on the digits test split (540 images), "
           "mean ± std over the seeds: ELSA level / separate network.\n"]
    for model in meta["models"]:
        dense = [f"{name} {_stat([r['accuracy'] for r in rows if (r['model'], r['method']) == (model, key)])} %"
                 for key, name in (("dense", "dense network"), ("dense-zero", "ZerO-initialised dense network"))
                 if any((r["model"], r["method"]) == (model, key) for r in rows)]
        head = "| method | " + " | ".join(_pct(s) for s in levels) + " | time vs magnitude (ELSA / separate) |"
        out += [f"## {model} ({', '.join(dense)})\n", head,
                "|---|" + "---|" * len(levels) + "---|"]
        base = {k: _seconds(rows, model, "magnitude", k) for k in ("ELSA", "separate")}
        for method in meta["methods"]:
            cells = [" / ".join(_stat(_acc(rows, model, method, k, t)) for k in ("ELSA", "separate"))
                     for t in range(1, len(levels) + 1)]
            rel = " / ".join(f"{_seconds(rows, model, method, k) / base[k]:.2f}x" for k in ("ELSA", "separate"))
            out.append(f"| {method} | " + " | ".join(cells) + f" | {rel} |")
        out.append("")
        if "early-bird" in meta["methods"]:
            out.append(_early_bird_line(rows, model) + "\n")
        if "pipeline" in meta["methods"]:
            out += _ablation(rows, model, meta)
    return "\n".join(out) + "\n"


def _pct(sparsity: float) -> str:
    """``0.997 -> '99.7%'``, ``0.9 -> '90%'``."""
    return f"{round(sparsity * 100, 2):g}%"


def _ablation(rows, model, meta) -> list[str]:
    """Per pipeline variant and level: its accuracy minus the full pipeline's, in points (mean over
    seeds, ELSA / separate), and GMP's."""
    levels = meta["levels"]
    others = [m for m in meta["methods"] if m != "pipeline" and (m.startswith("pipeline-") or m == "magnitude")]
    if not others:
        return []
    out = [f"Change against the full pipeline ({model}, accuracy points, ELSA / separate; negative: the stage "
           "helps):\n", "| without | " + " | ".join(_pct(s) for s in levels) + " | mean |",
           "|---|" + "---|" * len(levels) + "---|"]
    for m in others:
        cells, diffs = [], {"ELSA": [], "separate": []}
        for t in range(1, len(levels) + 1):
            parts = []
            for k in ("ELSA", "separate"):
                a, b = _acc(rows, model, m, k, t), _acc(rows, model, "pipeline", k, t)
                d = statistics.mean(a) - statistics.mean(b) if a and b else float("nan")
                diffs[k].append(d)
                parts.append(f"{d:+.1f}")
            cells.append(" / ".join(parts))
        mean = " / ".join(f"{statistics.mean(diffs[k]):+.1f}" for k in ("ELSA", "separate"))
        name = "every stage (GMP)" if m == "magnitude" else m[len("pipeline-no-"):]
        out.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    return out + [""]


def _early_bird_line(rows, model) -> str:
    """When the early-bird tickets were drawn, as shares of their phases."""
    parts = []
    for kind in ("ELSA", "separate"):
        got = [r["drawn_at"] for r in rows if (r["model"], r["method"], r["kind"]) == (model, "early-bird", kind)]
        drawn = [v for v in got if v == v]
        where = f"median {statistics.median(drawn):.0%} (range {min(drawn):.0%}-{max(drawn):.0%})" if drawn else "-"
        parts.append(f"{kind}: drawn in {len(drawn)} of {len(got)} phases, at {where} of the phase")
    return "Early-bird tickets: " + "; ".join(parts) + "."


def _x(sparsity: float, extreme: bool) -> float:
    return 1.0 - sparsity if extreme else sparsity


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against sparsity, one panel per model: ELSA solid, separate dashed, a colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "dense"))
    extreme = max((r["sparsity"] for r in rows), default=0.0) > 0.98  # then density on a log axis
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(methods):
            for kind, ls in (("ELSA", "-"), ("separate", "--")):
                pts: dict = {}
                for r in rows:
                    if (r["model"], r["method"], r["kind"]) == (model, method, kind):
                        pts.setdefault(r["level"], []).append((r["sparsity"], r["accuracy"]))
                xy = sorted((_x(statistics.mean(s for s, _ in v), extreme), statistics.mean(a for _, a in v))
                            for v in pts.values())
                if xy:
                    ax.plot(*zip(*xy), color=f"C{i}", ls=ls, marker="o", ms=3,
                            label=method if kind == "ELSA" else None)
        if extreme:
            ax.set_xscale("log")
        ax.set_xlabel("density (kept fraction, log scale)" if extreme else "sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits, {model} (solid: ELSA, dashed: separate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
