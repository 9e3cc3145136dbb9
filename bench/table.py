"""Markdown tables for the README from a results CSV (``python -m bench table CSV``).

Layer table, one block per ``MxNxK`` shape and dtype: per level (dense, then each level of each
level set), its structure and density, the p50 latency of every provider, and each provider's
speed-up vs dense (``p50(dense) / p50(provider)``: above 1 is faster than the dense weight).
Then the model table (MiniLM latency per level, switch time) and the codec table.
"""
from __future__ import annotations

import sys
from collections import OrderedDict

from .common import csv_command, csv_rows, fmt_us

PROVIDERS = ["dense", "elsa-fused", "elsa-cached", "semi-structured", "bsr"]


def _level_key(r):
    lv = r["level"]
    return (1, 0) if lv == "dense" else (0, int(lv)) if lv.isdigit() else (2, 0)


def _family(structure: str) -> str:
    if structure.startswith("block"):
        return "2-block"
    if ":" in structure:
        return "1-nm"
    return "0-unstructured" if structure == "unstructured" else "9-dense"


def layer_tables(rows, *, shapes=None, ms=None) -> list[str]:
    out = []
    lin = [r for r in rows if r["op"] == "linear"]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in lin:
        groups.setdefault((r["shape"], r["dtype"]), []).append(r)
    for (shape, dtype), rs in groups.items():
        m, n, k = shape.split("x")
        if shapes and f"{n}x{k}" not in shapes:
            continue
        if ms and int(m) not in ms:
            continue
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rs)]
        dense = next((r for r in rs if r["provider"] == "dense"), None)
        d50 = float(dense["p50_us"]) if dense else None
        levels: "OrderedDict[tuple, dict]" = OrderedDict()
        for r in sorted(rs, key=lambda r: (_family(r["structure"]) if r["level"] != "dense" else "", _level_key(r))):
            levels.setdefault((r["structure"], r["level"]), {})[r["provider"]] = r
        out.append(f"**M={m}, weight {n}x{k} (N x K), {dtype}** - p50 latency (speed-up vs dense)")
        out.append("")
        out.append("| level | structure | density | " + " | ".join(provs) + " |")
        out.append("|---|---|---|" + "---|" * len(provs))
        for (structure, level), per in levels.items():
            dens = float(next(iter(per.values()))["density"])
            cells = []
            for p in provs:
                r = per.get(p)
                if r is None:
                    cells.append("-")
                    continue
                p50 = float(r["p50_us"])
                sp = f" ({d50 / p50:.2f}x)" if d50 and p != "dense" else ""
                cells.append(fmt_us(p50) + sp)
            out.append(f"| {level} | {structure} | {dens:.3f} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def model_table(rows) -> list[str]:
    fw = [r for r in rows if r["op"] == "model_forward"]
    if not fw:
        return []
    sw = {(r["shape"], r["dtype"], r["structure"], r["level"]): r for r in rows if r["op"] == "model_switch"}
    out = []
    for shape in OrderedDict.fromkeys(r["shape"] + "|" + r["dtype"] for r in fw):
        sh, dt = shape.split("|")
        rs = [r for r in fw if r["shape"] == sh and r["dtype"] == dt]
        dense = next((r for r in rs if r["provider"] == "dense"), None)
        d50 = float(dense["p50_us"]) if dense else None
        out.append(f"**{sh} (batch x tokens), {dt}** - end-to-end forward, p50 (speed-up vs the dense model); switch = set_level + first forward")
        out.append("")
        out.append("| provider | level | structure | density | forward | switch |")
        out.append("|---|---|---|---|---|---|")
        for r in rs:
            p50 = float(r["p50_us"])
            sp = f" ({d50 / p50:.2f}x)" if d50 and r is not dense else ""
            s = sw.get((sh, dt, r["structure"], r["level"]))
            out.append(f"| {r['provider']} | {r['level']} | {r['structure']} | {float(r['density']):.3f} | {fmt_us(p50)}{sp} | "
                       f"{fmt_us(float(s['p50_us'])) if s else '-'} |")
        out.append("")
    return out


def codec_table(rows) -> list[str]:
    cr = [r for r in rows if r["op"] in ("copy", "encode", "extract", "decode")]
    if not cr:
        return []
    out = ["**codec throughput** - p50, GB/s (bytes read + written), ratio vs clone", "",
           "| shape | dtype | op | provider | p50 | GB/s | x clone |", "|---|---|---|---|---|---|---|"]
    clone = {(r["shape"], r["dtype"]): float(r["p50_us"]) for r in cr if r["op"] == "copy" and r["provider"] == "clone"}
    for r in cr:
        c = clone.get((r["shape"], r["dtype"]))
        p50 = float(r["p50_us"])
        ratio = f"{p50 / c:.2f}" if c else "-"
        out.append(f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['provider']} | {fmt_us(p50)} | {float(r['gbps']):.2f} | {ratio} |" if r["gbps"] else
                   f"| {r['shape']} | {r['dtype']} | {r['op']} | {r['provider']} | {fmt_us(p50)} | - | {ratio} |")
    out.append("")
    return out


def render(rows, *, shapes=None, ms=None, sections=("layer", "model", "codec")) -> str:
    r0 = rows[0]
    lines = [f"device: {r0['device']}; torch {r0['torch']}, triton {r0['triton']}, git {r0['git_sha']}, run {r0['timestamp']}", ""]
    if "layer" in sections:
        lines += layer_tables(rows, shapes=shapes, ms=ms)
    if "model" in sections:
        lines += model_table(rows)
    if "codec" in sections:
        lines += codec_table(rows)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = csv_command("python -m bench table", "Print the README's markdown tables from a results CSV.")
    p.add_argument("--shape", action="append", help="only this weight shape NxK (repeatable), e.g. 4096x4096")
    p.add_argument("--m", type=int, action="append", help="only this M (repeatable)")
    p.add_argument("--sections", default="layer,model,codec", help="comma list of layer, model, codec")
    a = p.parse_args(argv)
    rows = csv_rows(a, "python -m bench table")
    if not rows:
        return 2
    print(render(rows, shapes=a.shape, ms=a.m, sections=[s.strip() for s in a.sections.split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
