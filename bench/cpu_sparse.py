"""``python -m bench cpu``: the ``sparse-cpu`` backend on this CPU (project issue 13).

Three sections, each writing long-format rows to ``<out>/results.csv`` (default
``bench/results/cpu-sparse/``; columns :data:`COLUMNS`):

- ``grid`` (this file): ``y = x @ W_t.T`` per weight shape (4096x4096 and MiniLM's 384x384,
  1536x384, 384x1536), dtype, thread count, M and level, every provider of a ``(shape, dtype,
  level set, threads, M)`` group timed in interleaved rounds (:meth:`common.CpuTimer.round_robin`)
  together with the dense baseline, so ``ratio_vs_dense`` = p50 / p50(dense) of the same group.
  Levels: ``ec.magnitude_counters`` + ``ec.encode`` on a seeded ``randn`` weight, served by
  ``ec.ELSALinear.from_encoded``. Providers:

  ========================  ======================================================================
  ``dense``                 ``F.linear`` on the dense (unencoded) weight: the baseline
  ``elsa-<format>``         the module as it serves by default; ``<format>`` = the packed format
                            it chose (``csr`` / ``bitmask`` / ``bsr``)
  ``elsa-reference``        the same module when ``M`` > its ``cpu_max_tokens`` (it falls back to
                            the decoded weight + ``F.linear``)
  ``forced-<format>``       ``module.cpu_format = <format>``, ``cpu_max_tokens = 10**9``
  ``elsa-decoded``          ``backend="reference"``: decoded level cached + ``F.linear`` (old path)
  ``torch-csr``             ``F.linear(x, W_t.to_sparse_csr())`` (float32 only: no bf16 kernel)
  ``scipy-csr``             ``scipy.sparse.csr_matrix(W_t) @ x.T`` (bf16 weights as float32 values)
  ``torch-bsr``             block levels: ``W_t.to_sparse_bsr((R, C)) @ x.T`` (float32 only)
  ========================  ======================================================================

  ``bytes`` = the bytes the provider's weight occupies (packed level, dense tensor, CSR arrays);
  ``floor_us`` = ``bytes`` / the read bandwidth of this machine measured on a buffer of about that
  size (op ``read_bandwidth``: ``tensor.sum()`` over float32 buffers, 1 and 2 threads).
- ``memory`` (:mod:`.cpu_memory`): resident memory of ``ec.load(path, model, level=t)`` and the
  level switch, one subprocess per case.
- ``minilm`` (:mod:`.cpu_minilm`): the real all-MiniLM-L6-v2 served at each level, one subprocess
  per level.
- ``serving`` (:mod:`.cpu_serving`): one 4096x4096 layer through ``ec.swap_`` at M = 1 / 16 / 64 /
  256, as a ratio to dense in one process: plans measured quiet, plans written under load then
  served quiet, and ``resident="all"``.

Then (separate steps, also ``python -m bench cpu plot|tables CSV``) :mod:`.cpu_report` writes
``latency_vs_density.png`` and ``tables.md``.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from . import common

#: Columns of the CPU CSV: bench/common's plus the CPU facts of a row.
COLUMNS = common.COLUMNS + [
    "threads", "m", "format", "bytes", "floor_us", "ratio_vs_dense", "target", "met",
    "metric", "value", "unit", "note",
]
CSV_NAME = "results.csv"
OUT_DEFAULT = os.path.join(common.BENCH_DIR, "results", "cpu-sparse")
SECTIONS = ("grid", "memory", "minilm", "serving")

SHAPES = [(4096, 4096), (384, 384), (1536, 384), (384, 1536)]
#: (name, levels sparsest first, structure for magnitude_counters)
LEVEL_SETS = [
    ("unstructured", [0.9, 0.75, 0.5], "unstructured"),
    ("block:16x16", [0.9, 0.5], "block:16x16"),
    ("block:32x32", [0.9, 0.5], "block:32x32"),
    ("block:64x64", [0.9, 0.5], "block:64x64"),
    ("n:m", ["1:4", "2:4"], "unstructured"),
]
BANDWIDTH_MIB = [1, 4, 16, 64, 256, 1024]


def target_for(structure: str, density: float, m: int) -> tuple[float, str]:
    """The issue-13 target ratio vs dense for the default provider, and its wording."""
    if m == 1:
        if structure.startswith("block"):
            return 1.3 * density, "<= 1.3 x density"
        if structure == "2:4":
            return 0.8, "<= 0.8"
        if structure == "1:4":
            return 0.5, "<= 0.5"
        for d, t in ((0.1, 0.35), (0.25, 0.6), (0.5, 1.0)):
            if abs(density - d) < 0.02:
                return t, f"<= {t}"
    return 1.0, "<= 1.0 (never slower than dense)"


# ------------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------------
class Rows:
    """Rows of one run (dicts keyed by :data:`COLUMNS`), logged as they come."""

    def __init__(self, env: common.Env, log: common.Log):
        self.env, self.log, self.rows = env, log, []

    def add(self, op, provider, shape, dtype, level="-", structure="-", density=1.0, stats=None, **extra) -> dict:
        row = {c: "" for c in COLUMNS}
        row.update(op=op, provider=provider, shape=shape, dtype=common.dtype_name(dtype), level=str(level),
                   structure=structure, density=f"{density:.6f}", device=self.env.device_name, torch=self.env.torch,
                   triton=self.env.triton, git_sha=self.env.git_sha, timestamp=self.env.timestamp)
        if stats is not None:
            row.update(p20_us=f"{stats.p20_us:.3f}", p50_us=f"{stats.p50_us:.3f}", p80_us=f"{stats.p80_us:.3f}")
        for k, v in extra.items():
            if k not in row:
                raise KeyError(k)
            row[k] = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        self.rows.append(row)
        if stats is not None:
            r = row
            self.log(f"  {op:<8} {provider:<16} {shape:<14} {r['dtype']:<8} th={r['threads']:<2} L={r['level']:<5} "
                     f"{structure:<12} d={density:5.3f} p50 {stats.p50_us:10.1f} us [p20 {stats.p20_us:.1f}, p80 {stats.p80_us:.1f}]"
                     + (f"  x{float(r['ratio_vs_dense']):.3f} dense" if r["ratio_vs_dense"] else "")
                     + (f"  floor {float(r['floor_us']):.1f} us" if r["floor_us"] else "")
                     + (f"  {r['note']}" if r["note"] else ""))
        else:
            self.log(f"  {op:<8} {provider:<16} {shape:<14} {row['dtype']:<8} L={row['level']:<5} "
                     f"{row['metric']} = {row['value']} {row['unit']}  {row['note']}")
        return row

    def write(self, path: str) -> int:
        return common.append_csv(path, self.rows, columns=COLUMNS)


#: The ops of each section (``latest`` picks the newest run per section: a run of ``--only
#: memory,minilm`` does not hide the grid of an earlier run).
SECTION_OPS = {"grid": ("linear", "read_bandwidth"), "memory": ("memory", "switch"),
               "minilm": ("minilm_forward", "minilm_memory")}


def read_rows(path: str, run: str = "latest") -> list:
    """Rows of a CPU CSV; ``latest``: per section (:data:`SECTION_OPS`), the rows of the newest run
    that has that section."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if run == "latest" and rows:
        keep = []
        for ops in SECTION_OPS.values():
            sec = [r for r in rows if r["op"] in ops]
            if sec:
                ts = max(r["timestamp"] for r in sec)
                keep += [r for r in sec if r["timestamp"] == ts]
        rows = keep
    elif run not in ("latest", "all"):
        rows = [r for r in rows if r["timestamp"] == run]
    return rows


# ------------------------------------------------------------------------------------------------
# Machine facts
# ------------------------------------------------------------------------------------------------
def cpu_facts() -> dict:
    """lscpu model name, the SIMD flags that matter here, CPUs."""
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
                        "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    hyper = ""
    try:
        out = os.popen("lscpu 2>/dev/null").read()
        for line in out.splitlines():
            if line.startswith(("Hypervisor vendor", "L3 cache", "L2 cache")):
                hyper += line.split(":", 1)[0].strip() + ": " + line.split(":", 1)[1].strip() + "; "
    except OSError:
        pass
    return {"model": common.cpu_name(), "simd": " ".join(simd) or "none", "cpus": os.cpu_count(),
            "extra": hyper.strip().rstrip(";")}


def machine_line(env: common.Env) -> str:
    f = cpu_facts()
    return (f"{f['model']}, {f['cpus']} CPUs, flags: {f['simd']}; torch {env.torch}; git {env.git_sha}"
            + (f"; {f['extra']}" if f["extra"] else ""))


# ------------------------------------------------------------------------------------------------
# Read bandwidth (the floor)
# ------------------------------------------------------------------------------------------------
def measure_bandwidth(ctx) -> dict:
    """``{threads: [(bytes, GB/s)]}``: ``tensor.sum()`` of float32 buffers of each size in
    :data:`BANDWIDTH_MIB` (repeated reads, as the layer timing repeats them)."""
    out = {}
    sizes = [s for s in BANDWIDTH_MIB if s <= ctx.bw_max_mib]
    for th in ctx.threads:
        timer = common.CpuTimer(th, min_run_time=ctx.min_run_time, min_blocks=ctx.min_blocks, rounds=ctx.rounds)
        bufs = [torch.ones(s * 2**20 // 4) for s in sizes]
        stats = timer.round_robin([(lambda b=b: b.sum()) for b in bufs])
        res = []
        for s, st in zip(sizes, stats):
            nb = s * 2**20
            gbps = nb / (st.p50_us * 1e-6) / 1e9
            res.append((nb, gbps))
            ctx.rows.add("read_bandwidth", "tensor.sum", f"{s}MiB", torch.float32, stats=st, threads=th,
                         bytes=nb, metric="gbps", value=gbps, unit="GB/s")
        out[th] = res
        del bufs
    return out


def floor_us(bw: dict, threads: int, nbytes: int) -> float:
    """``nbytes`` at the bandwidth measured on the smallest buffer at least that large."""
    table = bw[threads]
    for nb, g in table:
        if nb >= nbytes:
            return nbytes / (g * 1e9) * 1e6
    return nbytes / (table[-1][1] * 1e9) * 1e6


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
def encode_levels(w: torch.Tensor, levels, structure: str):
    """``(encoded weight, meta)`` of ``w`` with one-shot magnitude levels."""
    import elsa_codec as ec

    c = ec.magnitude_counters({"weight": w}, list(levels), structure=structure)
    enc = ec.encode({"weight": w}, c)
    return enc["weight"], enc.meta


def make_module(enc, meta, level: int, *, backend="auto", fmt=None, max_tokens=None):
    import elsa_codec as ec

    m = ec.ELSALinear.from_encoded(enc, None, num_levels=meta.num_levels, code_bits=meta.code_bits,
                                   structures=[lv.structure for lv in meta.levels],
                                   tensor_info=meta.tensors["weight"], backend=backend)
    m.cpu_format = fmt
    m.cpu_max_tokens = max_tokens
    m.set_level(level)
    return m


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


class _Prov:
    """One timed provider of a group."""

    def __init__(self, name, level, structure, density, fn_of_x, nbytes, fmt, note="", auto=None):
        self.name, self.level, self.structure, self.density = name, level, structure, density
        self.fn_of_x, self.nbytes, self.fmt, self.note, self.auto = fn_of_x, nbytes, fmt, note, auto


def _auto_name(mod, m: int) -> tuple[str, str]:
    """Provider name and format of the default module at M rows (which path its forward takes:
    the planner's route of M's bucket, ``mod.cpu_plan``)."""
    if mod.backend != "sparse-cpu":
        return "elsa-reference", "reference"
    plan = mod.cpu_plan
    return (f"elsa-{plan.format}", plan.format) if plan.serves_packed(m) else ("elsa-reference", "reference")


def _count_fallbacks(mod, x) -> tuple[int, int]:
    """(packed calls, fallbacks) of one forward of ``mod`` (wraps ``_sparse_cpu_linear``)."""
    calls = [0, 0]
    orig = mod._sparse_cpu_linear

    def wrapped(xx):
        y = orig(xx)
        calls[0 if y is not None else 1] += 1
        return y

    mod._sparse_cpu_linear = wrapped
    try:
        with torch.no_grad():
            mod(x)
    finally:
        del mod._sparse_cpu_linear
    return calls[0], calls[1]


def _level_providers(ctx, enc, meta, t, wd, m_values) -> list:
    """Providers of level ``t`` (all M; which run at which M is decided by the caller)."""
    import scipy.sparse as sp

    from elsa_codec.format.structure import parse_structure

    structure = meta.levels[t - 1].structure
    density = 1.0 - float(meta.tensors["weight"].sparsity[t - 1])
    st = parse_structure(structure)
    dt = enc.dtype
    provs = []
    auto = make_module(enc, meta, t)
    if auto.backend == "sparse-cpu":
        ap = auto.packed_level()
        a_nb, a_fmt = ap.nbytes, ap.format
    else:  # the module's rule serves this level from the decoded weight at every M
        a_nb, a_fmt = _nbytes(wd), "reference"
    provs.append(_Prov("elsa-auto", t, structure, density, lambda x, mod=auto: mod(x), a_nb, a_fmt, auto=auto))
    fmts = ["csr", "bitmask"] + (["bsr"] if st.kind == "block" else []) + (["nm"] if st.kind == "nm" else [])
    for f in fmts:
        mod = make_module(enc, meta, t, fmt=f, max_tokens=10**9)
        p = mod.packed_level()
        provs.append(_Prov(f"forced-{f}", t, structure, density, lambda x, mod=mod: mod(x), p.nbytes, f,
                           note=f"forced {p.format}" + (f" {p.block[0]}x{p.block[1]}" if f == "bsr" else "")))
    dec = make_module(enc, meta, t, backend="reference")
    provs.append(_Prov("elsa-decoded", t, structure, density, lambda x, mod=dec: mod(x), _nbytes(wd), "decoded"))
    # baselines
    if dt == torch.float32:
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            csr = wd.to_sparse_csr()
        provs.append(_Prov("torch-csr", t, structure, density, lambda x, c=csr: F.linear(x, c),
                           _nbytes(csr.crow_indices(), csr.col_indices(), csr.values()), "torch-csr"))
    spm = sp.csr_matrix(wd.float().numpy())
    sp_nb = spm.data.nbytes + spm.indices.nbytes + spm.indptr.nbytes

    def scipy_fn(x, s=spm):
        y = s @ x.float().numpy().T
        return torch.from_numpy(y.T).to(x.dtype)

    provs.append(_Prov("scipy-csr", t, structure, density, scipy_fn, sp_nb, "scipy-csr",
                       note="" if dt == torch.float32 else "float32 values (scipy has no bfloat16)"))
    if st.kind == "block" and dt == torch.float32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            bsr = wd.to_sparse_bsr((st.r, st.c))
        provs.append(_Prov("torch-bsr", t, structure, density, lambda x, b=bsr: (b @ x.mT).mT,
                           _nbytes(bsr.crow_indices(), bsr.col_indices(), bsr.values()), f"torch-bsr {st.r}x{st.c}"))
    return provs


def _check(ctx, provs, x, wd, what) -> list:
    """Each provider's output against ``F.linear`` in float32 on the decoded level; drops (and
    logs) the ones that fail to run, warns on a wrong result."""
    ref = F.linear(x.float(), wd.float())
    scale = float(ref.abs().max()) or 1.0
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    ok = []
    for p in provs:
        try:
            with torch.no_grad():
                y = p.fn_of_x(x)
            err = float((y.float() - ref).abs().max()) / scale
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            ctx.log(f"  {p.name} unavailable for {what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if not err <= tol:
            ctx.log(f"  WARNING: {p.name} {what}: max error {err:.2e} of max |y| (tolerance {tol:g})")
        ok.append(p)
    return ok


def _run_set(ctx, n, k, dtype, set_name, levels, structure, g) -> None:
    import elsa_codec as ec

    log = ctx.log
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    t0 = time.perf_counter()
    enc, meta = encode_levels(w, levels, structure)
    T = meta.num_levels
    dname = common.dtype_name(dtype)
    shape_nk = f"{n}x{k}"
    provs_by_level = {}
    for t in range(1, T + 1):
        wd = ec.extract_level(enc, t, meta.code_bits, T)
        x1 = torch.randn(1, k, generator=g).to(dtype)
        provs_by_level[t] = _check(ctx, _level_providers(ctx, enc, meta, t, wd, ctx.m_values), x1, wd,
                                   f"{shape_nk} {dname} level {t} ({meta.levels[t - 1].structure})")
        del wd
    log(f"-- {shape_nk} {dname} {set_name}: levels {levels} encoded and packed in {time.perf_counter() - t0:.1f} s")
    dense_nb = _nbytes(w)
    for th in ctx.threads:
        timer = common.CpuTimer(th, min_run_time=ctx.min_run_time, min_blocks=ctx.min_blocks, rounds=ctx.rounds)
        for m in ctx.m_values:
            if th > 1 and (m not in ctx.multi_thread_m or (ctx.mt_shapes != "all" and shape_nk not in ctx.mt_shapes)):
                continue
            x = torch.randn(m, k, generator=g).to(dtype)
            group = [_Prov("dense", "dense", "dense", 1.0, lambda x, w=w: F.linear(x, w), dense_nb, "dense")]
            for t in range(1, T + 1):
                for p in provs_by_level[t]:
                    base = p.name in ("torch-csr", "scipy-csr", "torch-bsr")
                    forced = p.name.startswith("forced-")
                    if base and m not in ctx.baseline_m:
                        continue
                    if forced and m not in ctx.forced_m:
                        continue
                    group.append(p)
            names = []
            for p in group:
                if p.auto is not None:
                    name, fmt = _auto_name(p.auto, m)
                    packed, fb = _count_fallbacks(p.auto, x)
                    if (fb > 0 or packed == 0) != (name == "elsa-reference"):
                        log(f"  WARNING: {name} at M={m}: forward made {packed} packed calls, {fb} fallbacks")
                    names.append((name, fmt, p.nbytes if name != "elsa-reference" else dense_nb,
                                  f"backend {p.auto.backend}, plan {p.fmt}; forward: {packed} packed call(s), {fb} fallback(s)"))
                else:
                    names.append((p.name, p.fmt, p.nbytes, p.note))
            fns = [(lambda p=p: p.fn_of_x(x)) for p in group]
            with torch.no_grad():
                stats = timer.round_robin(fns)
            d50 = stats[0].p50_us
            for p, (name, fmt, nb, note), st in zip(group, names, stats):
                tgt, met = None, None
                if p.auto is not None:
                    tgt, _ = target_for(p.structure, p.density, m)
                    met = "yes" if st.p50_us / d50 <= tgt else "no"
                ctx.rows.add("linear", name, f"{m}x{shape_nk}", dtype, p.level, p.structure, p.density, st,
                             threads=th, m=m, format=fmt, bytes=nb, floor_us=floor_us(ctx.bw, th, nb),
                             ratio_vs_dense=st.p50_us / d50, target=tgt, met=met, note=note)
    del provs_by_level, enc, w
    gc.collect()


def run_grid(ctx) -> None:
    ctx.log(f"== grid: shapes {ctx.shapes}, dtypes {[common.dtype_name(d) for d in ctx.dtypes]}, threads {ctx.threads}, "
            f"M {ctx.m_values} (2+ threads at M in {ctx.multi_thread_m}; forced formats at M in {ctx.forced_m}; "
            f"torch/scipy baselines at M in {ctx.baseline_m}), level sets {[s[0] for s in ctx.level_sets]}")
    t0 = time.perf_counter()
    ctx.bw = measure_bandwidth(ctx)
    ctx.log(f"-- read bandwidth measured in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    for (n, k) in ctx.shapes:
        for dtype in ctx.dtypes:
            for set_name, levels, structure in ctx.level_sets:
                if set_name == "n:m" and k % 4:
                    continue
                if structure.startswith("block:"):
                    r, c = (int(v) for v in structure.split(":")[1].split("x"))
                    if n % r or k % c:
                        continue
                _run_set(ctx, n, k, dtype, set_name, levels, structure, g)
                ctx.log(f"   ({time.perf_counter() - ctx.t_start:.0f} s since start, load {common.load_average()})")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench cpu", description=(
        "sparse-cpu backend on this CPU: layer grid vs dense, memory and level switch, MiniLM end to end "
        "(long-format CSV, then 'python -m bench cpu plot CSV' and 'python -m bench cpu tables CSV')."))
    p.add_argument("--quick", action="store_true", help="smoke run under 2 minutes (small shapes, short timing)")
    p.add_argument("--out", default=None, help=f"results folder (default {os.path.relpath(OUT_DEFAULT, common.REPO_DIR)})")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--shapes", help="comma list of NxK weights (default 4096x4096,384x384,1536x384,384x1536)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--threads", help="comma list of torch.set_num_threads values (default 1,2; quick 1)")
    p.add_argument("--m", help="comma list of M (token rows) (default 1,8,64; quick 1,8)")
    p.add_argument("--multi-thread-m", default="1", help="M values timed with more than one thread")
    p.add_argument("--multi-thread-shapes", default="4096x4096",
                   help="weights (NxK) timed with more than one thread ('all' for every shape)")
    p.add_argument("--forced-m", default="1,8,64", help="M values at which the forced formats are timed")
    p.add_argument("--baseline-m", default="1", help="M values at which torch/scipy baselines are timed")
    p.add_argument("--level-sets", help=f"comma list of {', '.join(s[0] for s in LEVEL_SETS)} (default all; quick unstructured,block:64x64,n:m)")
    p.add_argument("--min-run-time", type=float, help="total seconds per provider and group (default 0.15, quick 0.02)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    p.add_argument("--mem-shape", default=None, help="NxK of the memory section's layer (default 4096x4096, quick 1024x1024)")
    p.add_argument("--mem-cases", default="plain,dense,1,2,3", help="memory section cases: plain, dense, level numbers")
    p.add_argument("--minilm-reps", type=int, help="MiniLM forwards per batch size and thread count (default 30, quick 5)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet", action="store_true", help="write the log file only")
    return p


class Ctx:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _ints(s: str) -> list:
    return [int(v) for v in s.split(",") if v.strip()]


def make_ctx(a, log, rows, env) -> Ctx:
    quick = a.quick
    shapes = ([tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")] if a.shapes
              else ([(1536, 384)] if quick else SHAPES))
    names = a.level_sets.split(",") if a.level_sets else (["unstructured", "block:64x64", "n:m"] if quick else [s[0] for s in LEVEL_SETS])
    sets = [s for s in LEVEL_SETS if s[0] in names]
    mem = a.mem_shape or ("1024x1024" if quick else "4096x4096")
    return Ctx(
        quick=quick, log=log, rows=rows, env=env, shapes=shapes, dtypes=common.parse_dtypes(a.dtypes),
        threads=_ints(a.threads or ("1" if quick else "1,2")), m_values=_ints(a.m or ("1,8" if quick else "1,8,64")),
        multi_thread_m=_ints(a.multi_thread_m),
        mt_shapes="all" if a.multi_thread_shapes == "all" else a.multi_thread_shapes.split(","),
        forced_m=_ints(a.forced_m), baseline_m=_ints(a.baseline_m), level_sets=sets,
        min_run_time=a.min_run_time if a.min_run_time is not None else (0.02 if quick else 0.15),
        min_blocks=3 if quick else 6, rounds=a.rounds or (2 if quick else 3),
        bw_max_mib=64 if quick else 1024, mem_cases=a.mem_cases.split(","), mem_dtypes=common.parse_dtypes(a.dtypes)[:1] if quick else common.parse_dtypes(a.dtypes), mem_shape=tuple(int(v) for v in mem.split("x")),
        minilm_reps=a.minilm_reps or (5 if quick else 30), t_start=time.perf_counter(),
    )


def run(argv) -> int:
    a = build_parser().parse_args(argv)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            print(f"python -m bench cpu: unknown section {s!r}; expected {', '.join(SECTIONS)}", file=sys.stderr)
            return 2
    out = a.out or OUT_DEFAULT
    os.makedirs(out, exist_ok=True)
    saved = torch.get_num_threads()
    env = common.Env.detect(torch.device("cpu"), max(_ints(a.threads or "1,2")))
    log = common.Log(os.path.join(out, "bench.log"), quiet=a.quiet)
    rows = Rows(env, log)
    ctx = make_ctx(a, log, rows, env)
    cmd = common.command_line()
    mline = machine_line(env)
    with open(os.path.join(out, "COMMAND.txt"), "a", encoding="utf-8") as f:
        f.write(f"{env.timestamp}  cd {common.REPO_DIR} && {cmd}\n    machine: {mline}\n")
    log("=" * 100)
    log(f"python -m bench cpu{' --quick' if a.quick else ''}: {env.timestamp}")
    log(f"command: {cmd}")
    log(f"machine: {mline}")
    log(f"threads timed: {ctx.threads}; timing: CpuTimer.round_robin, {ctx.rounds} interleaved rounds, "
        f"min_run_time {ctx.min_run_time} s and >= {ctx.min_blocks} blocks per provider and group; p20/p50/p80 over blocks")
    log(f"load average (1/5/15 min) at start: {common.load_average()}")
    for b in common.busy_processes():
        log(f"  busy: {b}")
    from elsa_codec.native import cpu_kernels, cpu_kernels_error

    if cpu_kernels() is None:
        log(f"WARNING: the sparse-cpu kernels are unavailable: {cpu_kernels_error()}")
    status = 0
    try:
        for s in SECTIONS:
            if s not in sections:
                continue
            t0 = time.perf_counter()
            if s == "grid":
                run_grid(ctx)
            elif s == "memory":
                from .cpu_memory import run_memory

                run_memory(ctx)
            elif s == "serving":
                from .cpu_serving import run_serving

                ctx.out, ctx.command, ctx.machine = out, cmd, mline
                run_serving(ctx)
            else:
                from .cpu_minilm import run_minilm

                run_minilm(ctx)
            log(f"-- section {s}: {time.perf_counter() - t0:.1f} s (load average now {common.load_average()})")
    finally:
        torch.set_num_threads(saved)
        csv_path = os.path.join(out, CSV_NAME)
        n = rows.write(csv_path)
        log(f"wrote {n} rows to {csv_path}")
    # separate steps: they read the CSV back
    from . import cpu_report

    tables = cpu_report.write_tables(csv_path, os.path.join(out, "tables.md"), command=cmd)
    log(f"wrote {tables}")
    if not a.no_plot:
        png = cpu_report.plot(csv_path, os.path.join(out, "latency_vs_density.png"))
        log(f"wrote {png}")
    log(f"load average at end: {common.load_average()}")
    log(f"total {time.perf_counter() - ctx.t_start:.1f} s")
    log.close()
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("plot", "tables"):
        from . import cpu_report

        return cpu_report.main(argv)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
