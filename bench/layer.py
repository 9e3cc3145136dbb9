"""Layer-level benchmark: ``y = x @ W_t.T`` per shape, dtype, level and provider.

Providers (the bench issue):

- ``dense``: ``F.linear`` on a plain dense weight (cuBLAS on GPU, the CPU BLAS on CPU); level
  ``dense``, the baseline of every ratio.
- ``elsa-fused``: :func:`elsa_codec.kernels.triton.elsa_linear` (the Triton kernel), GPU only. The
  per-64x64-tile table (:func:`elsa_codec.kernels.triton.tile_table`) is passed when the level has tiles
  to skip (``tile_density < 1``: block levels); without skippable tiles it would only narrow the
  autotune space (``ELSALinear`` passes it always; the serving and model sections time that path).
- ``elsa-cached``: the decoded level weight (decoded once, outside the timing) + ``F.linear``; the
  CPU serving path of ``ELSALinear`` after its first call.
- ``semi-structured``: the decoded 2:4 (or 1:4) level as
  ``torch.sparse.to_sparse_semi_structured`` + ``F.linear``, where the device supports it (CUDA,
  compute capability >= 8.0).
- ``bsr``: block levels as ``weight.to_sparse_bsr((64, 64))``, ``(W_bsr @ x.T).T``.

Timing: CPU ``torch.utils.benchmark``; GPU ``triton.testing.do_bench`` (L2 flushed before every
call), or CUDA graphs (``do_bench_cudagraph``) for the whole ``(shape, M)`` group when the dense
baseline is under 50 us (launch overhead would dominate). On the GPU every provider cycles through
copies of its weight (working set >= 2x the L2 cache, at most 64 copies), so that each call
streams its weight from memory even in a graph replay, as a model larger than L2 does.

Shapes are ``N x K`` weights (``out_features x in_features``); the CSV ``shape`` is ``MxNxK``.
``gbps`` and ``tflops`` are effective, dense-equivalent figures: bytes ``(M*K + N*K + M*N) * size``
and ``2*M*N*K`` flops over p50, the same for every provider (a faster provider shows more).
"""
from __future__ import annotations

import gc
import warnings

import torch
import torch.nn.functional as F

import elsa_codec as ec

from .weights import LEVEL_SETS, make_encoded, random_weight

SHAPES = {
    "minilm": [(384, 384), (1536, 384), (384, 1536)],
    "llama": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3": [(14336, 4096), (4096, 14336)],  # docs/DESIGN.md's K, N in {4096, 11008, 14336}
}

GPU_M = [1, 16, 128, 4096]
CPU_M = {"minilm": [1, 16, 128], "llama": [1, 16], "llama3": [1, 16]}
QUICK_M = [1, 16]


def _semi_ok(structure: str) -> bool:
    """2:4 sparse tensor cores accept any N:4 pattern with N <= 2."""
    if ":" not in structure or structure.startswith("block"):
        return False
    n, m = structure.split(":")
    return int(m) == 4 and int(n) <= 2


def run(ctx) -> None:
    """Run the layer benchmark described by ``ctx`` (see ``__main__``)."""
    log = ctx.log
    families = ctx.shape_families
    log(f"== layer: y = x @ W_t.T, families {families}, dtypes {[str(d).replace('torch.', '') for d in ctx.dtypes]}")
    g = torch.Generator().manual_seed(0)
    for fam in families:
        for (n, k) in SHAPES[fam]:
            ms = ctx.m_values or (QUICK_M if ctx.quick else (GPU_M if ctx.gpu else CPU_M[fam]))
            for dtype in ctx.dtypes:
                _run_shape(ctx, n, k, dtype, ms, g)
                gc.collect()
                if ctx.gpu:
                    torch.cuda.empty_cache()


def _copies(ctx, nbytes: int) -> int:
    """How many copies of a weight the GPU timing cycles through: enough that the working set is
    at least twice the L2 cache (so each call reads its weight from HBM, as a model larger than L2
    does), at most 64. 1 on the CPU."""
    if not ctx.gpu:
        return 1
    props = torch.cuda.get_device_properties(ctx.device)
    l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return max(1, min(64, -(-2 * l2 // max(nbytes, 1))))


class _Cycle:
    """A callable that calls ``fns[i % len(fns)]``, i = 0, 1, 2, ... (rotating weight copies: a
    CUDA graph captures the sequence of copies)."""

    def __init__(self, fns):
        self.fns = list(fns)
        self.i = 0

    def __call__(self):
        f = self.fns[self.i]
        self.i = (self.i + 1) % len(self.fns)
        return f()


def _check_outputs(ctx, providers, x, wd, what: str) -> list:
    """Each provider's output against ``F.linear(x, decoded weight)`` in float32 (logged, not fatal:
    a benchmark of a wrong result is worthless, so the log says so). Returns the providers that
    ran (the others are reported once and dropped)."""
    ref = F.linear(x.float(), wd.float())
    scale = float(ref.abs().max()) or 1.0
    tol = 1e-3 if x.dtype == torch.float32 else 3e-2
    ok = []
    for p in providers:
        prov, make, weights, _ = p
        try:
            y = make(x, weights[0])
            if y.layout != torch.strided:
                y = y.to_dense()
            err = float((y.float() - ref).abs().max()) / scale
        except (RuntimeError, NotImplementedError, TypeError, ValueError, ec.ELSAError) as e:
            ctx.log(f"  {prov} unavailable for {what}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            if ctx.gpu:
                torch.cuda.synchronize()
            continue
        if not err <= tol:
            ctx.log(f"  WARNING: {prov} {what}: max error {err:.2e} of max |y| (tolerance {tol:g}): wrong result?")
        ok.append(p)
    return ok


def _run_shape(ctx, n: int, k: int, dtype, ms, g) -> None:
    """All providers of all levels of one weight shape and dtype; per M, one interleaved
    (round-robin) measurement of the dense baseline and every provider."""
    log, dev, timer, res = ctx.log, ctx.device, ctx.timer, ctx.results
    kern = ctx.kernels  # elsa_codec.kernels.triton on GPU (or under the Triton interpreter), None on CPU
    w = random_weight((n, k), dtype, dev, g)
    xs = {m: torch.randn((m, k), generator=g).to(dtype=dtype, device=dev) for m in ms}
    elt = w.element_size()
    rot = _copies(ctx, w.numel() * elt)
    dname = str(dtype).replace("torch.", "")

    # entries: (provider, level, structure, density, make(x, weight), weights, note)
    entries = [("dense", "dense", "dense", 1.0, lambda x, wt: F.linear(x, wt), [w] + [w.clone() for _ in range(rot - 1)],
                f"{rot} weight copies" if rot > 1 else "")]
    for set_name, levels, structure in LEVEL_SETS:
        if set_name not in ctx.level_sets:
            continue
        try:
            ew = make_encoded(w, levels, structure, generator=g)
        except (ValueError, ec.ELSAError) as e:
            log(f"  skip level set {set_name} for {n}x{k}: {e}")
            continue
        enc, T, kb = ew.encoded, ew.num_levels, ew.code_bits
        encs = [enc] + [enc.clone() for _ in range(rot - 1)]
        table = kern.tile_table(enc, kb) if kern is not None else None
        for t in range(1, T + 1):
            st_name, dens = ew.structures[t - 1], ew.densities[t - 1]
            wd = kern.decode_level(enc, t, kb) if kern is not None else ec.extract_level(enc, t, kb, T)
            wds = [wd] + [wd.clone() for _ in range(rot - 1)]
            providers = []  # (name, make(x, weight), weights, note)
            if kern is not None:
                use_table = kern.tile_density(table, t) < 1.0
                tt = table if use_table else None
                providers.append(("elsa-fused", lambda x, e, tt=tt, t=t, kb=kb: kern.elsa_linear(x, e, t, kb, tile_table=tt),
                                  encs, "tile table" if use_table else "no tile table (no empty tile)"))
            providers.append(("elsa-cached", lambda x, wt: F.linear(x, wt), wds, ""))
            if _semi_ok(st_name) and ctx.semi_supported:
                try:
                    providers.append(("semi-structured", lambda x, wt: F.linear(x, wt),
                                      [kern.to_semi_structured(wt) for wt in wds], ""))
                except ec.ELSAError as e:
                    log(f"  semi-structured unavailable for {n}x{k} {dname}: {e}")
            if st_name.startswith("block"):
                try:
                    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
                        warnings.simplefilter("ignore", UserWarning)
                        wbs = [wt.to_sparse_bsr((64, 64)) for wt in wds]
                    providers.append(("bsr", lambda x, wt: (wt @ x.mT).mT, wbs, ""))
                except (RuntimeError, NotImplementedError, TypeError) as e:
                    log(f"  bsr unavailable for {n}x{k} {dname}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            providers = _check_outputs(ctx, providers, xs[ms[0]], wd, f"{ms[0]}x{n}x{k} {dname} level {t} ({st_name})")
            entries += [(prov, t, st_name, dens, make, weights, note) for prov, make, weights, note in providers]
            del wd, wds
        del ew, enc, encs, table

    def cycle(make, weights, x):
        return _Cycle([(lambda wt=wt: make(x, wt)) for wt in weights])

    for m in ms:
        x = xs[m]
        fns = [cycle(e[4], e[5], x) for e in entries]
        graphs = False
        if ctx.gpu:
            for fn in fns:  # first calls outside any graph capture (Triton autotuning, lazy init)
                try:
                    fn()
                except (RuntimeError, NotImplementedError, TypeError, ValueError, ec.ELSAError):
                    pass  # reported by the one-by-one fallback below
            torch.cuda.synchronize()
            graphs = timer.choose_graphs(fns[0])
            log(f"  timing {m}x{n}x{k} {dname}: {'CUDA graphs' if graphs else 'do_bench'}, {rot} rotating weight copies")
        try:
            stats = timer.round_robin(fns, graphs=graphs)
        except (RuntimeError, NotImplementedError, TypeError, ValueError, ec.ELSAError) as e:
            # one provider failing must not lose the group: fall back to one by one
            log(f"  round-robin timing failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); timing one by one")
            stats = []
            for e_, fn in zip(entries, fns):
                try:
                    stats.append(timer(fn, graphs=graphs))
                except (RuntimeError, NotImplementedError, TypeError, ValueError, ec.ELSAError) as e2:
                    log(f"  {e_[0]} failed for {m}x{n}x{k} {dname} level {e_[1]}: {type(e2).__name__}: {str(e2).splitlines()[0][:160]}")
                    if ctx.gpu:
                        torch.cuda.synchronize()
                    stats.append(None)
        for (prov, t, st_name, dens, _, _, note), st in zip(entries, stats):
            if st is not None:
                res.add("linear", prov, f"{m}x{n}x{k}", dtype, t, st_name, dens, st, note=note,
                        nbytes=(m * k + n * k + m * n) * elt, flops=2.0 * m * n * k)
    del w, xs, entries
