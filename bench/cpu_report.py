"""Tables and plot of ``python -m bench cpu`` (a separate step: reads the CSV back).

``python -m bench cpu tables CSV [-o tables.md]`` / ``python -m bench cpu plot CSV [-o PNG]``; ``--run all``
or ``--run <timestamp>`` to choose a run (default: the newest).
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import fmt_us

BIG = "4096x4096"
MINILM_SHAPES = ["384x384", "1536x384", "384x1536"]


def _f(r, k):
    try:
        return float(r[k])
    except (KeyError, ValueError, TypeError):
        return float("nan")


def _mib(b) -> str:
    return f"{float(b) / 2**20:.1f} MiB"


def _linear(rows):
    return [r for r in rows if r["op"] == "linear"]


def _nk(r):
    return r["shape"].split("x", 1)[1]


def _auto(rows):
    return [r for r in rows if r["provider"].startswith("elsa-") and r["provider"] not in ("elsa-decoded",)]


def _find(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _lvl_order(r):
    order = {"unstructured": 0, "1:4": 1, "2:4": 1, "block:16x16": 2, "block:32x32": 3, "block:64x64": 4}
    return (order.get(r["structure"], 9), r["structure"], -_f(r, "ratio_vs_dense") * 0, _f(r, "density"))


_COMMANDS: dict = {}  # timestamp -> command line, from COMMAND.txt beside the CSV


def _header(rows, title, command):
    r0 = rows[0]
    command = _COMMANDS.get(r0["timestamp"], command)
    return (f"### {title}\n\nCommand: `{command}`; machine: {r0['device']}, torch {r0['torch']}, git {r0['git_sha']}, "
            f"run {r0['timestamp']}.\n")


def _best_floor_us(rows, nbytes: float, threads: str) -> float:
    """``nbytes`` at the best read bandwidth measured with at most ``threads`` threads on the
    smallest buffer of at least ``nbytes`` (a floor is a lower bound: on a shared machine the
    2-thread bandwidth can come out below the 1-thread one)."""
    bw = [r for r in rows if r["op"] == "read_bandwidth" and int(r["threads"]) <= int(threads)]
    best = 0.0
    for th in {r["threads"] for r in bw}:
        sizes = sorted((_f(r, "bytes"), _f(r, "value")) for r in bw if r["threads"] == th)
        fit = [g for b, g in sizes if b >= nbytes] or [sizes[-1][1]]
        best = max(best, fit[0])
    return nbytes / (best * 1e9) * 1e6 if best > 0 else float("nan")


def table_m1(rows, command, machine_note="") -> str:
    lin = _linear(rows)
    out = [_header(lin, "CPU latency at M = 1, one 4096x4096 layer (ratios to dense F.linear, same run)", command)]
    if machine_note:
        out.append(machine_note + "\n")
    out.append("p50 of interleaved rounds. Floors: `bytes vs dense` = packed bytes / dense weight bytes, the ratio a "
               "kernel streaming its bytes as fast as dense `F.linear` streams the dense weight would reach (the issue's "
               "framing); `floor (sum bw)` = packed bytes at the best `tensor.sum()` read bandwidth measured with at most "
               "that many threads on a buffer of about that size (and its ratio to dense p50). `tensor.sum` reads slower "
               "than F.linear streams here, so the packed kernels can beat that floor; `best forced` = the fastest forced "
               "format; baselines: torch CSR (`F.linear` with a sparse CSR weight), scipy CSR, torch BSR.\n")
    for dtype in ("float32", "bfloat16"):
        for th in sorted({r["threads"] for r in lin}, key=int):
            sel = [r for r in lin if _nk(r) == BIG and r["dtype"] == dtype and r["threads"] == th and r["m"] == "1"]
            if not sel:
                continue
            dense = _find(sel, provider="dense")
            d50 = _f(dense[0], "p50_us") if dense else float("nan")
            out.append(f"\n**{dtype}, {th} thread(s)**: dense `F.linear` p50 {fmt_us(d50)} in the first group (each ratio uses the dense of its own group)\n")
            dense_b = _f(dense[0], "bytes") if dense else float("nan")
            out.append("| level | structure | density | served as | p50 | ratio vs dense | target | bytes vs dense | floor (sum bw) | met | best forced | torch-csr | scipy-csr | torch-bsr | elsa-decoded |")
            out.append("|---|---|---:|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|")
            autos = sorted(_auto(sel), key=_lvl_order)
            for a in autos:
                key = dict(level=a["level"], structure=a["structure"])
                grp = [r for r in sel if r["level"] == a["level"] and r["structure"] == a["structure"]]
                forced = sorted((r for r in grp if r["provider"].startswith("forced-")), key=lambda r: _f(r, "p50_us"))
                bf = f"{forced[0]['provider'][7:]} {_f(forced[0], 'ratio_vs_dense'):.2f}x" if forced else "-"

                def rat(p):
                    x = _find(grp, provider=p)
                    return f"{_f(x[0], 'ratio_vs_dense'):.2f}x" if x else "-"

                fl = _best_floor_us(rows, _f(a, "bytes"), th)
                out.append(f"| {a['level']} | {a['structure']} | {_f(a, 'density'):.3f} | {a['provider']} ({_mib(a['bytes'])}) | "
                           f"{fmt_us(_f(a, 'p50_us'))} | {_f(a, 'ratio_vs_dense'):.2f}x | {_fmt_t(a)} | {_f(a, 'bytes') / dense_b:.2f}x | "
                           f"{fmt_us(fl)} ({fl / d50:.2f}x) | {a['met']} | {bf} | "
                           f"{rat('torch-csr')} | {rat('scipy-csr')} | {rat('torch-bsr')} | {rat('elsa-decoded')} |")
                del key
    return "\n".join(out) + "\n"


def _fmt_t(a) -> str:
    t = _f(a, "target")
    if a["structure"].startswith("block"):
        return f"<= {t:.2f} (1.3 x d)"
    return f"<= {t:.2f}"


def table_mn(rows, command) -> str:
    lin = _linear(rows)
    ms = sorted({r["m"] for r in lin if r["m"] not in ("", "1") and r["threads"] == "1"}, key=int)
    out = [_header(lin, f"CPU latency at M = {', '.join(ms)} (1 thread): default provider, forced formats, decoded path",
                   command)]
    out.append("Ratios to dense `F.linear` (p50, same group). `served as` is what the module ran at that M "
               "(`elsa-reference` = routed dense: decoded weight + `F.linear`); forced formats are timed at the M of "
               "`--forced-m` only (`-` elsewhere).\n")
    out.append("| weight | dtype | M | level | structure | density | served as | ratio | forced-csr | forced-bitmask | forced-nm "
               "| forced-bsr | elsa-decoded | met (<= 1.0) |")
    out.append("|---|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    shapes = [BIG] + MINILM_SHAPES
    for nk in shapes:
        for dtype in ("float32", "bfloat16"):
            for m in ms:
                sel = [r for r in lin if _nk(r) == nk and r["dtype"] == dtype and r["m"] == m and r["threads"] == "1"]
                for a in sorted(_auto(sel), key=_lvl_order):
                    grp = [r for r in sel if r["level"] == a["level"] and r["structure"] == a["structure"]]

                    def rat(p):
                        x = _find(grp, provider=p)
                        return f"{_f(x[0], 'ratio_vs_dense'):.2f}x" if x else "-"

                    out.append(f"| {nk} | {dtype} | {m} | {a['level']} | {a['structure']} | {_f(a, 'density'):.3f} | {a['provider']} | "
                               f"{_f(a, 'ratio_vs_dense'):.2f}x | {rat('forced-csr')} | {rat('forced-bitmask')} | {rat('forced-nm')} | {rat('forced-bsr')} | "
                               f"{rat('elsa-decoded')} | {a['met']} |")
    return "\n".join(out) + "\n"


def table_minilm_shapes_m1(rows, command) -> str:
    lin = _linear(rows)
    out = [_header(lin, "CPU latency at M = 1, MiniLM layer shapes (ratio vs dense, default provider)", command)]
    out.append("| weight | dtype | threads | dense p50 | " + " | ".join(
        ["unstr. 0.1", "unstr. 0.25", "unstr. 0.5", "1:4", "2:4", "blk16 0.1", "blk16 0.5", "blk32 0.1", "blk32 0.5", "blk64 0.1", "blk64 0.5"]) + " |")
    out.append("|---|---|---:|---:|" + "---|" * 11)
    cols = [("unstructured", "1"), ("unstructured", "2"), ("unstructured", "3"), ("1:4", "1"), ("2:4", "2"),
            ("block:16x16", "1"), ("block:16x16", "2"), ("block:32x32", "1"), ("block:32x32", "2"),
            ("block:64x64", "1"), ("block:64x64", "2")]
    for nk in MINILM_SHAPES:
        for dtype in ("float32", "bfloat16"):
            for th in ("1", "2"):
                sel = [r for r in lin if _nk(r) == nk and r["dtype"] == dtype and r["m"] == "1" and r["threads"] == th]
                if not sel:
                    continue
                dense = _find(sel, provider="dense")
                cells = []
                for s, lv in cols:
                    a = [r for r in _auto(sel) if r["structure"] == s and r["level"] == lv]
                    if not a:
                        cells.append("-")
                        continue
                    a = a[0]
                    cells.append(f"{_f(a, 'ratio_vs_dense'):.2f}x {a['provider'][5:]}{'' if a['met'] == 'yes' else ' (miss)'}")
                out.append(f"| {nk} | {dtype} | {th} | {fmt_us(_f(dense[0], 'p50_us')) if dense else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def table_memory(rows, command) -> str:
    mem = [r for r in rows if r["op"] == "memory"]
    sw = [r for r in rows if r["op"] == "switch"]
    if not mem:
        return ""
    out = [_header(mem, "Resident memory of `ec.load(path, model, level=t)` and the level switch (one layer + bias, fresh process per case)", command)]
    out.append("`resident` = RssAnon growth over the import floor + the model file's resident mapped pages (smaps), after "
               "load and 3 forwards; target: packed level x 1.1 + bias (sparse levels). `peak over floor` = VmHWM (the worker's own high-water mark) - floor VmRSS. "
               "Switch: `ec.set_level` to another level after `release_pages(weight)` vs reading the encoded tensor "
               "from the file after `release_pages` (p50 of repetitions).\n")
    out.append("| layer | dtype | case | format | packed | resident | target | met | file pages resident | peak over floor | tracemalloc peak |")
    out.append("|---|---|---|---|---:|---:|---:|---|---:|---:|---:|")
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["provider"], r["level"]) for r in mem))
    for k in keys:
        g = {r["metric"]: r for r in mem if (r["shape"], r["dtype"], r["provider"], r["level"]) == k}
        res = g.get("resident_beyond_floor")
        case = "plain load (unencoded)" if k[2] == "plain-load" else f"ec.load level={k[3]}"
        out.append(f"| {k[0]} | {k[1]} | {case} | {res['format'] if res else '-'} | {_mib(g['packed_bytes']['value']) if k[3] != 'dense' else '-'} | "
                   f"{_mib(res['value'])} | {_mib(res['target'])} | {res['met'] or '-'} | {_mib(g['after_forward.FileMapRss']['value'])} | "
                   f"{_mib(g['peak_minus_floor_vmrss']['value'])} | {float(g['tracemalloc_peak']['value']) / 1024:.0f} KiB |")
    if sw:
        out.append("\n`loaded at -> to`: the worker loaded level `f`, then switched round-robin through the levels; each "
                   "row is the switch TO level `t` (from the level before it), pages released before each switch.\n")
        out.append("| layer | dtype | threads | loaded at -> to | set_level p50 | read encoded p50 | ratio | target | met |")
        out.append("|---|---|---:|---|---:|---:|---:|---|---|")
        reads = {(r["shape"], r["dtype"], r["threads"], r["level"]): r for r in sw if r["provider"] == "read-encoded"}
        for r in sw:
            if r["provider"] != "ec.set_level":
                continue
            frm = r["note"].split("from level ")[1].split(" ")[0]
            rd = reads.get((r["shape"], r["dtype"], r["threads"], frm))
            out.append(f"| {r['shape']} | {r['dtype']} | {r['threads']} | {frm} -> {r['level']} | {fmt_us(_f(r, 'p50_us'))} | "
                       f"{fmt_us(_f(rd, 'p50_us')) if rd else '-'} | {_f(r, 'ratio_vs_dense'):.2f}x | <= 3x | {r['met']} |")
    return "\n".join(out) + "\n"


def table_minilm(rows, command) -> str:
    fw = [r for r in rows if r["op"] == "minilm_forward" and r["provider"] != "unencoded-same-process"]
    mem = [r for r in rows if r["op"] == "minilm_memory"]
    if not fw:
        return ""
    out = [_header(fw, "all-MiniLM-L6-v2 end to end (float32, fresh process per case)", command)]
    out.append("p50 of single forwards under `inference_mode`; batch 1 = one sentence, batch 8 = eight "
               "sentences padded; the ratio in brackets compares with the unencoded model loaded in the same worker "
               "after its memory was read and timed in interleaved rounds; `calls` = ELSA modules served packed / from the reference path per forward. "
               "Memory: VmRSS after load and forwards, peak (VmHWM of the worker), resident growth over the import floor "
               "(RssAnon + model file pages).\n")
    ths = sorted({r["threads"] for r in fw}, key=int)
    head = "| model | level | density | " + " | ".join(f"batch 1, {t} th | batch 8, {t} th" for t in ths) + \
        " | calls b1 / b8 | VmRSS | peak RSS | resident over floor after batch 1 / after all | packed | decoded (fallback) cache |"
    out.append(head)
    out.append("|---|---|---:|" + "---:|" * (2 * len(ths)) + "---|---:|---:|---:|---:|---:|")
    keys = list(dict.fromkeys((r["provider"], r["structure"], r["level"]) for r in fw))
    un = {}
    for k in keys:
        g = [r for r in fw if (r["provider"], r["structure"], r["level"]) == k]
        cells = []
        for t in ths:
            for bs in ("1", "8"):
                x = [r for r in g if r["threads"] == t and r["shape"].split("/")[1].startswith(bs + "x")]
                if not x:
                    cells.append("-")
                    continue
                x = x[0]
                p50 = _f(x, "p50_us")
                if k[0] == "unencoded":
                    un[(t, bs)] = p50
                if x.get("ratio_vs_dense"):  # against the unencoded model timed in the same worker, interleaved
                    rel = f" ({float(x['ratio_vs_dense']):.2f}x)"
                else:
                    rel = f" ({p50 / un[(t, bs)]:.2f}x)" if (t, bs) in un and k[0] != "unencoded" else ""
                cells.append(f"{fmt_us(p50)}{rel}")
        calls = []
        for bs in ("1", "8"):
            x = [r for r in g if r["shape"].split("/")[1].startswith(bs + "x")]
            calls.append(x[0]["note"].split(" per forward")[0].replace(" packed / ", "/").replace(" reference calls", "") if x else "-")
        mm = {r["metric"]: r for r in mem if (r["provider"], r["structure"], r["level"]) == k}

        def mv(m):
            return _mib(mm[m]["value"]) if m in mm else "-"

        name = "unencoded (from_pretrained)" if k[0] == "unencoded" else f"ELSA {k[1]}" if k[2] != "dense" else "ELSA file, dense level"
        out.append(f"| {name} | {k[2]} | {_f(g[0], 'density'):.3f} | " + " | ".join(cells) + f" | {' ; '.join(calls)} | "
                   f"{mv('after_forward.VmRSS')} | {mv('peak_vmhwm')} | {mv('after_batch1.resident_beyond_floor')} / "
                   f"{mv('resident_beyond_floor')} | {mv('packed_bytes')} | {mv('cached_bytes')} |")
    return "\n".join(out) + "\n"


def write_tables(csv_path: str, out_path: str, *, command: str = "python -m bench cpu", run: str = "latest") -> str:
    from .cpu_sparse import read_rows

    rows = read_rows(csv_path, run)
    _COMMANDS.clear()
    cmd_file = os.path.join(os.path.dirname(os.path.abspath(csv_path)), "COMMAND.txt")
    if os.path.exists(cmd_file):
        for line in open(cmd_file, encoding="utf-8"):
            if "&& " in line and not line.startswith(" "):
                _COMMANDS[line.split()[0]] = line.split("&& ", 1)[1].strip()
    parts = ["# python -m bench cpu: the sparse-cpu backend on this machine\n"]
    bw = [r for r in rows if r["op"] == "read_bandwidth"]
    if bw:
        parts.append("Read bandwidth (tensor.sum, float32): " + "; ".join(
            f"{r['shape']} {r['threads']} th {float(r['value']):.1f} GB/s" for r in bw) + "\n")
    if any(_nk(r) == BIG and r["m"] == "1" for r in _linear(rows)):
        parts.append(table_m1(rows, command))
    if any(r["m"] not in ("", "1") for r in _linear(rows)):
        parts.append(table_mn(rows, command))
    if any(_nk(r) in MINILM_SHAPES and r["m"] == "1" for r in _linear(rows)):
        parts.append(table_minilm_shapes_m1(rows, command))
    parts.append(table_memory(rows, command))
    parts.append(table_minilm(rows, command))
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(p for p in parts if p))
    return out_path


def plot(csv_path: str, png_path: str, *, run: str = "latest") -> str | None:
    """Latency ratio vs density per provider at M = 1: one panel per (weight, dtype, threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cpu_sparse import read_rows

    rows = [r for r in _linear(read_rows(csv_path, run)) if r["m"] == "1" and r["provider"] != "dense"]
    if not rows:
        return None
    panels = sorted({(_nk(r), r["dtype"], r["threads"]) for r in rows},
                    key=lambda p: (p[0] != BIG, p[0], p[1] != "float32", int(p[2])))
    cols = 4
    nrow = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4.2 * cols, 3.4 * nrow), squeeze=False)
    provs = sorted({r["provider"] for r in rows})
    markers = dict(zip(provs, "os^vD<>px*hH+"))
    for ax, (nk, dt, th) in zip(axes.flat, panels):
        sel = [r for r in rows if (_nk(r), r["dtype"], r["threads"]) == (nk, dt, th)]
        for p in provs:
            pts = sorted((_f(r, "density"), _f(r, "ratio_vs_dense")) for r in sel if r["provider"] == p)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], markers[p], label=p, alpha=0.8, ms=5)
        ax.axhline(1.0, color="k", lw=0.8)
        xs = [0.05, 0.55]
        ax.plot(xs, [1.3 * x for x in xs], "k:", lw=0.8, label="1.3 x density")
        ax.set_yscale("log")
        ax.set_title(f"{nk} {dt} {th} thread(s), M=1", fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("p50 / dense p50")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=min(7, len(lab)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv) -> int:
    what = argv[0]
    p = argparse.ArgumentParser(prog=f"python -m bench cpu {what}")
    p.add_argument("csv")
    p.add_argument("-o", "--output")
    p.add_argument("--run", default="latest")
    p.add_argument("--command", default="python -m bench cpu")
    a = p.parse_args(argv[1:])
    if not os.path.exists(a.csv):
        print(f"python -m bench cpu {what}: no such file: {a.csv}", file=sys.stderr)
        return 2
    d = os.path.dirname(os.path.abspath(a.csv))
    if what == "plot":
        print(plot(a.csv, a.output or os.path.join(d, "latency_vs_density.png"), run=a.run))
    else:
        print(write_tables(a.csv, a.output or os.path.join(d, "tables.md"), command=a.command, run=a.run))
    return 0
