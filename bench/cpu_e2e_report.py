"""Tables and plot of ``python -m bench cpu-e2e`` (a separate step: reads ``results.csv`` back).

``python -m bench cpu-e2e report CSV [-o DIR] [--run latest|all|TIMESTAMP]`` writes into ``DIR``
(default: the CSV's folder):

- ``tables.md``: per (model, dtype, threads) the LM table (per level: each op's time as a ratio
  to the stock model, lower = faster, with the absolute figure; the stock row gives the absolute
  figures; resident bytes per level); the MiniLM table; the switch table (``set_level`` cold /
  warm, own-file load, encoded copy, in ms, and their ratios). Each table states the command, the
  machine line (from ``COMMAND.txt`` beside the CSV) and the git revision of its run.
- ``tokens_per_s.png``: decode tokens/s per level, one panel per (model, batch), one line per
  (dtype, threads).

``latest`` picks, per section (lm, minilm, switch), the rows of the newest run that has it.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

LM_OPS = ("prefill", "decode", "generate")
VARIANTS = [("stock", "dense"), ("elsa", "1"), ("elsa", "2"), ("elsa", "3"), ("elsa", "dense")]
#: The levels with the output head sparsified too (``--head``), in the LM tables only.
HEAD_VARIANTS = [("elsa+head", "1"), ("elsa+head", "2"), ("elsa+head", "3")]
TABLES_NAME = "tables.md"
PNG_NAME = "tokens_per_s.png"


def section_of(row: dict) -> str:
    """``lm``, ``minilm`` or ``switch``: which section of the runner wrote ``row``."""
    if row["op"] == "switch" or row["metric"].endswith("_after_switch"):
        return "switch"
    if row["op"] == "forward" or row["model"].startswith("minilm"):
        return "minilm"
    return "lm"


def read_rows(path: str, run: str = "latest") -> list:
    """Rows of the CSV: ``latest`` (per section, the newest run that has it), ``all``, or one
    run's ``timestamp``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if run == "all":
        return rows
    if run != "latest":
        return [r for r in rows if r["timestamp"] == run]
    keep = []
    for sec in ("lm", "minilm", "switch"):
        part = [r for r in rows if section_of(r) == sec]
        if part:
            ts = max(r["timestamp"] for r in part)
            keep += [r for r in part if r["timestamp"] == ts]
    return keep


def read_commands(csv_path: str) -> dict:
    """``{timestamp: (command, machine line)}`` from ``COMMAND.txt`` beside the CSV."""
    path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "COMMAND.txt")
    out, ts = {}, None
    if not os.path.exists(path):
        return out
    for line in open(path, encoding="utf-8"):
        if "&& " in line and not line.startswith(" "):
            ts = line.split()[0]
            out[ts] = (line.split("&& ", 1)[1].strip(), "")
        elif line.strip().startswith("machine:") and ts in out:
            out[ts] = (out[ts][0], line.split(":", 1)[1].strip())
    return out


def _f(r: dict, k: str) -> float:
    try:
        return float(r[k])
    except (KeyError, ValueError, TypeError):
        return float("nan")


def _header(rows: list, title: str, commands: dict) -> str:
    r0 = rows[0]
    cmd, machine = commands.get(r0["timestamp"], ("python -m bench cpu-e2e", ""))
    facts = "" if "git " in machine else f"; torch {r0['torch']}; git {r0['git_sha']}"
    return f"### {title}\n\nCommand: `{cmd}`; machine: {machine or r0['device']}{facts}; run {r0['timestamp']}.\n"


def _level_name(provider: str, level: str, sparsity: str) -> str:
    if provider == "stock":
        return "stock (unencoded)"
    if level == "dense":
        return "4 = dense (ELSA, stored tensors)"
    head = ", head too" if provider == "elsa+head" else ""
    return f"{level} ({_f({'s': sparsity}, 's') * 100:.0f}% sparse{head})"


def _abs(op: str, r: dict) -> str:
    v = _f(r, "value")
    return f"{v:.1f} tok/s" if op == "decode" else f"{v:.1f} ms"


def _cell_title(op: str, b: str, L: str, n: str) -> str:
    if op == "prefill":
        return f"prefill {L} (b={b})"
    if op == "decode":
        return f"decode tok/s, {n} new (b={b})"
    return f"{L}+{n} total (b={b})"


def _mib(v) -> str:
    return f"{float(v) / 2**20:.1f}" if v not in ("", None) else "-"


def _find(rows: list, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _cells(rows: list) -> list:
    """The LM cells ``(op, batch, prompt_len, new_tokens)`` in table order."""
    keys = {(r["op"], r["batch"], r["prompt_len"], r["new_tokens"]) for r in rows if r["op"] in LM_OPS}
    return sorted(keys, key=lambda k: (int(k[1]), LM_OPS.index(k[0]), int(k[2])))


def _lm_line(sel: list, res: list, prov: str, lvl: str, cells: list) -> str | None:
    first = _find(sel, provider=prov, level=lvl)
    if first is None:
        return None
    out = [_level_name(prov, lvl, first["sparsity"])]
    for op, b, L, n in cells:
        r = _find(sel, provider=prov, level=lvl, op=op, batch=b, prompt_len=L, new_tokens=n)
        if r is None:
            out.append("-")
        elif prov == "stock":
            out.append(f"**{_abs(op, r)}**")
        else:
            out.append(f"{_f(r, 'ratio_vs_dense'):.3f}x ({_abs(op, r)})")
    for metric in ("cached_bytes", "rss_anon_delta"):
        r = _find(res, provider=prov, level=lvl, metric=metric)
        out.append(_mib(r["value"]) if r else "-")
    return "| " + " | ".join(out) + " |"


def table_lm(rows: list, commands: dict) -> str:
    """One table per (model, dtype, threads) of the causal LMs."""
    lm = [r for r in rows if r["op"] in LM_OPS]
    parts = []
    groups = sorted({(r["model"], r["dtype"], r["threads"]) for r in lm}, key=lambda g: (g[0], g[1] != "float32", int(g[2])))
    for model, dtype, th in groups:
        sel = [r for r in lm if (r["model"], r["dtype"], r["threads"]) == (model, dtype, th)]
        res = [r for r in rows if r["op"] == "resident" and r["model"] == model and r["dtype"] == dtype
               and section_of(r) == "lm"]
        cells = _cells(sel)
        out = [_header(sel, f"{model}, {dtype}, {th} thread(s): time per level / stock model (lower = faster)", commands),
               "Stock row: absolute p50 (ms, or decode tokens/s = batch x new tokens / s). Level rows: p50 time / p50 of "
               "the stock model timed in the same interleaved rounds, then the level's own figure. Resident: "
               "`cached_bytes` (packed level + decoded weight) and the RssAnon growth of set_level + warm-up, MiB.\n",
               "| level | " + " | ".join(_cell_title(*c) for c in cells) + " | cached MiB | RSS delta MiB |",
               "|---" * (len(cells) + 3) + "|"]
        out += [line for v in VARIANTS + HEAD_VARIANTS if (line := _lm_line(sel, res, v[0], v[1], cells))]
        parts.append("\n".join(out) + "\n")
    return "\n".join(parts)


def table_minilm(rows: list, commands: dict) -> str:
    """MiniLM forward per level: one table per dtype, columns (batch, threads)."""
    fw = [r for r in rows if r["op"] == "forward"]
    parts = []
    for dtype in sorted({r["dtype"] for r in fw}, key=lambda d: d != "float32"):
        sel = [r for r in fw if r["dtype"] == dtype]
        cols = sorted({(r["batch"], r["threads"]) for r in sel}, key=lambda c: (int(c[1]), int(c[0])))
        seq = sel[0]["prompt_len"]
        out = [_header(sel, f"{sel[0]['model']} forward, {dtype}, batch x {seq} tokens: time per level / stock", commands),
               "| level | " + " | ".join(f"b={b}, {th} th" for b, th in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for prov, lvl in VARIANTS:
            first = _find(sel, provider=prov, level=lvl)
            if first is None:
                continue
            cells = []
            for b, th in cols:
                r = _find(sel, provider=prov, level=lvl, batch=b, threads=th)
                cells.append("-" if r is None else (f"**{_f(r, 'value'):.2f} ms**" if prov == "stock"
                                                    else f"{_f(r, 'ratio_vs_dense'):.3f}x ({_f(r, 'value'):.2f} ms)"))
            out.append(f"| {_level_name(prov, lvl, first['sparsity'])} | " + " | ".join(cells) + " |")
        parts.append("\n".join(out) + "\n")
    return "\n".join(parts)


def _switch_line(sel: list, res: list, lvl: str, copy_ms: float) -> str:
    provs = ("set_level-cold", "set_level-warm", "set_level-lru", "set_level-all", "own-file-load")
    g = {p: _find(sel, provider=p, level=lvl) for p in provs}
    ms = {p: _f(r, "value") if r else float("nan") for p, r in g.items()}
    cold, warm, lru, every, own = (ms[p] for p in provs)
    sp = g["own-file-load"]["sparsity"] if g["own-file-load"] else ""
    mem = [_find(res, level=lvl, metric=m, provider=p) for p in ("elsa", "elsa-resident-all")
           for m in ("cached_bytes_after_switch", "rss_anon_delta_after_switch")]
    return (f"| {_level_name('elsa', lvl, sp)} | {cold:.1f} | {warm:.1f} | {lru:.1f} | {every:.2f} | {own:.1f} | "
            f"{cold / own:.2f}x | {warm / own:.2f}x | {lru / own:.2f}x | {every / own:.3f}x | {cold / copy_ms:.2f}x | "
            + " | ".join(_mib(m["value"]) if m else "-" for m in mem) + " |")


def table_switch(rows: list, commands: dict) -> str:
    """The level switch: per (model, dtype, threads), ms and ratios per sparse level."""
    sw = [r for r in rows if r["op"] == "switch"]
    parts = []
    for model, dtype, th in sorted({(r["model"], r["dtype"], r["threads"]) for r in sw},
                                   key=lambda g: (g[1] != "float32", int(g[2]))):
        sel = [r for r in sw if (r["model"], r["dtype"], r["threads"]) == (model, dtype, th)]
        res = [r for r in rows if r["op"] == "resident" and r["model"] == model and r["dtype"] == dtype
               and section_of(r) == "switch"]
        cp = _find(sel, provider="encoded-copy_")
        copy_ms = _f(cp, "value") if cp else float("nan")
        out = [_header(sel, f"Level switch, {model}, {dtype}, {th} thread(s)", commands),
               "`set_level` cold: the first switch to the level on a freshly loaded model (dense -> 1 -> 2 -> 3); warm: "
               "back to a recently used level (3 -> 1 -> 2 -> 3; the default keeps only the current packed level); LRU: "
               "the same with `ec.set_packed_cache_bytes` keeping every level packed; all: the same on a model loaded with "
               "`resident=\"all\"` (every level packed once at load, nested). Own-file load: `safetensors.torch.load_file` of a plain "
               "dense file of that level's encoded tensors (page cache) + `load_state_dict`. "
               f"Encoded copy_ (all ELSA weights into preallocated tensors): **{copy_ms:.1f} ms**"
               + (f" ({cp['note'].split('; ', 1)[-1]})" if cp else "") + ". p50 of the rounds, ms; resident after the "
               "load and the switch (before any forward; the RSS delta counts from before the load), MiB.\n",
               "| level | set_level cold | set_level warm | set_level LRU | set_level all | own-file load | cold / own | "
               "warm / own | LRU / own | all / own | cold / copy_ | cached MiB | RSS delta MiB | cached MiB (all) | "
               "RSS delta MiB (all) |", "|---" * 15 + "|"]
        out += [_switch_line(sel, res, lvl, copy_ms) for lvl in sorted({r["level"] for r in sel if r["level"] != "-"})]
        parts.append("\n".join(out) + "\n")
    return "\n".join(parts)


def write_tables(csv_path: str, out_path: str, run: str = "latest") -> str:
    """``tables.md`` of the CSV's newest run of each section. Returns ``out_path``."""
    rows = read_rows(csv_path, run)
    commands = read_commands(csv_path)
    parts = ["# python -m bench cpu-e2e: whole models at each ELSA level on this CPU\n",
             "Random weights (MiniLM: real ones when its package is installed); levels from "
             "`ec.magnitude_counters(model, [0.9, 0.75, 0.5])`, served by `ec.load` + `ec.set_level`. "
             "Ratios compare runs in the same interleaved rounds; never compare absolute times across runs.\n"]
    for title, fn in (("Causal LMs", table_lm), ("MiniLM", table_minilm), ("Level switch", table_switch)):
        text = fn(rows, commands)
        if text:
            parts += [f"## {title}\n", text]
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return out_path


def plot(csv_path: str, png_path: str, run: str = "latest") -> str | None:
    """``tokens_per_s.png``: decode tokens/s per level; panels (model, batch), lines (dtype, threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path, run) if r["op"] == "decode"]
    if not rows:
        return None
    panels = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda p: (p[0], int(p[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    labels = ["stock", "1 (90%)", "2 (75%)", "3 (50%)", "dense"]
    for ax, (model, b) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["model"], r["batch"]) == (model, b)]
        for dt, th in sorted({(r["dtype"], r["threads"]) for r in sel}):
            ys = [_f(_find(sel, provider=p, level=lv, dtype=dt, threads=th) or {}, "value") for p, lv in VARIANTS]
            ax.plot(range(len(VARIANTS)), ys, marker="o", label=f"{dt}, {th} thread(s)")
        ax.set_xticks(range(len(VARIANTS)), labels, fontsize=8)
        ax.set_title(f"{model}, batch {b}, {sel[0]['new_tokens']} new tokens", fontsize=9)
        ax.set_xlabel("level")
        ax.set_ylabel("decode tokens/s (all sequences)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def write_report(csv_path: str, out_dir: str, run: str = "latest") -> list:
    """``tables.md`` and (when there are decode rows) ``tokens_per_s.png`` in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [write_tables(csv_path, os.path.join(out_dir, TABLES_NAME), run)]
    png = plot(csv_path, os.path.join(out_dir, PNG_NAME), run)
    return paths + ([png] if png else [])


def main(argv) -> int:
    """``python -m bench cpu-e2e report CSV [-o DIR] [--run R]``."""
    p = argparse.ArgumentParser(prog="python -m bench cpu-e2e report", description="tables.md and tokens_per_s.png of a cpu-e2e CSV")
    p.add_argument("csv")
    p.add_argument("-o", "--out", help="output folder (default: the CSV's folder)")
    p.add_argument("--run", default="latest", help="latest (per section), all, or a run's timestamp")
    a = p.parse_args(argv)
    if not os.path.exists(a.csv):
        print(f"python -m bench cpu-e2e report: no such file: {a.csv}", file=sys.stderr)
        return 2
    for path in write_report(a.csv, a.out or os.path.dirname(os.path.abspath(a.csv)), a.run):
        print(path)
    return 0
