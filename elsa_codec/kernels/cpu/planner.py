"""Which packed format serves a sparse level on this CPU, and at which batch sizes: measured.

A sparse level pays on a CPU only where its packed product beats the dense ``F.linear`` of the
same level, and that depends on the shape, dtype, density, structure, thread count and the CPU
itself (AMX or AVX-512 dense GEMMs, cache sizes). So the ``sparse-cpu`` backend measures
(:func:`calibrate`): once per distinct ``(shape, dtype, density, structure, threads)``, it times
every candidate format (:func:`candidates`) against dense at the batch-size buckets
:data:`BUCKETS` (M = input rows: 1 decode token, ... 256 prompt tokens; each bucket at the top of
the M it routes, since a packed product's ratio to dense grows with M) on a row slice of the real
weight, in :data:`ROUNDS` interleaved rounds, and keeps one :class:`Plan`: the format with the
largest gain (plus a second one for the buckets where it measured at least 10% faster), and per bucket
which of them or dense serves it. A bucket is served packed only where its ratio (the median of
the rounds' packed / dense times) plus :data:`SPREAD_Z` times its spread (half the trimmed range
of the rounds' ratios) is at most :data:`MARGIN`: a noisy measurement serves dense, never a
single lucky sample. A bucket whose decision the spread leaves open is measured again and its
rounds pooled. The slice sits in cache, a model's forward streams its weights: every time is
bounded below by its bytes at the measured memory bandwidth (:func:`stream_bandwidth`). A call
with ``M`` rows takes the route of its bucket (:func:`bucket_of`).

- Each plan records the conditions it was measured under (:func:`conditions`: threads, load
  average, CPU model, instruction set); :func:`check_plan` times a kept plan's packed routes
  against dense again (a short interleaved timing) and names the buckets that disagree beyond
  noise. Keeping plans (memory, disk, the re-measuring rules) is :mod:`.plans`'s job.
- Cost: 70-250 ms per distinct key (every bucket measured; :data:`BUDGET_S` caps it at 300 ms),
  plus a second measurement of the buckets left open; a bucket left when the budget is spent
  serves dense, its ratio recorded as the larger of 1, the last measured ratio and the cost
  model's.
- ``ELSA_CPU_CALIBRATE=0`` turns measuring off: :func:`cost_model` decides instead (documented
  there; no timing, no disk).
- A calibration that fails, or whose packed product disagrees with dense (NaN, wrong values),
  serves that level dense, with one warning: never a wrong result.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F

from ...errors import ELSAError
from ...format.bits import extract_level
from ...format.structure import parse_structure
from .packed import FORMATS, pack_level, sparse_linear

__all__ = ["BUCKETS", "BUDGET_S", "MARGIN", "MARGINS", "Plan", "bucket_of", "calibrate", "candidates", "check_plan", "conditions",
           "cost_model", "machine_busy", "stream_bandwidth"]

#: Batch-size buckets a plan routes, each measured at the most input rows M it routes (:func:`bucket_of`):
#: 1 (decode), 8, 16, 64, 128, 256 (prefill and more).
BUCKETS = (1, 8, 16, 64, 128, 256)
#: Seconds of measuring per distinct key (shape, dtype, density, structure, threads) after which
#: the buckets left serve dense (a 4096x4096 layer measures all six in 70-250 ms).
BUDGET_S = 0.3
#: The packed product serves a bucket where it measured at most this fraction of dense.
MARGIN = 0.95
#: Per bucket of :data:`BUCKETS`, the margin a measured ratio must clear: :data:`MARGIN`, and less at
#: M = 64, 128 and 256, where the row slice is least like the whole layer: the two-point fit of
#: :func:`_measure_bucket` put dense ``F.linear`` of a 4096x4096 float32 layer at M = 64 19% above its
#: measured time (the packed ratios come out that much low), and before that fit a 2:4 level measured
#: 0.90-0.94x on the slice against 1.12x on the layer at M = 256 (bench/results/cpu-batch-xeon).
MARGINS = (MARGIN, MARGIN, MARGIN, 0.9, 0.85, 0.8)
#: A bucket b is packed only where ratio + SPREAD_Z * spread <= MARGINS[b] (spread: :func:`ratio_stats`).
SPREAD_Z = 2.0
#: Interleaved rounds of one measurement (dense and every candidate once per round).
ROUNDS = 5
#: Seconds one timing sample lasts at least (short calls are repeated within a sample).
MIN_SAMPLE_S = 50e-6
#: A second format serves a bucket only where its ratio is at most this fraction of the primary's.
SECOND_GAIN = 0.9
#: Rounds of the short timing with which :func:`check_plan` checks a kept plan's routes.
CHECK_ROUNDS = 3
#: A kept ratio and a new one disagree beyond noise when they differ by more than this fraction
#: of the kept one and by more than SPREAD_Z times their spreads together.
CHECK_TOLERANCE = 0.15
#: Load of other processes (runnable threads beyond the measurement's own, :func:`conditions`)
#: at or above which a machine counts as busy.
BUSY_LOAD = 0.5
#: Samples of the other processes' runnable threads whose median is ``other_load``.
OTHER_SAMPLES = 7
#: Bytes of the weight slice a measurement streams at M = 1 (past L2, so the slice is not
#: served from the core's own cache), and the FLOPs that cap the slice at larger M.
SLICE_BYTES = 4 << 20
SLICE_FLOPS = 100e6
#: Bytes :func:`stream_bandwidth` reads (past a 32 MiB last-level cache).
STREAM_PROBE_BYTES = 64 << 20
#: Reads :func:`stream_bandwidth` keeps the best of. It bounds every M = 1 time from below, once per
#: process: with 3 reads one slow probe pinned a plan's M = 1 buckets at their floors (a 2:4 level's
#: bitmask 0.90x +- 0.00 against 0.51-0.60x measured again at once), 7 cost ~60 ms.
STREAM_REPS = 7
_STREAM_BW: dict = {}
#: Relative error of the packed product against dense that a calibration accepts, per dtype.
_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
ENV = "ELSA_CPU_CALIBRATE"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a sparse level is served on the CPU.

    Attributes:
        format: the primary packed format (one of ``packed.FORMATS``), None when no bucket is
            served packed; block: ``(R, C)`` of ``bsr``; group: ``(n, m)`` of ``nm``.
        packed: per bucket of :data:`BUCKETS`: 0 dense, 1 the primary format, 2 the second one.
        ratios: per bucket, the route's time / dense time (the best packed format's where the
            route is dense; NaN: not measured).
        source: ``"measured"``, ``"disk"`` (an earlier measurement, checked), ``"cost-model"``,
            ``"forced"`` (``cpu_max_tokens`` set) or ``"fallback"`` (a failed calibration).
        max_rows: set by a forced plan: calls with at most this many rows run the primary
            format, the rest dense (the buckets are then not used).
        second: ``(format, block, group)`` of a second packed format serving some buckets (a
            level is then packed twice; still fewer bytes than packed + decoded), or None.
        spreads: per bucket, the spread of ``ratios`` (:func:`ratio_stats`; 0 for the cost model).
        cands: the ``(format, block, group)`` candidates measured (empty for the cost model).
        table: per bucket, per candidate of ``cands``: ``(ratio, spread)``; what :func:`rechoose`
            decides from when one bucket is measured again.
        conditions: what the measurement ran under (:func:`conditions`), None: not recorded.
    """

    format: str | None
    block: tuple = (0, 0)
    group: tuple = (0, 0)
    packed: tuple = (0,) * len(BUCKETS)
    ratios: tuple = (math.nan,) * len(BUCKETS)
    source: str = "cost-model"
    max_rows: int | None = None
    second: tuple | None = None
    spreads: tuple = (0.0,) * len(BUCKETS)
    cands: tuple = ()
    table: tuple = ()
    conditions: dict | None = None

    @property
    def primary(self) -> tuple | None:
        return None if self.format is None else (self.format, tuple(self.block), tuple(self.group))

    def choice_for(self, m: int) -> tuple | None:
        """``(format, block, group)`` serving a call with ``m`` input rows, None for dense."""
        if self.format is None:
            return None
        if self.max_rows is not None:
            return self.primary if m <= self.max_rows else None
        route = self.packed[bucket_of(m)]
        return None if not route else self.primary if route == 1 else tuple(self.second)

    def serves_packed(self, m: int) -> bool:
        """Whether a call with ``m`` input rows runs a packed product."""
        return self.choice_for(m) is not None

    @property
    def choices(self) -> list:
        """The packed formats some call runs (packed at the level switch)."""
        if self.format is None:
            return []
        if self.max_rows is not None:
            return [self.primary] if self.max_rows > 0 else []
        used = {r for r in self.packed if r}
        return [c for r, c in ((1, self.primary), (2, self.second)) if r in used]

    @property
    def any_packed(self) -> bool:
        """Whether any call runs a packed product (the level is packed at the switch)."""
        return bool(self.choices)

    def route_names(self) -> list:
        """Per bucket, the name of what serves it: a format or ``"dense"``."""
        return ["dense" if not p or self.format is None else self.format if p == 1 else self.second[0]
                for p in self.packed]

    def describe(self) -> str:
        """One line: per bucket ``M=<b>: <format>|dense <ratio>x`` (``±<spread>`` where measured)."""
        if self.max_rows is not None:
            return f"{self.format} [packed for M<={self.max_rows}, dense above] ({self.source})"
        if not self.any_packed and self.source == "fallback":
            return "dense [every M: dense] (fallback)"
        parts = []
        for b, name, r, sp in zip(BUCKETS, self.route_names(), self.ratios, self.spreads):
            parts.append(f"M={b}: {name}" + ("" if math.isnan(r) else f" {r:.2f}x") + (f"±{sp:.2f}" if sp > 0 else ""))
        head = "+".join(c[0] for c in self.choices) or "dense"
        return f"{head} [{', '.join(parts)}] ({self.source})"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = [None if math.isnan(r) else r for r in self.ratios]
        d["table"] = [[[None if math.isnan(v) else v for v in cell] for cell in row] for row in self.table]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        """The plan of :meth:`to_json` (``source="disk"``). Raises ValueError / KeyError / TypeError
        on a document that is not a plan."""
        fmt, second = d["format"], d.get("second")
        if fmt is not None and fmt not in FORMATS or len(d["packed"]) != len(BUCKETS):
            raise ValueError(f"not a plan: {d!r}")
        if (second is not None and second[0] not in FORMATS) or (second is None and any(int(p) == 2 for p in d["packed"])):
            raise ValueError(f"not a plan: {d!r}")
        sec = None if second is None else (second[0], tuple(second[1]), tuple(second[2]))
        cands = tuple((c[0], tuple(c[1]), tuple(c[2])) for c in d.get("cands", ()))
        table = tuple(tuple((_num(c[0]), float(c[1])) for c in row) for row in d.get("table", ()))
        if any(c[0] not in FORMATS for c in cands) or (table and (len(table) != len(BUCKETS) or any(len(r) != len(cands) for r in table))):
            raise ValueError(f"not a plan: {d!r}")
        spreads = tuple(float(v) for v in d.get("spreads", (0.0,) * len(BUCKETS)))
        cond = d.get("conditions")
        if len(spreads) != len(BUCKETS) or (cond is not None and not isinstance(cond, dict)):
            raise ValueError(f"not a plan: {d!r}")
        return cls(fmt, tuple(d["block"]), tuple(d["group"]), tuple(int(p) for p in d["packed"]),
                   tuple(_num(r) for r in d["ratios"]), "disk", None, sec, spreads, cands, table, cond)


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _choose(cands: list, rows: list, source: str, spreads: list | None = None, cond: dict | None = None) -> "Plan":
    """The plan from per-bucket ratios ``rows[b][i]`` (and spreads ``spreads[b][i]``, default 0) of
    candidate ``i``: the primary format has the largest gain (:func:`_gain`); a second format is
    added where it measured at most :data:`SECOND_GAIN` of the primary's ratio (capped at 1) in some
    bucket, and serves only such buckets (closer calls are noise on a row slice: a 90% level's
    bitmask form measured 0.39-0.45x beside csr's 0.36-0.39x at M = 64, and cost 0.44x against csr's
    0.31x on the whole layer); each bucket's route serves it where its ratio + :data:`SPREAD_Z` x
    spread is at most its margin (:data:`MARGINS`), else dense."""
    n = len(cands)
    spreads = spreads or [[0.0] * n for _ in rows]
    i = min(range(n), key=lambda c: _gain([r[c] for r in rows]))

    def faster(r, j) -> bool:  # candidate j beats the primary by SECOND_GAIN in bucket row r
        return r[j] <= SECOND_GAIN * min(r[i], 1.0)

    best_j, best_extra = None, math.log(0.9)
    for j in range(n):
        if j == i:
            continue
        extra = sum(math.log(r[j] / min(r[i], 1.0)) for r in rows if faster(r, j))
        if extra <= best_extra:
            best_j, best_extra = j, extra
    routes, ratios, sps = [], [], []
    for r, sp, margin in zip(rows, spreads, MARGINS):
        second = best_j is not None and faster(r, best_j)
        ratio, spread, route = (r[best_j], sp[best_j], 2) if second else (r[i], sp[i], 1)
        routes.append(route if ratio + SPREAD_Z * spread <= margin else 0)
        ratios.append(ratio)
        sps.append(spread)
    if best_j is not None and 2 not in routes:
        best_j = None
    fmt, block, group = cands[i]
    table = tuple(tuple((r[c], sp[c]) for c in range(n)) for r, sp in zip(rows, spreads))
    return Plan(fmt, block, group, tuple(routes), tuple(ratios), source, None,
                None if best_j is None else tuple(cands[best_j]), tuple(sps),
                tuple(tuple(c) for c in cands), table, cond)


def rechoose(plan: Plan, bucket_rows: dict, source: str) -> Plan:
    """``plan`` decided again after some buckets were measured again: ``bucket_rows`` maps a
    bucket index to its new ``(ratios, spreads)`` per candidate of ``plan.cands``."""
    rows = [[c[0] for c in row] for row in plan.table]
    spreads = [[c[1] for c in row] for row in plan.table]
    for b, (r, sp) in bucket_rows.items():
        rows[b], spreads[b] = list(r), list(sp)
    return _choose(list(plan.cands), rows, source, spreads, plan.conditions)


def bucket_of(m: int) -> int:
    """Index in :data:`BUCKETS` of a call with ``m`` input rows: 1 -> 1; 2-8 -> 8; 9-16 -> 16;
    17-64 -> 64; 65-128 -> 128; more -> 256."""
    for i, top in enumerate(BUCKETS[:-1]):
        if m <= top:
            return i
    return len(BUCKETS) - 1


def candidates(structure) -> list[tuple]:
    """The ``(format, block, group)`` a level of ``structure`` is measured in: unstructured ->
    csr, bitmask; ``N:M`` -> those and nm; ``block:RxC`` with ``R >= 8`` -> bsr and csr."""
    s = parse_structure(structure)
    out = [("csr", (0, 0), (0, 0)), ("bitmask", (0, 0), (0, 0))]
    if s.kind == "nm" and s.m <= 256:
        out.append(("nm", (0, 0), (s.n, s.m)))
    if s.kind == "block" and s.r >= 8:
        out = [("bsr", (s.r, s.c), (0, 0)), out[0]]
    return out


# -- the cost model (ELSA_CPU_CALIBRATE=0) --------------------------------------------------------
#: Machine balance of the cost model: dense FLOPs per byte of weight streamed; per format, the
#: fraction of the dense streaming rate its M = 1 product reaches (csr and nm gather their inputs)
#: and of the dense FLOP rate its M > 1 product reaches per kept weight. Fitted by hand to
#: 4096x4096 layers on the project's 2-core AVX-512 machines (bench/results/cpu-sparse), float32;
#: 16-bit dtypes multiply the FLOP fraction by :data:`HALF_FLOPS` (their dense GEMMs use AMX or
#: AVX-512 BF16 / FP16 dot products; the packed products convert to float32).
FLOPS_PER_BYTE = 8.0
STREAM = {"csr": 0.7, "bitmask": 1.0, "nm": 0.7, "bsr": 1.0}
EFFICIENCY = {"csr": 0.7, "bitmask": 0.35, "nm": 0.6, "bsr": 0.9}
HALF_FLOPS = 0.3
#: Layers under this many weight bytes run their dense GEMV from cache; the model keeps them
#: dense above :data:`SMALL_LAYER_DENSITY`.
SMALL_LAYER_BYTES = 1 << 20
SMALL_LAYER_DENSITY = 0.15


def _packed_bytes(fmt: str, n: int, k: int, es: int, density: float, group) -> float:
    nnz = density * n * k
    if fmt == "csr":
        return nnz * (es + (2 if k <= 65536 else 4)) + 8 * n
    if fmt == "bitmask":
        return nnz * es + n * k / 8 + 8 * n
    if fmt == "nm":
        return n * math.ceil(k / group[1]) * group[0] * (es + 1)
    return nnz * es


def _gain(ratios) -> float:
    """How much a format saves over the buckets (sum of log ratios, dense-served buckets count 0)."""
    return sum(math.log(min(r, 1.0)) for r in ratios)


def cost_model(shape, dtype: torch.dtype, density: float, structure, cands=None) -> Plan:
    """The plan without measuring. Time of a call with M rows, in units of one dense weight byte
    streamed: dense ``max(N K es, 2 N K M / FLOPS_PER_BYTE)``; a format ``max(bytes / STREAM[f],
    2 nnz M / (FLOPS_PER_BYTE * EFFICIENCY[f]))`` (bytes: its arrays at ``density``; the FLOP
    fraction times :data:`HALF_FLOPS` for 16-bit dtypes). The format with the largest gain over
    :data:`BUCKETS` wins (:func:`calibrate`'s rule); a bucket is packed where its ratio is at most
    its margin (:data:`MARGINS`). Layers under :data:`SMALL_LAYER_BYTES` above :data:`SMALL_LAYER_DENSITY`
    stay dense."""
    n, k = shape
    es = dtype.itemsize
    if n * k * es < SMALL_LAYER_BYTES and density > SMALL_LAYER_DENSITY:
        return Plan(None, source="cost-model")
    cands = cands or candidates(structure)
    rows = [[] for _ in BUCKETS]
    for fmt, block, group in cands:
        for b, r in enumerate(_model_ratios(fmt, n, k, es, density, group)):
            rows[b].append(r)
    return _choose(cands, rows, "cost-model")


def _model_ratios(fmt: str, n: int, k: int, es: int, density: float, group) -> list:
    """The cost model's time / dense time of ``fmt`` at each bucket."""
    eff = EFFICIENCY[fmt] * (1.0 if es == 4 else HALF_FLOPS)
    out = []
    for m in BUCKETS:
        dense = max(n * k * es, 2 * n * k * m / FLOPS_PER_BYTE)
        mem = _packed_bytes(fmt, n, k, es, density, group) / STREAM[fmt]
        out.append(max(mem, 2 * density * n * k * m / (FLOPS_PER_BYTE * eff)) / dense)
    return out


# -- measuring -------------------------------------------------------------------------------------
def _slice_rows(n: int, k: int, es: int, m: int, align: int) -> int:
    rows = max(128, min(SLICE_BYTES // (k * es), int(SLICE_FLOPS // (2 * k * m))))
    rows = -(-rows // align) * align
    return min(n, rows)


def _best_of(fns: list, reps: int) -> list[float]:
    """The fastest of ``reps`` interleaved rounds of each function, in seconds."""
    return [min(col) for col in zip(*_rounds(fns, reps))]


def _rounds(fns: list, reps: int, inner: int = 1) -> list[list[float]]:
    """Seconds of one call of each function in each of ``reps`` interleaved rounds (the mean of
    ``inner`` calls in a row): ``[round][function]``."""
    out = []
    for _ in range(reps):
        row = []
        for f in fns:
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            row.append((time.perf_counter() - t0) / inner)
        out.append(row)
    return out


def ratio_stats(samples) -> tuple[float, float]:
    """``(ratio, spread)`` of the per-round ratios ``samples``: their median, and half their range
    after dropping the lowest and highest fifth (``n // 5`` each side; the whole range below 5)."""
    s = sorted(samples)
    n = len(s)
    j = n // 5
    mid = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return mid, 0.5 * (s[n - 1 - j] - s[j])


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    if not torch.isfinite(y).all() and torch.isfinite(ref).all():
        return False
    err = (y.float() - ref.float()).abs().max().item()
    return err <= _TOL[ref.dtype] * (1.0 + ref.float().abs().max().item())


def _time_slice(w2d, level, code_bits, cands, m, rows, threads, packs, reps) -> list[list[float]]:
    """Seconds of dense and of each candidate at ``m`` rows on the first ``rows`` rows of ``w2d``,
    per interleaved round: ``[round][0 dense, 1.. candidates]`` (packs: cache of (rows, candidate)
    -> packed slice). Raises ELSAError where a product disagrees with dense."""
    ws = w2d[:rows]
    if (rows, "dense") not in packs:
        packs[(rows, "dense")] = extract_level(ws, level, code_bits)
    dense_w = packs[(rows, "dense")]
    ps = []
    for c in cands:
        if (rows, c) not in packs:
            packs[(rows, c)] = pack_level(ws, level, code_bits, c[0], c[1], group=c[2], threads=threads)
        ps.append(packs[(rows, c)])
    x = torch.randn(m, w2d.shape[1], generator=torch.Generator().manual_seed(m)).to(w2d.dtype)
    ref = F.linear(x, dense_w)
    for c, p in zip(cands, ps):
        if not _agrees(sparse_linear(x, p, threads=threads), ref):
            raise ELSAError(f"the {c[0]} product disagrees with dense at M={m}")
    fns = [lambda: F.linear(x, dense_w)] + [lambda p=p: sparse_linear(x, p, threads=threads) for p in ps]
    warm = _rounds(fns, 1)[0]  # first calls touch the packed slice and x
    inner = max(1, min(64, math.ceil(MIN_SAMPLE_S / max(1e-9, min(warm)))))
    return _rounds(fns, reps, inner)


def stream_bandwidth(dtype: torch.dtype | None = None) -> float:
    """Bytes per second this process streams from memory at torch's thread count, over
    :data:`STREAM_PROBE_BYTES` (past the last-level cache), best of :data:`STREAM_REPS`; measured once per thread
    count and dtype. ``dtype`` None: ``tensor.sum()`` (what the packed kernels can reach); a dtype:
    dense ``F.linear`` at M = 1 on a weight of that dtype (its GEMV may run below the read
    bandwidth: bfloat16 ~8 GB/s against ~20 GB/s on this project's machine)."""
    key = (torch.get_num_threads(), dtype)
    bw = _STREAM_BW.get(key)
    if bw is None:
        if dtype is None:
            buf = torch.ones(STREAM_PROBE_BYTES // 4)
            bw = buf.numel() * 4 / _best_of([buf.sum], STREAM_REPS)[0]
        else:
            k = 4096
            w = torch.ones(STREAM_PROBE_BYTES // (k * dtype.itemsize), k, dtype=dtype)
            x = torch.ones(1, k, dtype=dtype)
            bw = w.numel() * dtype.itemsize / _best_of([lambda: F.linear(x, w)], STREAM_REPS)[0]
        _STREAM_BW[key] = bw
    return bw


def _measure_bucket(w2d, level, code_bits, cands, m, threads, packs, reps: int = ROUNDS) -> list[list[float]]:
    """Per candidate, its packed / dense time ratio in each of ``reps`` interleaved rounds at ``m``
    rows for the whole weight (summarised by :func:`ratio_stats`). Where the slice measured is
    smaller than the weight, each time is extrapolated to all rows through the time of an
    ``align``-row slice (8 rows, or one block row), measured apart: the call's fixed cost (cutting x
    into panels, the call itself, a small GEMM's set-up), not scaled. At M = 128 a two-point fit of
    dense ``F.linear`` predicted 34.8 ms (float32) / 7.3 ms (bfloat16) for a 4096x4096 layer that took
    34.2 / 7.9 ms; scaling the slice's time alone predicted 39.3 / 9.6 ms, and with only the panel cut
    as fixed cost a 90% csr level's ratio came out 0.42-0.52x against 0.28x measured on the layer.
    The slice sits in cache, but a model's forward streams every weight from memory: each time is
    at least its bytes at :func:`stream_bandwidth` (dense at M = 1: its own GEMV's rate)."""
    n, k = w2d.shape
    align = max([c[1][0] for c in cands] + [8])
    rows = _slice_rows(n, k, w2d.element_size(), m, align)
    t = _time_slice(w2d, level, code_bits, cands, m, rows, threads, packs, reps)
    few = min(n, align)
    if few < rows < n:
        small = _time_slice(w2d, level, code_bits, cands, m, few, threads, packs, 3)
        fixed = [min(col) for col in zip(*small)]
        scale = (n - few) / (rows - few)
        t = [[max(ti - fi, 0.0) * scale + fi for ti, fi in zip(r, fixed)] for r in t]
    dense_bw = stream_bandwidth(w2d.dtype) if m == 1 else stream_bandwidth()
    floors = [w2d.numel() * w2d.element_size() / dense_bw] + [
        packs[(rows, c)].nbytes * n / rows / stream_bandwidth() for c in cands]
    t = [[max(ti, fl) for ti, fl in zip(r, floors)] for r in t]
    return [[r[1 + i] / r[0] for r in t] for i in range(len(cands))]


def _summary(samples: list) -> tuple[list, list]:
    """``(ratios, spreads)`` per candidate of :func:`_measure_bucket`'s samples."""
    stats = [ratio_stats(s) for s in samples]
    return [r for r, _ in stats], [sp for _, sp in stats]


def _open(ratios: list, spreads: list, margin: float = MARGIN) -> bool:
    """Whether the best candidate's decision is left open by the spread: its ratio is at most
    ``margin`` but its ratio + :data:`SPREAD_Z` x spread is above."""
    r, sp = min(zip(ratios, spreads))
    return r <= margin < r + SPREAD_Z * sp


def measure_bucket(w2d, level, code_bits, cands, b: int, threads, packs) -> tuple[list, list]:
    """``(ratios, spreads)`` per candidate at bucket ``b``: :data:`ROUNDS` rounds, and where the
    decision is left open (:func:`_open`) as many again, pooled."""
    samples = _measure_bucket(w2d, level, code_bits, cands, BUCKETS[b], threads, packs)
    r, sp = _summary(samples)
    if _open(r, sp, MARGINS[b]):  # a near call on a shared machine: measure again, decide on the pooled rounds
        more = _measure_bucket(w2d, level, code_bits, cands, BUCKETS[b], threads, packs)
        r, sp = _summary([a + m for a, m in zip(samples, more)])
    return r, sp


def calibrate(w2d: torch.Tensor, level: int, code_bits: int, structure, cands=None, *,
              threads: int | None = None, budget_s: float = BUDGET_S) -> Plan:
    """Measure the candidate formats of ``level`` of the encoded weight ``w2d`` `[out_features,
    in_features]` against dense at every bucket of :data:`BUCKETS` (ascending, until ``budget_s``
    seconds are spent; :func:`measure_bucket`: interleaved rounds, a bucket left open by its spread
    measured again; a later bucket serves dense, its ratio recorded as the larger of 1, the last
    measured ratio and the cost model's: an unmeasured bucket is never routed packed on hope) and return the plan
    (:func:`_choose`), with the :func:`conditions` it was measured under. Each time is at least
    the weight's bytes (dense, or packed) at the memory bandwidth of :func:`stream_bandwidth`.

    Raises:
        ELSAError: a product disagrees with dense; RuntimeError / ELSAError from the kernels.
    """
    cands = cands or candidates(structure)
    nt = threads or torch.get_num_threads()
    packs, rows, spreads = {}, [], []
    stream_bandwidth(), stream_bandwidth(w2d.dtype)  # measured once per process, outside the budget
    cond = conditions(nt)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in range(len(BUCKETS)):
            if rows and time.perf_counter() - t0 > budget_s:
                rows.append([max(1.0, r, _unmeasured(w2d, c, packs, b)) for r, c in zip(rows[-1], cands)])
                spreads.append(list(spreads[-1]))
                continue
            r, sp = measure_bucket(w2d, level, code_bits, cands, b, nt, packs)
            rows.append(r)
            spreads.append(sp)
    cond["other_load"] = max(cond["other_load"], conditions(nt)["other_load"])  # busy at the start or the end
    return _choose(cands, rows, "measured", spreads, cond)


def check_plan(plan: Plan, w2d: torch.Tensor, level: int, code_bits: int, *, threads: int | None = None) -> list[int]:
    """The buckets whose packed route ``plan`` (a kept one) no longer holds: each bucket it serves
    packed is timed again, route against dense, :data:`CHECK_ROUNDS` interleaved rounds on the
    slice; it disagrees where the new ratio differs from the kept one by more than
    :data:`CHECK_TOLERANCE` of it and by more than :data:`SPREAD_Z` x both spreads, or where the
    route no longer clears its margin (:data:`MARGINS`) by its spread. Costs a few ms per packed bucket.

    Raises:
        ELSAError / RuntimeError: from the kernels (the caller re-measures).
    """
    nt = threads or torch.get_num_threads()
    packs, bad = {}, []
    with torch.no_grad():
        for b, route in enumerate(plan.packed):
            if not route or plan.max_rows is not None:
                continue
            choice = plan.primary if route == 1 else tuple(plan.second)
            r, sp = ratio_stats(_measure_bucket(w2d, level, code_bits, [choice], BUCKETS[b], nt, packs, CHECK_ROUNDS)[0])
            kept, kept_sp = plan.ratios[b], plan.spreads[b]
            moved = abs(r - kept) > max(CHECK_TOLERANCE * kept, SPREAD_Z * (sp + kept_sp))
            if moved or r + SPREAD_Z * sp > MARGINS[b]:
                bad.append(b)
    return bad


def machine_busy(cond: dict | None) -> bool:
    """Whether conditions recorded by :func:`conditions` describe a busy machine: other
    processes' load at least :data:`BUSY_LOAD` (None, an unrecorded plan: True)."""
    return cond is None or float(cond.get("other_load", math.inf)) >= BUSY_LOAD


def conditions(threads: int) -> dict:
    """What a measurement runs under: ``threads``, the 1-minute load average ``load`` (for the
    record: it lags a minute behind), ``other_load`` = the runnable threads of other processes
    now (``/proc/loadavg`` less this process's own, the median of :data:`OTHER_SAMPLES` samples 1 ms
    apart: a kernel thread woken for a moment is not load), ``cpu``
    (model), ``isa`` (the kernels' instruction set), ``time`` (UTC, ISO 8601). A plan measured
    with ``other_load`` >= :data:`BUSY_LOAD` (at its start or its end) counts as measured on a
    busy machine (:func:`machine_busy`)."""
    from ...native import cpu_isa, cpu_model

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    samples = []
    for i in range(OTHER_SAMPLES):
        if i:
            time.sleep(1e-3)
        samples.append(_others_running())
    return {"threads": int(threads), "load": round(load, 2), "other_load": float(sorted(samples)[OTHER_SAMPLES // 2]),
            "cpu": cpu_model(), "isa": cpu_isa(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _others_running() -> int:
    """Runnable threads of other processes now: ``/proc/loadavg``'s running count less this
    process's threads in state R (its OpenMP workers spin after a parallel region); 0 if unknown."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            total = int(f.read().split()[3].split("/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                own += f.read().rpartition(")")[2].split()[0] == "R"
        return max(0, total - own)
    except (OSError, ValueError, IndexError):
        return 0


def _unmeasured(w2d, cand, packs, b: int) -> float:
    """The cost model's ratio of ``cand`` at bucket ``b``, at the density of its packed slice."""
    p = next(v for k, v in packs.items() if k[1] == cand)
    n, k = w2d.shape
    density = p.nnz / max(1, p.shape[0] * p.shape[1])
    return _model_ratios(cand[0], n, k, w2d.element_size(), density, cand[2])[b]


def calibration_on() -> bool:
    """Whether plans are measured (``ELSA_CPU_CALIBRATE`` unset or not ``0`` / ``off`` / ``false``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")
