"""Roofline floor of the GPU benchmark grid: ``python -m bench roofline``.

For every configuration of the GPU grid (docs/DESIGN.md, "Performance targets": float16 / bfloat16;
M in {1, 16, 128, 4096}; Llama-7B-class weights `[N, K]` from {4096, 11008, 14336}; every level of
the layer benchmark's level sets, bench/weights.py: unstructured 0.9 / 0.75 / 0.5 sparsity, 1:4 /
2:4, block:64x64 0.9 / 0.75 / 0.5) it counts what the fused kernel
(:func:`elsa_codec.kernels.triton.elsa_linear`) must move and compute, and what ``F.linear`` on the dense
weight (cuBLAS) must, and gives the floor time ``max(bytes / bandwidth, flops / peak)`` on an H100
(3.0 TB/s copy, 800 TFLOP/s dense bf16/fp16) and an H200 (4.3 TB/s, 790 TFLOP/s).

Bytes: compulsory traffic, each byte once (a real kernel re-reads x and weight tiles across
programs; L2 absorbs part of that):

- weight: the 64x64 tiles the kernel loads. The layer benchmark passes the tile table only when a
  level has empty tiles (``tile_density < 1``): block levels. Without it every tile is loaded and
  multiplied (the encoded weight is read in full at every level).
- x: ``M*K``; with a table only the K-tiles that hold a non-empty weight tile in some row of tiles.
- y: ``M*N``; table: one byte per 64x64 tile when passed.

FLOPs: ``2*M*N*K`` times the fraction of tiles multiplied.

Tile counts are analytic (checked against the benchmark's synthetic weights in
tests/bench/test_roofline.py): a block:64x64 level keeps exactly ``round(density * tiles)`` whole tiles
(bench/weights.py) chosen by a random ranking, so the kept-tile count is exact and the x columns
touched are an expectation (hypergeometric: a K-tile column of ``R`` tiles is empty with
probability ``C(T - R, kept) / C(T, kept)``). An unstructured level of density ``d`` leaves a tile
empty with probability about ``(1 - d) ** 4096`` (< 1e-180 here) and an N:M level never does: no
table, everything loaded.

Packed levels (issue 33; ``packed.csv`` and the second half of ``roofline.md``): for M <= 32
(:data:`PACKED_M`, the packed GEMM's range ``PACKED_MAX_M``) and every sparse level, plus the
issue's 70% unstructured target level (:data:`PACKED_EXTRA_SETS`), the compulsory bytes of
:func:`elsa_codec.kernels.triton.packed_linear`: weight = ``packed_nbytes(n, k, density, e,
tile_n=default_tile_rows(dtype))`` (kept values, one bitmap bit per weight, one int32 base per
tile), x = ``M*K``, y = ``M*N``; FLOPs ``2*M*N*K`` (every tile is expanded and multiplied), the
floor, its ratio to the dense (cuBLAS) and the fused floor, and the path
``cuda_route`` picks. The packed columns need triton importable (the kernel package's constants).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys

from .common import fmt_us

#: Floors are computed for these GPUs: (copy bandwidth in bytes/s, dense bf16/fp16 FLOP/s).
GPUS = {
    "H100": (3.0e12, 800e12),
    "H200": (4.3e12, 790e12),
}
GRID_DTYPES = ("bfloat16", "float16")
GRID_M = (1, 16, 128, 4096)
#: M of the packed-level rows: decode sizes up to the packed GEMM's ``PACKED_MAX_M`` (32).
PACKED_M = (1, 4, 16, 32)
#: Level sets of the packed rows beside the grid's own: issue 33's 70% target (the grid has 75%).
PACKED_EXTRA_SETS = [("unstructured-0.7", [0.7], "unstructured")]
#: Weight shapes `[N, K]` = (out_features, in_features): bench/layer.py's llama + llama3 families.
GRID_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336))
TILE = 64
_ELT = {"bfloat16": 2, "float16": 2, "float32": 4}

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "roofline")
COLUMNS = [
    "dtype", "m", "n", "k", "shape", "level_set", "level", "structure", "density", "tile_fraction", "table",
    "weight_bytes", "x_bytes", "y_bytes", "table_bytes", "bytes", "flops",
    "h100_floor_us", "h100_bound", "h100_dense_floor_us", "h100_floor_vs_dense",
    "h200_floor_us", "h200_bound", "h200_dense_floor_us", "h200_floor_vs_dense",
]
PACKED_COLUMNS = [
    "dtype", "m", "n", "k", "shape", "level_set", "level", "structure", "density", "tile_n", "route",
    "packed_weight_bytes", "fused_weight_bytes", "x_bytes", "y_bytes", "bytes", "flops",
    "h100_packed_floor_us", "h100_packed_bound", "h100_dense_floor_us", "h100_fused_floor_us",
    "h100_packed_vs_dense", "h100_packed_vs_fused",
    "h200_packed_floor_us", "h200_packed_bound", "h200_dense_floor_us", "h200_fused_floor_us",
    "h200_packed_vs_dense", "h200_packed_vs_fused",
]


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of a level set on a weight `[N, K]`: what the fused kernel loads of it."""

    level_set: str
    level: str  # "1".."T", or "dense"
    structure: str
    density: float  # fraction of weights kept
    tile_fraction: float  # fraction of 64x64 weight tiles loaded and multiplied
    x_fraction: float  # fraction of x's K columns loaded
    table: bool  # the benchmark passes the tile table


def level_sets():
    """The layer benchmark's level sets: ``(name, levels sparsest first, structure)``."""
    from .weights import LEVEL_SETS

    return LEVEL_SETS


def _log_comb(n: int, r: int) -> float:
    if r < 0 or r > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def block_levels(n: int, k: int, densities, set_name: str, structure: str) -> list[Level]:
    """Block levels (tile-aligned 64x64 blocks, bench/weights.py's exact tile counts): the kernel
    loads exactly the kept tiles; x columns: the expected fraction of K-tile columns with a kept
    tile (hypergeometric)."""
    tr, tc = -(-n // TILE), -(-k // TILE)
    tiles = tr * tc
    out = []
    for t, d in enumerate(densities, start=1):
        kept = round(d * tiles)
        p_col_empty = math.exp(_log_comb(tiles - tr, kept) - _log_comb(tiles, kept)) if kept <= tiles - tr else 0.0
        table = kept < tiles
        out.append(Level(set_name, str(t), structure, kept / tiles, kept / tiles,
                         1.0 - p_col_empty if table else 1.0, table))
    return out


def set_levels(n: int, k: int, set_name: str, levels, structure: str) -> list[Level]:
    """The levels of one level set (``(name, levels sparsest first, structure)``) on `[N, K]`."""
    from elsa_codec.format.structure import parse_level

    specs = [parse_level(lv, structure) for lv in levels]
    dens = [1.0 - s for s, _ in specs]
    st = specs[0][1]
    if st.kind == "block":
        if (st.r, st.c) != (TILE, TILE):
            raise ValueError(f"level set {set_name}: only block:64x64 levels match the 64x64 tile table")
        return block_levels(n, k, dens, set_name, str(st))
    if st.kind == "nm":
        return [Level(set_name, str(t), str(s), s.nm_density, 1.0, 1.0, False) for t, (_, s) in enumerate(specs, start=1)]
    # A 64x64 tile of an unstructured level is empty with probability ~ (1-d)^4096: never here.
    return [Level(set_name, str(t), str(s), round(d * n * k) / (n * k), 1.0, 1.0, False)
            for t, (d, (_, s)) in enumerate(zip(dens, specs), start=1)]


def grid_levels(n: int, k: int) -> list[Level]:
    """The dense baseline and every level of every level set on a weight `[N, K]`."""
    out = [Level("dense", "dense", "dense", 1.0, 1.0, 1.0, False)]
    for set_name, levels, structure in level_sets():
        out += set_levels(n, k, set_name, levels, structure)
    return out


def packed_level_sets():
    """The level sets of the packed rows: the grid's and :data:`PACKED_EXTRA_SETS`."""
    return list(level_sets()) + PACKED_EXTRA_SETS


def packed_levels(n: int, k: int) -> list[Level]:
    """Every sparse level of :func:`packed_level_sets` on `[N, K]` (no dense baseline)."""
    out = []
    for set_name, levels, structure in packed_level_sets():
        out += set_levels(n, k, set_name, levels, structure)
    return out


def floor_us(nbytes: float, flops: float, gpu: str) -> tuple[float, str]:
    """``(max(bytes / bandwidth, flops / peak) in microseconds, "memory" | "compute")``."""
    bw, peak = GPUS[gpu]
    t_mem, t_cmp = nbytes / bw, flops / peak
    return max(t_mem, t_cmp) * 1e6, "memory" if t_mem >= t_cmp else "compute"


def dense_cost(m: int, n: int, k: int, dtype: str) -> tuple[int, float]:
    """``(bytes, flops)`` of ``F.linear(x [M, K], W [N, K])``: x, W and y once; ``2*M*N*K``."""
    e = _ELT[dtype]
    return (m * k + n * k + m * n) * e, 2.0 * m * n * k


def fused_cost(m: int, n: int, k: int, dtype: str, lv: Level) -> dict:
    """Bytes (weight tiles loaded, x columns loaded, y, table) and flops of the fused kernel."""
    e = _ELT[dtype]
    if lv.level == "dense":
        nbytes, flops = dense_cost(m, n, k, dtype)
        return {"weight_bytes": n * k * e, "x_bytes": m * k * e, "y_bytes": m * n * e, "table_bytes": 0,
                "bytes": nbytes, "flops": flops}
    tiles = -(-n // TILE) * -(-k // TILE)
    wb = round(lv.tile_fraction * n * k) * e
    xb = round(lv.x_fraction * m * k) * e
    yb = m * n * e
    tb = tiles if lv.table else 0
    return {"weight_bytes": wb, "x_bytes": xb, "y_bytes": yb, "table_bytes": tb, "bytes": wb + xb + yb + tb,
            "flops": 2.0 * m * n * k * lv.tile_fraction}


def row(m: int, n: int, k: int, dtype: str, lv: Level) -> dict:
    """One CSV row (:data:`COLUMNS`): the fused kernel's (or, for ``dense``, cuBLAS's) floor."""
    c = fused_cost(m, n, k, dtype, lv)
    db, df = dense_cost(m, n, k, dtype)
    r = {"dtype": dtype, "m": m, "n": n, "k": k, "shape": f"{m}x{n}x{k}", "level_set": lv.level_set,
         "level": lv.level, "structure": lv.structure, "density": f"{lv.density:.6f}",
         "tile_fraction": f"{lv.tile_fraction:.6f}", "table": "yes" if lv.table else "no", **c}
    for gpu in GPUS:
        f, bound = floor_us(c["bytes"], c["flops"], gpu)
        fd, _ = floor_us(db, df, gpu)
        g = gpu.lower()
        r[f"{g}_floor_us"] = f"{f:.3f}"
        r[f"{g}_bound"] = bound
        r[f"{g}_dense_floor_us"] = f"{fd:.3f}"
        r[f"{g}_floor_vs_dense"] = f"{f / fd:.4f}"
    r["flops"] = f"{c['flops']:.0f}"
    return r


def packed_cost(m: int, n: int, k: int, dtype: str, lv: Level) -> dict:
    """Compulsory bytes and FLOPs of ``packed_linear`` on level ``lv``: the packed level
    (``packed_nbytes`` at the GEMM's tile height), x and y once; ``2*M*N*K`` (no tile skipped)."""
    import torch

    from elsa_codec.kernels.triton import default_tile_rows, packed_nbytes

    e = _ELT[dtype]
    tile_n = default_tile_rows(getattr(torch, dtype))
    wb = packed_nbytes(n, k, lv.density, e, tile_n)
    xb, yb = m * k * e, m * n * e
    return {"tile_n": tile_n, "packed_weight_bytes": round(wb), "x_bytes": xb, "y_bytes": yb,
            "bytes": round(wb) + xb + yb, "flops": 2.0 * m * n * k}


def packed_row(m: int, n: int, k: int, dtype: str, lv: Level) -> dict:
    """One ``packed.csv`` row (:data:`PACKED_COLUMNS`): the packed path's floor beside the dense
    (cuBLAS) and the fused floor of the same level, and the path ``cuda_route`` picks."""
    import torch

    from elsa_codec.kernels.triton.route import cuda_route

    c = packed_cost(m, n, k, dtype, lv)
    fused = fused_cost(m, n, k, dtype, lv)
    db, df = dense_cost(m, n, k, dtype)
    route = cuda_route(n, k, m, lv.density, getattr(torch, dtype), fused_fraction=lv.tile_fraction)
    r = {"dtype": dtype, "m": m, "n": n, "k": k, "shape": f"{m}x{n}x{k}", "level_set": lv.level_set,
         "level": lv.level, "structure": lv.structure, "density": f"{lv.density:.6f}", "tile_n": c["tile_n"],
         "route": route, "packed_weight_bytes": c["packed_weight_bytes"], "fused_weight_bytes": fused["weight_bytes"],
         "x_bytes": c["x_bytes"], "y_bytes": c["y_bytes"], "bytes": c["bytes"], "flops": f"{c['flops']:.0f}"}
    for gpu in GPUS:
        f, bound = floor_us(c["bytes"], c["flops"], gpu)
        fd, _ = floor_us(db, df, gpu)
        ff, _ = floor_us(fused["bytes"], fused["flops"], gpu)
        g = gpu.lower()
        r[f"{g}_packed_floor_us"] = f"{f:.3f}"
        r[f"{g}_packed_bound"] = bound
        r[f"{g}_dense_floor_us"] = f"{fd:.3f}"
        r[f"{g}_fused_floor_us"] = f"{ff:.3f}"
        r[f"{g}_packed_vs_dense"] = f"{f / fd:.4f}"
        r[f"{g}_packed_vs_fused"] = f"{f / ff:.4f}"
    return r


def _rows(make, levels_of, dtypes, ms, shapes) -> list[dict]:
    """``make(m, n, k, dtype, level)`` for every dtype, shape, M and level of ``levels_of(n, k)``, in that order."""
    out = []
    for dt in dtypes:
        for n, k in shapes:
            levels = levels_of(n, k)
            for m in ms:
                out += [make(m, n, k, dt, lv) for lv in levels]
    return out


def packed_rows(dtypes=GRID_DTYPES, ms=PACKED_M, shapes=GRID_SHAPES) -> list[dict]:
    """Every packed row, in the order dtype, shape, M, level (M above ``PACKED_MAX_M`` left out)."""
    from elsa_codec.kernels.triton import PACKED_MAX_M

    return _rows(packed_row, packed_levels, dtypes, [m for m in ms if m <= PACKED_MAX_M], shapes)


def grid_rows(dtypes=GRID_DTYPES, ms=GRID_M, shapes=GRID_SHAPES) -> list[dict]:
    """Every row of the grid, in the order dtype, shape, M, level."""
    return _rows(row, grid_levels, dtypes, ms, shapes)


def lookup(rows: list[dict]) -> dict:
    """``{(dtype, m, n, k, level_set, level): row}`` for joining measured rows to their floor
    (rows of :func:`grid_rows` or of :func:`packed_rows`)."""
    return {(r["dtype"], int(r["m"]), int(r["n"]), int(r["k"]), r["level_set"], str(r["level"])): r for r in rows}


def write_csv(rows: list[dict], path: str, columns=None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns or COLUMNS)
        w.writeheader()
        w.writerows(rows)


def _by_level(rows: list[dict], dtype: str) -> dict:
    """``{(n, k, level_set, level): {m: row}}`` of the rows of ``dtype``, in row order."""
    by = {}
    for r in rows:
        if r["dtype"] == dtype:
            by.setdefault((int(r["n"]), int(r["k"]), r["level_set"], r["level"]), {})[int(r["m"])] = r
    return by


def _floor_cells(per_m: dict, ms: list, floor: str, ratio: str, bound: str) -> list:
    """One table cell per M: ``floor (ratio x)``, `` c`` when compute-bound, ``-`` when absent."""
    cells = []
    for m in ms:
        r = per_m.get(m)
        if r is None:
            cells.append("-")
            continue
        cells.append(f"{fmt_us(float(r[floor]))} ({float(r[ratio]):.2f}x)" + ("" if r[bound] == "memory" else " c"))
    return cells


def render_markdown(rows: list[dict], dtype: str = "bfloat16") -> str:
    """``roofline.md``: per GPU, one table (weight shape x level) with the floor per M and its
    ratio to the dense cuBLAS floor of the same shape."""
    lines = [
        "# Roofline floor of the GPU benchmark grid",
        "",
        "`python -m bench roofline` (bench/roofline.py): the least time the fused level GEMM "
        "(`elsa_linear`) can take, `max(bytes / bandwidth, flops / peak)`, against the same floor for "
        "cuBLAS `F.linear` on the dense weight. Computed, not measured. Peaks: "
        + ", ".join(f"{g} {bw / 1e12:.1f} TB/s and {pk / 1e12:.0f} TFLOP/s" for g, (bw, pk) in GPUS.items())
        + ". Bytes: weight tiles loaded (every tile without a tile table; only the kept 64x64 tiles of "
          "block levels, where the benchmark passes the table), x, y, table; each once. "
          "float16 has the same floors as bfloat16 (same bytes, same peak); all rows are in roofline.csv.",
        "",
        "Cells: floor (floor / dense floor). `dense` is cuBLAS on the dense weight.",
    ]
    for gpu in GPUS:
        g = gpu.lower()
        ms = sorted({int(r["m"]) for r in rows})
        lines += ["", f"## {gpu}, {dtype}", "",
                  "| weight N x K | level | structure | density | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|---|---|" + "---|" * len(ms)]
        for (n, k, _, level), per_m in _by_level(rows, dtype).items():
            any_r = next(iter(per_m.values()))
            cells = _floor_cells(per_m, ms, f"{g}_floor_us", f"{g}_floor_vs_dense", f"{g}_bound")
            lines.append(f"| {n}x{k} | {level} | {any_r['structure']} | {float(any_r['density']):.3f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        lines.append("`c`: compute-bound floor (else memory-bound).")
    return "\n".join(lines) + "\n"


def render_packed_markdown(rows: list[dict], dtype: str = "bfloat16") -> str:
    """The packed section of ``roofline.md``: per GPU, the packed floor per M and its ratio to the
    dense floor, and the path ``cuda_route`` picks."""
    if not rows:
        return ""
    ms = sorted({int(r["m"]) for r in rows})
    lines = [
        "",
        "# Packed levels (issue 33): floor of `packed_linear`, M <= 32",
        "",
        "Rows of packed.csv: the packed GEMM (`elsa_codec.kernels.triton.packed_linear`) reads the packed "
        "level (`packed_nbytes` at `tile_n = default_tile_rows(dtype)`: kept values, one bitmap bit per "
        "weight, one int32 base per tile), x and y once; FLOPs 2*M*N*K (every tile is expanded and multiplied). "
        "Computed, not measured: the expansion's integer work is not in the floor (bench/GPU_NOTES.md, "
        "\"Packed levels (issue 33): predictions\"). `unstructured-0.7` is issue 33's 70% target level.",
        "",
        "Cells: packed floor (packed floor / dense floor). `route`: what `cuda_route` picks at that M (its time model adds the expansion's instructions, `route_times`: fused everywhere with the H200 constants) "
        "(the same for every M <= 32 here).",
    ]
    for gpu in GPUS:
        g = gpu.lower()
        lines += ["", f"## Packed, {gpu}, {dtype}", "",
                  "| weight N x K | level set | level | structure | density | route | "
                  + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(ms)]
        for (n, k, set_name, level), per_m in _by_level(rows, dtype).items():
            any_r = next(iter(per_m.values()))
            cells = _floor_cells(per_m, ms, f"{g}_packed_floor_us", f"{g}_packed_vs_dense", f"{g}_packed_bound")
            routes = "/".join(sorted({r["route"] for r in per_m.values()}))
            lines.append(f"| {n}x{k} | {set_name} | {level} | {any_r['structure']} | {float(any_r['density']):.3f} | "
                         f"{routes} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("`c`: compute-bound floor (else memory-bound).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench roofline [--out DIR] [--m 1,16] [--dtypes bfloat16]``."""
    p = argparse.ArgumentParser(prog="python -m bench roofline",
                                description="Bytes, FLOPs and the floor time of the GPU grid on H100 / H200 "
                                            "(fused ELSA kernel and dense cuBLAS; the packed path at M <= 32); "
                                            "writes roofline.csv, packed.csv and roofline.md.")
    p.add_argument("--out", default=RESULTS_DIR, help="results folder (default bench/results/roofline/)")
    p.add_argument("--m", help="comma list of M (default 1,16,128,4096; packed rows: those <= 32, default 1,4,16,32)")
    p.add_argument("--dtypes", default=",".join(GRID_DTYPES), help="comma list of bfloat16, float16")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    ms = tuple(int(x) for x in a.m.split(",")) if a.m else GRID_M
    dtypes = tuple(d.strip() for d in a.dtypes.split(",") if d.strip())
    for d in dtypes:
        if d not in _ELT:
            print(f"python -m bench roofline: unknown dtype {d!r}; expected bfloat16, float16, float32", file=sys.stderr)
            return 2
    rows = grid_rows(dtypes, ms)
    packed = packed_rows(dtypes, ms if a.m else PACKED_M)
    os.makedirs(a.out, exist_ok=True)
    write_csv(rows, os.path.join(a.out, "roofline.csv"))
    write_csv(packed, os.path.join(a.out, "packed.csv"), PACKED_COLUMNS)
    with open(os.path.join(a.out, "roofline.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(rows, dtypes[0]) + render_packed_markdown(packed, dtypes[0]))
    print(f"python -m bench roofline: {len(rows)} rows, {len(packed)} packed rows; "
          f"wrote {a.out}/roofline.csv, packed.csv and roofline.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
