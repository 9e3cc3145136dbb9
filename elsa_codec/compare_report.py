"""``elsa compare``'s outputs: long-format CSV, markdown table, plot (:mod:`elsa_codec.compare`)."""
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
        dense = [r["accuracy"] for r in rows if r["model"] == model and r["kind"] == "dense"]
        head = "| method | " + " | ".join(f"{s:.0%}" for s in levels) + " | time vs magnitude (ELSA / separate) |"
        out += [f"## {model} (dense network {_stat(dense)} %)\n", head,
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
    return "\n".join(out) + "\n"


def _early_bird_line(rows, model) -> str:
    """When the early-bird tickets were drawn, as shares of their phases."""
    parts = []
    for kind in ("ELSA", "separate"):
        got = [r["drawn_at"] for r in rows if (r["model"], r["method"], r["kind"]) == (model, "early-bird", kind)]
        drawn = [v for v in got if v == v]
        where = f"median {statistics.median(drawn):.0%} (range {min(drawn):.0%}-{max(drawn):.0%})" if drawn else "-"
        parts.append(f"{kind}: drawn in {len(drawn)} of {len(got)} phases, at {where} of the phase")
    return "Early-bird tickets: " + "; ".join(parts) + "."


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against sparsity, one panel per model: ELSA solid, separate dashed, a colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] != "dense"))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, method in enumerate(methods):
            for kind, ls in (("ELSA", "-"), ("separate", "--")):
                pts: dict = {}
                for r in rows:
                    if (r["model"], r["method"], r["kind"]) == (model, method, kind):
                        pts.setdefault(r["level"], []).append((r["sparsity"], r["accuracy"]))
                xy = sorted((statistics.mean(s for s, _ in v), statistics.mean(a for _, a in v)) for v in pts.values())
                if xy:
                    ax.plot(*zip(*xy), color=f"C{i}", ls=ls, marker="o", ms=3,
                            label=method if kind == "ELSA" else None)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits, {model} (solid: ELSA, dashed: separate)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
