"""The MiniLM experiment's outputs: long-format CSV, markdown table, plot, JSON (:mod:`.minilm_elsa`)."""
from __future__ import annotations

import csv
import json
import os

__all__ = ["METRICS", "write", "write_csv", "markdown", "plot", "GOAL"]

METRICS = ("cos_mean", "cos_min", "nn_agree", "served_vs_trained")
#: The issue's goal: every ELSA level within this much mean cosine of its separate student.
GOAL = 0.01


def write(summary: dict, out: str) -> None:
    """``results.csv``, ``table.md``, ``cos_vs_sparsity.png`` and ``summary.json`` in ``out``."""
    write_csv(summary["rows"], os.path.join(out, "results.csv"))
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(markdown(summary))
    plot(summary["rows"], os.path.join(out, "cos_vs_sparsity.png"))
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


def write_csv(rows: list[dict], path: str) -> None:
    """One line per (method, target, evaluation set, metric): long format."""
    keys = ("method", "target", "level", "structure", "sparsity", "eval_set")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keys + ("metric", "value", "steps", "seconds"))
        for r in rows:
            for m in METRICS:
                if m in r:
                    w.writerow([r[k] for k in keys] + [m, repr(r[m]), r["steps"], f"{r['seconds']:.1f}"])


def _pick(rows, method, target, eval_set):
    for r in rows:
        if r["method"] == method and r["target"] == target and r["eval_set"] == eval_set:
            return r
    return None


def _cell(r) -> str:
    if r is None:
        return "-"
    return f"{r['cos_mean']:.4f} / {r['cos_min']:.4f} / {r['nn_agree'] * 100:.1f}%"


def _table(rows: list[dict], eval_set: str) -> str:
    head = ("| level | target | sparsity | ELSA (served from its file) | separate GMP student | one-shot magnitude | "
            f"ELSA - separate, mean cos | within {GOAL} | served = trained |\n"
            "|---|---|---:|---|---|---|---:|---|---|\n")
    body = ""
    for e in (r for r in rows if r["method"] == "ELSA" and r["eval_set"] == eval_set):
        sep = _pick(rows, "separate", e["target"], eval_set)
        one = _pick(rows, "one-shot", e["target"], eval_set)
        gap = "-" if sep is None else f"{e['cos_mean'] - sep['cos_mean']:+.4f}"
        ok = "-" if sep is None else ("yes" if e["cos_mean"] >= sep["cos_mean"] - GOAL else "**no**")
        same = "bit for bit" if e.get("served_vs_trained") == 0.0 else f"max diff {e.get('served_vs_trained')}"
        body += (f"| {e['level']} | {e['target']} | {e['sparsity']:.3f} | {_cell(e)} | {_cell(sep)} | {_cell(one)} | "
                 f"{gap} | {ok} | {same} |\n")
    return head + body


def _sizes(summary: dict) -> str:
    files = summary["files"]
    lines = []
    for tag, levels in (("unstructured", summary["settings"]["levels"]), ("nm", summary["settings"]["nm_levels"])):
        if f"elsa-{tag}" not in files:
            continue
        e = files[f"elsa-{tag}"]
        seps = [files[f"separate-{lv}"] for lv in levels if f"separate-{lv}" in files]
        if not seps:
            lines.append(f"- {', '.join(map(str, levels))}: one ELSA file {e['bytes'] / 2**20:.1f} MiB, training "
                         f"{e['seconds']:.0f} s ({e['steps']} steps).")
            continue
        lines.append(
            f"- {', '.join(map(str, levels))}: one ELSA file with every level and the dense network "
            f"{e['bytes'] / 2**20:.1f} MiB against {len(seps)} separate student file(s) "
            f"{sum(x['bytes'] for x in seps) / 2**20:.1f} MiB; training {e['seconds']:.0f} s ({e['steps']} steps) "
            f"against {sum(x['seconds'] for x in seps):.0f} s ({sum(x['steps'] for x in seps)} steps).")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    """The report: command, machine, settings, a table per evaluation set, file sizes and times."""
    s, m = summary["settings"], summary["machine"]
    out = ["# all-MiniLM-L6-v2: ELSA levels against separate students and one-shot pruning\n",
           f"Command: `{summary.get('command', 'python -m elsa_codec.examples.minilm.run')}`  ",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads; Python {m['python']}, "
           f"torch {m['torch']}, transformers {m['transformers']}. Whole run: {summary['seconds'] / 60:.1f} min.  ",
           f"Training: {summary['train_sentences']} sentences of Python's documentation (pydoc_data.topics), "
           f"batch {s['batch_size']}, at most {s['max_length']} tokens; {s['steps']} sparsify + "
           f"{s['densify_steps']} densify steps per ELSA level"
           + (f" ({s['final_steps']} in the final dense phase)" if s.get("final_steps") else "")
           + (f" ({s['nm_final_steps']} in the N:M student's)" if s.get("nm_final_steps") else "")
           + f", {s['steps'] + s['densify_steps']} steps per separate student; AdamW lr {s['lr']}"
           + (f" ({s['final_lr']} in the final dense phase)" if s.get("final_lr") else "")
           + f", hidden-state weight {s['hidden_weight']}, "
           f"densify_init {s.get('densify_init', 'restore')!r}"
           + (f"; first {s['layers']} blocks only" if s["layers"] else "") + ".\n",
           "Cells: mean cosine to the teacher's embedding / minimum cosine / top-1 nearest-neighbour agreement "
           "with the teacher.\n"]
    for name in sorted(summary["eval_sentences"], key=lambda k: k != "pydoc held-out"):  # the held-out set first
        n = summary["eval_sentences"][name]
        count = "" if name.startswith(f"{n} ") else f" ({n} sentences)"
        out.append(f"## {name}{count}\n\n{_table(summary['rows'], name)}")
    out.append("## Files and training time\n\n" + _sizes(summary) + "\n")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    """Mean cosine to the teacher against sparsity, one panel per evaluation set: ELSA solid,
    separate students dashed, one-shot dotted; N:M levels as diamonds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["eval_set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 4.2), squeeze=False)
    for ax, eval_set in zip(axes[0], sets):
        _panel(ax, [r for r in rows if r["eval_set"] == eval_set])
        ax.set_title(f"all-MiniLM-L6-v2, {eval_set}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax, rows: list[dict]) -> None:
    styles = {"ELSA": ("C0", "-", "o"), "separate": ("C1", "--", "s"), "one-shot": ("C2", ":", "^")}
    for method, (color, ls, mk) in styles.items():
        for nm in (False, True):
            pts = sorted((r["sparsity"], r["cos_mean"]) for r in rows if r["method"] == method
                         and (":" in r["target"]) == nm and r["target"] != "dense")
            if pts:
                ax.plot(*zip(*pts), color=color, ls=ls if not nm else "none", marker="D" if nm else mk,
                        label=f"{method}{' (N:M)' if nm else ''}")
    ax.set_xlabel("sparsity of the Linear weights")
    ax.set_ylabel("mean cosine to the teacher's embedding")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def main(argv=None) -> int:
    """``python -m elsa_codec.examples.minilm.report OUT``: rewrite OUT's table, plot and CSV from
    its ``summary.json`` (the plotting step, apart from the run)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m elsa_codec.examples.minilm.report", description=main.__doc__)
    p.add_argument("out", help="a folder written by the MiniLM experiment")
    a = p.parse_args(argv)
    with open(os.path.join(a.out, "summary.json"), encoding="utf-8") as f:
        write(json.load(f), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
