"""Latency vs density per provider, from a results CSV (matplotlib, Agg backend).

``python -m bench.plot CSV [-o PNG]`` or ``python -m bench plot CSV``. One panel per weight
shape ``N x K`` and dtype (rows) and per M (columns): p50 latency (log scale, p20-p80 as error
bars) against the level's density; colour = provider, marker = level set (o unstructured,
s N:M, ^ block). The dense baseline is the dashed line (and the point at density 1); the dotted
line is ``density x dense``, the ideal of a kernel whose cost scales with the kept weights. A last
row shows the MiniLM model's forward latency per level when the CSV has it.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

from .common import PNG_NAME, csv_command, csv_rows

COLORS = {"dense": "black", "elsa-fused": "tab:red", "elsa-cached": "tab:blue", "semi-structured": "tab:green",
          "bsr": "tab:purple"}
MARKERS = {"unstructured": "o", "nm": "s", "block": "^", "dense": "D"}


def _family(structure: str) -> str:
    if structure == "dense":
        return "dense"
    if structure.startswith("block"):
        return "block"
    if ":" in structure:
        return "nm"
    return "unstructured"


def plot(rows, path: str, *, title: str | None = None) -> str:
    """Write the PNG to ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    lin = [r for r in rows if r["op"] == "linear"]
    model = [r for r in rows if r["op"] == "model_forward"]
    rkeys = list(OrderedDict.fromkeys((r["shape"].split("x", 1)[1], r["dtype"]) for r in lin))
    mvals = sorted({int(r["shape"].split("x")[0]) for r in lin})
    nrows = len(rkeys) + (1 if model else 0)
    ncols = max(len(mvals), 1)
    if nrows == 0:
        raise SystemExit("python -m bench plot: the CSV has no linear or model_forward rows")
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for i, (nk, dt) in enumerate(rkeys):
        for j, m in enumerate(mvals):
            ax = axes[i][j]
            rs = [r for r in lin if r["shape"] == f"{m}x{nk}" and r["dtype"] == dt]
            if not rs:
                ax.set_visible(False)
                continue
            dense = next((r for r in rs if r["provider"] == "dense"), None)
            series: "OrderedDict[tuple, list]" = OrderedDict()
            for r in rs:
                series.setdefault((r["provider"], _family(r["structure"])), []).append(r)
            for (prov, fam), pts in series.items():
                pts.sort(key=lambda r: float(r["density"]))
                xs = [float(r["density"]) for r in pts]
                ys = [float(r["p50_us"]) for r in pts]
                lo = [y - float(r["p20_us"]) for y, r in zip(ys, pts)]
                hi = [float(r["p80_us"]) - y for y, r in zip(ys, pts)]
                ax.errorbar(xs, ys, yerr=[lo, hi], color=COLORS.get(prov, "gray"), marker=MARKERS.get(fam, "x"),
                            linestyle="-" if len(xs) > 1 else "none", markersize=5, capsize=2, linewidth=1.2,
                            label=f"{prov} ({fam})" if fam != "dense" else prov)
            if dense:
                d = float(dense["p50_us"])
                ax.axhline(d, color="black", linestyle="--", linewidth=0.8)
                ax.plot([0.05, 1.0], [0.05 * d, d], color="gray", linestyle=":", linewidth=0.8, label="density x dense")
            ax.set_yscale("log")
            ax.set_xlim(0, 1.05)
            ax.set_title(f"M={m}, W {nk} ({dt})", fontsize=9)
            ax.set_xlabel("density", fontsize=8)
            ax.set_ylabel("p50 latency (us)", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
        for j in range(len(mvals), ncols):
            axes[i][j].set_visible(False)
    if model:
        i = len(rkeys)
        shapes = list(OrderedDict.fromkeys((r["shape"], r["dtype"]) for r in model))
        for j in range(ncols):
            axes[i][j].set_visible(j < len(shapes))
        for j, (sh, dt) in enumerate(shapes[:ncols]):
            ax = axes[i][j]
            rs = [r for r in model if r["shape"] == sh and r["dtype"] == dt]
            dense = next((r for r in rs if r["provider"] == "dense"), None)
            series = OrderedDict()
            for r in rs:
                if r["provider"] != "dense" and r["level"] != "dense":
                    series.setdefault((r["provider"], r["structure"]), []).append(r)
            for (prov, struct), pts in series.items():
                pts.sort(key=lambda r: float(r["density"]))
                top = next((r for r in rs if r["provider"] == prov and r["level"] == "dense"), None)
                pts = pts + ([top] if top else [])
                ax.plot([float(r["density"]) for r in pts], [float(r["p50_us"]) / 1e3 for r in pts],
                        color=COLORS.get(prov, "gray"), marker=MARKERS.get(_family(struct), "o"),
                        label=f"{prov} ({struct})")
            if dense:
                ax.axhline(float(dense["p50_us"]) / 1e3, color="black", linestyle="--", linewidth=0.8, label="dense model")
            ax.set_title(f"{sh} forward ({dt})", fontsize=9)
            ax.set_xlabel("density", fontsize=8)
            ax.set_ylabel("p50 latency (ms)", fontsize=8)
            ax.set_ylim(bottom=0)
            ax.set_xlim(0, 1.05)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    handles = {}
    for row in axes[: len(rkeys)]:
        for ax in row:
            if ax.get_visible():
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
    height = 3.2 * nrows
    top, bottom = 0.45 / height, (0.25 + 0.22 * (1 + len(handles) // 5)) / height
    r0 = rows[0]
    fig.suptitle(title or f"{r0['device']} - torch {r0['torch']} - git {r0['git_sha']} - {r0['timestamp']}", fontsize=10,
                 y=1 - 0.12 / height)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)), fontsize=8,
                   bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, bottom, 1, 1 - top))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = csv_command("python -m bench plot", 'PNG of latency vs density per provider from a results CSV.')
    p.add_argument("-o", "--output", help=f"PNG path (default: {PNG_NAME} beside the CSV)")
    a = p.parse_args(argv)
    rows = csv_rows(a, "python -m bench plot")
    if not rows:
        return 2
    out = a.output or os.path.join(os.path.dirname(os.path.abspath(a.csv)), PNG_NAME)
    print(plot(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
