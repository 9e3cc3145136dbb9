"""The GPU benchmark grid with its roofline floor: ``python -m bench.gpu_grid``.

Step 3 of ``bench/gpu_check.sh``. For every configuration of bench/roofline.py's grid (bfloat16
then float16; Llama-7B-class weights; M in {1, 16, 128, 4096}; every level of the unstructured,
2:4 and block:64x64 level sets), it times on the GPU:

- ``dense``: ``F.linear`` on the dense weight (cuBLAS), the baseline;
- ``elsa-fused``: :func:`elsa_codec.kernels.triton.elsa_linear` (autotuned Triton kernel; the tile table
  is passed when the level has empty tiles, as bench/layer.py does), with the config the
  autotuner chose for that shape;
- ``semi-structured``: the decoded 2:4 / 1:4 level through ``to_sparse_semi_structured`` where the
  GPU supports it (no floor computed for it);
- ``elsa-packed`` (issue 33), in its own stage (``stage = packed``) that runs first, with its own
  budget (``--packed-budget-s``): :func:`elsa_codec.kernels.triton.packed_linear` on the level packed
  once by ``pack_level`` (``tile_n = default_tile_rows``), beside ``dense`` and ``elsa-fused`` of the
  same (shape, M) group, on :data:`PACKED_SHAPES` (the issue's two shapes), M in
  :data:`PACKED_GRID_M`, bfloat16 then float16, every sparse level of the grid plus the 70% target
  level (bench/roofline.py's ``packed_level_sets``); its floor is the packed floor
  (``packed.csv``), ``latency_vs_dense`` / ``latency_vs_fused`` its p50 over the dense / fused p50
  of the same group, and ``autotune_config`` says what ``cuda_route`` would pick;

and, first of all, ``launch-floor`` (bench/launch_floor.py: an empty kernel, one program per SM,
with CUDA graphs and without: the least time the timer reports for any kernel). It writes one CSV
row per measurement with the floor of bench/roofline.py for this GPU (H100 or H200 by name) and
``measured / floor``. Every output is checked against ``F.linear`` in float32
before timing (``max_rel_err``). Timing: ``triton.testing.do_bench`` / ``do_bench_cudagraph``
through bench/common.py's GpuTimer (short runs), each provider cycling through copies of its
weight (working set >= 2x L2) so that each call reads its weight from HBM.

Weights are ``randn`` with nested random masks of exact density (bench/weights.py's method, made
on the GPU with its own generator), encoded with ``encode_tensor``.

``--dry-run`` (no GPU needed): the same code path on the interpreter-sized grid (one small
weight, M in {1, 16}; the packed stage on the same weight, M = 1) with no timing at all: each provider runs once (the Triton interpreter when
``TRITON_INTERPRET=1``, else the PyTorch reference), is checked, and its row carries the floor and
empty timings. Never a CPU time presented as a GPU figure.

The run stops starting new (dtype, shape) groups once ``--budget-s`` seconds have passed (counted
from the start: the packed stage's time included), and the packed stage starts no new group after
``--packed-budget-s``, so that a slow machine still leaves a CSV; rows are appended and flushed as
they are measured.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import roofline
from .weights import nested_counters

COLUMNS = [
    "dtype", "m", "n", "k", "shape", "level_set", "level", "structure", "density", "provider", "stage", "table",
    "autotune_config", "p20_us", "p50_us", "p80_us", "timing", "floor_gpu", "floor_us", "floor_vs_dense",
    "measured_vs_floor", "dense_p50_us", "speedup_vs_dense", "fused_p50_us", "latency_vs_dense", "latency_vs_fused",
    "max_rel_err", "device", "torch", "triton", "timestamp",
]
DRY_SHAPES = ((128, 256),)
DRY_M = (1, 16)
#: The packed stage (issue 33's targets: bf16 and fp16, these two shapes, M = 1..16).
PACKED_SHAPES = ((4096, 4096), (11008, 4096))
PACKED_GRID_M = (1, 4, 16)
#: M of the dry run's packed stage: one (M = 1 and 16 run the same BLOCK_M = 16 kernel), to keep CI's dry run short.
DRY_PACKED_M = (1,)


def floor_gpu(device_name: str) -> str | None:
    """The roofline GPU whose peaks apply to ``device_name`` (``"H100"`` / ``"H200"``), else None."""
    up = device_name.upper()
    for g in ("H200", "H100"):
        if g in up:
            return g
    return None


class Grid:
    """Runs the grid and writes ``grid.csv`` (appending, flushed per row) and ``grid.log``."""

    def __init__(self, out: str, *, dry_run: bool, budget_s: float, rep_ms: int, log_path: str | None = None):
        from .common import Env, Log

        self.dry = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.env = Env.detect(self.device, torch.get_num_threads())
        self.gpu = None if dry_run else floor_gpu(self.env.device_name)
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        os.makedirs(out, exist_ok=True)
        self.csv_path = os.path.join(out, "grid.csv")
        self.log = Log(log_path or os.path.join(out, "grid.log"))
        new = not os.path.exists(self.csv_path) or os.path.getsize(self.csv_path) == 0
        self._f = open(self.csv_path, "a", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._f, fieldnames=COLUMNS)
        if new:
            self._w.writeheader()
        self.rows = 0
        self.kernels = None
        self.timer = None
        self.graphs = False
        self.stage = "grid"  # the stage the rows belong to: "grid" or "packed" (set per group)
        if not dry_run:
            from .common import GpuTimer

            self.timer = GpuTimer(rep_ms=rep_ms, warmup_ms=max(2, rep_ms // 5), graphs="auto")
        try:
            import elsa_codec.kernels.triton as kernels

            self.kernels = kernels
        except ImportError as e:  # no triton: dry run on the references
            if not dry_run:
                raise
            self.log(f"elsa_codec.kernels.triton not importable ({e}): the dry run uses the PyTorch references")

    # -------------------------------------------------------------------------------------- helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self._f.close()
        self.log.close()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _copies(self, nbytes: int) -> int:
        """Weight copies each provider cycles through (working set >= 2x L2, at most 64); 1 off CUDA."""
        if self.device.type != "cuda":
            return 1
        props = torch.cuda.get_device_properties(self.device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        return max(1, min(64, -(-2 * l2 // max(nbytes, 1))))

    def autotune_choice(self) -> str:
        """The config the autotuner last used for ``elsa_linear`` (``""`` when none)."""
        if self.kernels is None or self.dry:
            return ""
        tuned = getattr(self.kernels.linear, "_elsa_linear_kernel_tuned", None)
        cfg = getattr(tuned, "best_config", None)
        if cfg is None:
            return ""
        kw = cfg.kwargs
        return (f"BM{kw.get('BLOCK_M')}-BN{kw.get('BLOCK_N')}-BK{kw.get('BLOCK_K')}-G{kw.get('GROUP_M')}"
                f"-w{cfg.num_warps}-s{cfg.num_stages}")

    # -------------------------------------------------------------------------------------- the grid
    def run(self, dtypes, shapes, ms, *, packed_shapes=(), packed_ms=(), packed_budget_s: float = 0.0) -> int:
        """The packed stage (``packed_shapes`` x ``packed_ms``, no new group after
        ``packed_budget_s``), then every (dtype, shape) group of the grid in order until the budget
        is spent; returns rows written."""
        self.log(f"grid: device {self.env.device_name}; torch {self.env.torch}, triton {self.env.triton}; "
                 f"floor GPU {self.gpu or 'none (not an H100/H200: no floor ratio)'}; "
                 f"{'DRY RUN: no timing' if self.dry else f'budget {self.budget_s:.0f} s'}")
        self.launch_floor()
        g = torch.Generator(device=self.device).manual_seed(0)
        if packed_shapes and packed_ms:
            self.packed_stage(dtypes, packed_shapes, packed_ms, g, packed_budget_s)
        for dt in dtypes:
            for n, k in shapes:
                if self.elapsed() > self.budget_s:
                    self.log(f"budget of {self.budget_s:.0f} s spent after {self.elapsed():.0f} s: "
                             f"skipping {dt} {n}x{k} and the rest")
                    return self.rows
                t = time.perf_counter()
                self._group(getattr(torch, dt), n, k, ms, g)
                self.log(f"-- {dt} {n}x{k}: {time.perf_counter() - t:.1f} s (total {self.elapsed():.0f} s)")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return self.rows

    def packed_stage(self, dtypes, shapes, ms, g, budget_s: float) -> None:
        """Stage ``packed``: dense, fused and packed for every sparse level of
        ``roofline.packed_level_sets()`` at each M; no new (dtype, shape) group after ``budget_s``."""
        if self.kernels is None:
            self.log("packed stage skipped: elsa_codec.kernels.triton not importable (no packed_linear)")
            return
        t0 = time.perf_counter()
        for dt in dtypes:
            for n, k in shapes:
                spent = time.perf_counter() - t0
                if spent > budget_s:
                    self.log(f"packed stage: budget of {budget_s:.0f} s spent after {spent:.0f} s: "
                             f"skipping {dt} {n}x{k} and the rest")
                    return
                t = time.perf_counter()
                self._group(getattr(torch, dt), n, k, ms, g, packed=True)
                self.log(f"-- packed stage {dt} {n}x{k}: {time.perf_counter() - t:.1f} s (total {self.elapsed():.0f} s)")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def launch_floor(self) -> None:
        """Rows ``launch-floor``: bench/launch_floor.py's empty kernel, one program per SM, timed
        with CUDA graphs and without (the shortest time either method reports for one kernel)."""
        if self.kernels is None:  # no triton: nothing to launch
            return
        from .launch_floor import one_store

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 4
        out = torch.full((sms,), -1, dtype=torch.int32, device=self.device)
        one_store(out)  # checked once, like every provider: each program wrote its 0
        err = "0" if bool((out == 0).all()) else "error: wrong output"
        for graphs in (True, False):
            st = self._measure(one_store, [out], graphs=graphs)
            r = self._row(st, dtype="int32", m=1, n=sms, k=0, shape=f"{sms} programs", level_set="-", level="-",
                          structure="-", provider="launch-floor", stage="grid", table="no", max_rel_err=err)
            self._write(r)
            self.log(f"  launch floor, {sms} programs, {'CUDA graphs' if graphs else 'plain launches'}: "
                     f"p50 {r['p50_us'] or '-'} us ({r['timing']})")
            if self.dry:  # one untimed launch shows the path works
                break

    def _levels(self, w, n, k, g, sets=None):
        """``[(level_set, Level, encoded, t, code_bits, tile_table or None, decoded)]`` of the level
        sets ``sets`` (default: the grid's, ``roofline.level_sets()``)."""
        import elsa_codec as ec

        out = []
        for set_name, levels, structure in sets or roofline.level_sets():
            floors = {lv.level: lv for lv in roofline.set_levels(n, k, set_name, levels, structure)}
            c, structs = nested_counters((n, k), levels, structure, generator=g, device=self.device)
            T = len(structs)
            kb = ec.default_code_bits(T)
            enc = ec.encode_tensor(w, c - 1, kb, name=f"grid.{n}x{k}")
            del c
            table = self.kernels.tile_table(enc, kb) if self.kernels is not None else None
            for t in range(1, T + 1):
                use_table = table is not None and self.kernels.tile_density(table, t) < 1.0
                dec = ec.extract_level(enc, t, kb, T)
                out.append((set_name, floors[str(t)], enc, t, kb, table if use_table else None, dec))
        return out

    def _group(self, dtype, n, k, ms, g, *, packed: bool = False) -> None:
        """One (dtype, shape) group: per M the dense baseline, then each level's fused row (and
        semi-structured in the grid; packed in the packed stage, M <= ``PACKED_MAX_M``)."""
        dname = str(dtype).replace("torch.", "")
        self.stage = "packed" if packed else "grid"
        w = (torch.randn((n, k), generator=g, device=self.device) / math.sqrt(k)).to(dtype)
        rot = self._copies(w.numel() * w.element_size())
        levels = self._levels(w, n, k, g, roofline.packed_level_sets() if packed else None)
        dense_w = [w] + [w.clone() for _ in range(rot - 1)]
        packs = {}  # (level_set, level) -> copies of the packed level, packed once per group
        semi_ok = (self.kernels is not None and not self.dry and not packed
                   and self.kernels.semi_structured_supported(self.device))
        semi = {}
        for set_name, lv, enc, t, kb, tt, dec in levels if semi_ok else ():
            if lv.structure in ("1:4", "2:4"):
                try:
                    semi[(set_name, lv.level)] = [self.kernels.to_semi_structured(dec) for _ in range(rot)]
                except Exception as e:  # noqa: BLE001 - backend missing for this shape: say so
                    self.log(f"  semi-structured unavailable for {n}x{k} {dname}: {type(e).__name__}: {e}")
        for m in ms:
            x = torch.randn((m, k), generator=g, device=self.device).to(dtype)
            dense_lv = roofline.Level("dense", "dense", "dense", 1.0, 1.0, 1.0, False)
            # CUDA graphs for the whole (shape, M) group when the dense baseline is short (layer.py's rule)
            dense_stats = self._measure(lambda wt: F.linear(x, wt), dense_w, graphs=False)
            self.graphs = self._use_graphs(dense_stats)
            if self.graphs:
                dense_stats = self._measure(lambda wt: F.linear(x, wt), dense_w)
            dense_p50 = dense_stats[1] if dense_stats else None
            self._emit(dname, m, n, k, dense_lv, "dense", None, dense_stats, dense_p50, "", w, x, dense_w[0])
            for set_name, lv, enc, t, kb, tt, dec in levels:
                encs = [enc] + [enc.clone() for _ in range(rot - 1)]
                fused = self._fused_fn(x, t, kb, tt)
                st = self._measure(fused, encs)
                self._emit(dname, m, n, k, lv, "elsa-fused", tt, st, dense_p50, self.autotune_choice(), dec, x,
                           encs[0], fn=fused)
                del encs
                if packed and m <= self.kernels.PACKED_MAX_M:
                    self._packed_row(dname, m, n, k, lv, enc, t, kb, dec, x, dense_p50, st, packs)
                ws = semi.get((set_name, lv.level))
                if ws:
                    st = self._measure(lambda wt: F.linear(x, wt), ws)
                    self._emit(dname, m, n, k, lv, "semi-structured", None, st, dense_p50, "", dec, x, ws[0],
                               fn=lambda wt: F.linear(x, wt), floor=None)
        del levels, dense_w, w, semi, packs

    def _packed_row(self, dname, m, n, k, lv, enc, t, kb, dec, x, dense_p50, fused_stats, packs) -> None:
        """Row ``elsa-packed``: ``packed_linear`` on the level packed once for the group (cycling
        through copies, as the other providers do), checked against F.linear, beside the fused p50."""
        key = (lv.level_set, lv.level)
        if key not in packs:
            p = self.kernels.pack_level(enc, t, kb, tile_n=self.kernels.default_tile_rows(enc.dtype))
            copies = self._copies(p.nbytes)
            packs[key] = [p] + [dataclasses.replace(p, values=p.values.clone(), bitmap=p.bitmap.clone(),
                                                    tile_base=p.tile_base.clone()) for _ in range(copies - 1)]
        ps = packs[key]
        fn = lambda pk: self.kernels.packed_linear(x, pk)  # noqa: E731 - the provider, like the others
        route = self.kernels.cuda_route(n, k, m, lv.density, enc.dtype, fused_fraction=lv.tile_fraction)
        st = self._measure(fn, ps)
        self._emit(dname, m, n, k, lv, "elsa-packed", None, st, dense_p50, f"tile_n={ps[0].tile_n}; route={route}",
                   dec, x, ps[0], fn=fn, floor="packed", fused_p50=fused_stats[1] if fused_stats else None)

    def _use_graphs(self, dense_stats) -> bool:
        """CUDA graphs for a (shape, M) group: ``on``, or ``auto`` and the plain dense p50 below
        the timer's threshold (50 us: launch overhead would dominate)."""
        if self.timer is None or self.timer.graphs == "off":
            return False
        if self.timer.graphs == "on":
            return True
        return dense_stats is not None and dense_stats[1] < self.timer.graph_below_us

    def _fused_fn(self, x, t, kb, tt):
        if self.kernels is not None:
            return lambda e: self.kernels.elsa_linear(x, e, t, kb, tile_table=tt)
        from elsa_codec.format.bits import extract_level

        return lambda e: F.linear(x, extract_level(e, t, kb))

    def _measure(self, fn, weights, graphs: bool | None = None):
        """``(p20, p50, p80, method)`` in microseconds of ``fn`` cycling through ``weights``, CUDA
        graphs as decided for the group (``graphs=None``); None in a dry run (no timing)."""
        if self.dry:
            return None
        from .layer import _Cycle

        cyc = _Cycle([(lambda wt=wt: fn(wt)) for wt in weights])
        try:
            cyc()  # first call outside timing and graph capture: Triton autotuning and compilation
            self._sync()
            s = self.timer(cyc, graphs=self.graphs if graphs is None else graphs)
        except Exception as e:  # noqa: BLE001 - one provider failing must not end the grid
            self.log(f"  timing failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            self._sync()
            return None
        return (s.p20_us, s.p50_us, s.p80_us, s.method)

    def _row(self, stats, **fields) -> dict:
        """A CSV row: ``fields``, this run's device / versions / timestamp, and the timing of
        ``stats`` (``(p20, p50, p80, method)``; None: untimed, as a dry run or a failed provider)."""
        r = {c: "" for c in COLUMNS}
        r.update(fields, device=self.env.device_name, torch=self.env.torch, triton=self.env.triton,
                 timestamp=self.env.timestamp)
        if stats is None:
            r["timing"] = "none (dry run)" if self.dry else "failed"
        else:
            p20, p50, p80, method = stats
            r.update(p20_us=f"{p20:.3f}", p50_us=f"{p50:.3f}", p80_us=f"{p80:.3f}", timing=method)
        return r

    def _write(self, r: dict) -> None:
        self._w.writerow(r)
        self._f.flush()
        self.rows += 1

    def _emit(self, dname, m, n, k, lv, provider, tt, stats, dense_p50, choice, ref_w, x, w_arg, fn=None,
              floor: str | None = "fused", fused_p50: float | None = None) -> None:
        """Check ``provider``'s output and write its row with the floor of its level: ``floor``
        ``"fused"`` (bench/roofline.py's grid row; cuBLAS's for ``dense``), ``"packed"`` (the
        packed row) or None (no floor)."""
        fn = fn or (lambda wt: F.linear(x, wt))
        try:
            y = fn(w_arg)
            if y.layout != torch.strided:
                y = y.to_dense()
            ref = F.linear(x.float(), ref_w.float())
            err = float((y.float() - ref).abs().max()) / (float(ref.abs().max()) or 1.0)
            err_s = f"{err:.3e}"
        except Exception as e:  # noqa: BLE001 - a failing provider is reported in its row and the log
            err_s = f"error: {type(e).__name__}"
            self.log(f"  {provider} {m}x{n}x{k} {dname} level {lv.level}: {type(e).__name__}: {e}")
        fl = None
        if floor == "packed":
            fl, fkey, vkey = roofline.packed_row(m, n, k, dname, lv), "packed_floor_us", "packed_vs_dense"
        elif floor:
            fl, fkey, vkey = roofline.row(m, n, k, dname, lv), "floor_us", "floor_vs_dense"
        gpu = "H200" if self.dry else self.gpu  # the dry run computes the H200 floor
        r = self._row(stats, dtype=dname, m=m, n=n, k=k, shape=f"{m}x{n}x{k}", level_set=lv.level_set, level=lv.level,
                      structure=lv.structure, density=f"{lv.density:.6f}", provider=provider,
                      stage=self.stage, table="yes" if tt is not None else "no",
                      autotune_config=choice, max_rel_err=err_s)
        if fl is not None:
            r["floor_gpu"] = gpu or "none"
            r["floor_us"] = fl[f"{gpu.lower()}_{fkey}"] if gpu else ""
            r["floor_vs_dense"] = fl[f"{gpu.lower()}_{vkey}"] if gpu else ""
        if stats is not None:
            p50 = stats[1]
            if r["floor_us"] and self.gpu:
                r["measured_vs_floor"] = f"{p50 / float(r['floor_us']):.3f}"
            if dense_p50:
                r["dense_p50_us"] = f"{dense_p50:.3f}"
                r["speedup_vs_dense"] = f"{dense_p50 / p50:.3f}"
                r["latency_vs_dense"] = f"{p50 / dense_p50:.3f}"
            if fused_p50:
                r["fused_p50_us"] = f"{fused_p50:.3f}"
                r["latency_vs_fused"] = f"{p50 / fused_p50:.3f}"
        self._write(r)
        self.log(f"  {dname:8s} {r['shape']:>17s} {lv.level_set:12s} L={lv.level:<5s} {provider:15s} "
                 f"p50 {r['p50_us'] or '-':>10s} us  floor {r['floor_us'] or '-':>9s} us  "
                 f"x{r['measured_vs_floor'] or '-':>6s}  vs dense {r['speedup_vs_dense'] or '-':>6s}  "
                 f"err {err_s}  {choice}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_grid",
                                description="The GPU grid of bench/roofline.py, timed, with measured / floor per row.")
    p.add_argument("--out", required=True, help="folder for grid.csv and grid.log")
    p.add_argument("--dry-run", action="store_true", help="no GPU: interpreter-sized grid, no timing")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="start no new (dtype, shape) group after this (seconds from the start, packed stage included)")
    p.add_argument("--packed-budget-s", type=float, default=60.0,
                   help="the packed stage (run first) starts no new (dtype, shape) group after this; 0: no packed stage")
    p.add_argument("--rep-ms", type=int, default=25, help="do_bench rep per measurement (ms)")
    p.add_argument("--dtypes", default=",".join(roofline.GRID_DTYPES))
    p.add_argument("--m", help="comma list of M (default 1,16,128,4096; dry run 1,16)")
    p.add_argument("--packed-m", help="comma list of M of the packed stage (default 1,4,16; dry run 1)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_grid: no CUDA device (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    ms = tuple(int(x) for x in a.m.split(",")) if a.m else (DRY_M if a.dry_run else roofline.GRID_M)
    shapes = DRY_SHAPES if a.dry_run else roofline.GRID_SHAPES
    packed_ms = (tuple(int(x) for x in a.packed_m.split(",")) if a.packed_m
                 else (DRY_PACKED_M if a.dry_run else PACKED_GRID_M))
    packed_shapes = () if a.packed_budget_s <= 0 else (DRY_SHAPES if a.dry_run else PACKED_SHAPES)
    grid = Grid(a.out, dry_run=a.dry_run, budget_s=a.budget_s, rep_ms=a.rep_ms)
    try:
        n = grid.run(dtypes, shapes, ms, packed_shapes=packed_shapes, packed_ms=packed_ms,
                     packed_budget_s=a.packed_budget_s)
        grid.log(f"wrote {n} rows to {grid.csv_path} in {grid.elapsed():.0f} s")
    finally:
        grid.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
