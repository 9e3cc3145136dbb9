"""Pick the level a machine serves: measure every level of a served model, keep the densest that
fits a latency and a memory budget.

ELSA (Halvachi et al., arXiv 2312.06872) ships one file holding several nested sparse networks;
each machine picks its level. :func:`choose_level` makes that pick from measurements on the machine
itself: for every level ``1..T+1`` it times the model on example inputs (median of ``runs`` calls)
and adds up the bytes the served model holds for that level (its own data structures, not the
process's RSS), then selects the densest level within the budget. :class:`LevelTable` is the
result: the figures of every level, the chosen level and the budget (text table, dict, JSON).
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from ..checks import check_module
from ..errors import ELSAError, ELSATypeError
from .base import ELSAModule
from .batch_norm import LevelBatchNormMixin
from .swap import elsa_modules, levels, set_level

__all__ = ["choose_level", "LevelTable", "LevelRow"]

MIB = 1 << 20
_ORDER = "choose_level(model, example_inputs, max_latency_ms=..., max_memory_mib=...)"


@dataclasses.dataclass(frozen=True)
class LevelRow:
    """The figures of one level: ``level`` (``1..T``, ``T+1`` = dense), its mask ``structure``
    (``"dense"`` for ``T+1``), recorded ``sparsity`` (fraction of zeros over the encoded weights),
    ``median_ms`` (median latency of one call on the example inputs, milliseconds) and
    ``resident_mib`` (bytes the served model holds for the level, MiB = 2**20 bytes); from the
    checkpoint's quality report when it has one (``elsa convert --calibration``), ``cosine`` (mean
    cosine of the final hidden states to the original model) and ``perplexity`` (causal LMs),
    else None."""

    level: int
    structure: str
    sparsity: float
    median_ms: float
    resident_mib: float
    cosine: float | None = None
    perplexity: float | None = None


@dataclasses.dataclass(frozen=True, repr=False)
class LevelTable:
    """What :func:`choose_level` measured: one :class:`LevelRow` per level (sparsest first,
    dense last), the ``chosen`` level (None in the table an :class:`~elsa_codec.errors.ELSAError`
    carries when no level met the budget), the budget (None = no bound) and the timing counts.

    ``str()`` / ``repr()`` give an aligned text table (``*`` marks the chosen row);
    :meth:`to_dict` / :meth:`to_json` the JSON form ``{"rows": [...], "chosen": t, "budget":
    {"max_latency_ms": ..., "max_memory_mib": ...}, "warmup": w, "runs": r}``.
    """

    rows: tuple
    chosen: int | None
    max_latency_ms: float | None = None
    max_memory_mib: float | None = None
    warmup: int = 1
    runs: int = 5
    min_quality: float | None = None

    @property
    def budget(self) -> dict:
        """``{"max_latency_ms": ..., "max_memory_mib": ..., "min_quality": ...}`` (None = no bound)."""
        return {"max_latency_ms": self.max_latency_ms, "max_memory_mib": self.max_memory_mib,
                "min_quality": self.min_quality}

    def row(self, level: int) -> LevelRow:
        """The row of ``level``; ELSAError if the table has none."""
        for r in self.rows:
            if r.level == level:
                return r
        raise ELSAError(f"LevelTable: no row for level {level!r}; levels are {[r.level for r in self.rows]}")

    def to_dict(self) -> dict:
        """The table as plain JSON types (rows as dicts, sparsest first)."""
        return {"rows": [dataclasses.asdict(r) for r in self.rows], "chosen": self.chosen,
                "budget": self.budget, "warmup": self.warmup, "runs": self.runs}

    def to_json(self, indent: int | None = None) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        cols = [c for c in ("cosine", "perplexity") if any(getattr(r, c) is not None for r in self.rows)]
        head = ("", "level", "structure", "sparsity", "median ms", "resident MiB", *cols)
        body = [("*" if r.level == self.chosen else "", str(r.level), r.structure, f"{100 * r.sparsity:.1f} %",
                 f"{r.median_ms:.4g}", f"{r.resident_mib:.4g}",
                 *("-" if getattr(r, c) is None else f"{getattr(r, c):.4g}" for c in cols)) for r in self.rows]
        width = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
        left = (True, False, True) + (False,) * (len(head) - 3)
        lines = ["  ".join(c.ljust(w) if lj else c.rjust(w) for c, w, lj in zip(line, width, left)).rstrip()
                 for line in [head, *body]]
        lat = "none" if self.max_latency_ms is None else f"<= {self.max_latency_ms:g} ms"
        mem = "none" if self.max_memory_mib is None else f"<= {self.max_memory_mib:g} MiB"
        qual = "" if self.min_quality is None else f", cosine >= {self.min_quality:g}"
        pick = "none (no level meets the budget)" if self.chosen is None else f"level {self.chosen} (*)"
        lines.append(f"budget: latency {lat}, memory {mem}{qual}; median of {self.runs} runs; chosen: {pick}")
        if cols:
            lines.append("cosine / perplexity: the checkpoint's quality report (elsa convert --calibration)")
        return "\n".join(lines)

    __repr__ = __str__


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def resident_bytes(model: nn.Module) -> int:
    """Bytes the served ``model`` holds for its current level, from its own data structures.

    Per ELSA module: the packed forms of the current level (``sparse-cpu``) when one is in use,
    else the encoded weight (a weight tied between modules once; it counts when any module using
    it reads it); plus the current level's runtime caches (the decoded weight of the reference
    path or of a dense-routed batch size, the Triton tile table). Packed forms of other levels
    that ``packed_cache_bytes`` keeps for fast switching are not counted. Then every other
    parameter and buffer of the model once (tied tensors once) and the per-level batch-norm
    statistics.
    """
    total, weights = 0, {}
    for _, m in elsa_modules(model):
        t = m.level
        sparse = t <= m.num_levels
        packed = m._packed.level_nbytes(t) if sparse and m._sparse_cpu else 0
        total += packed
        w = m.weight
        entry = weights.setdefault(id(w), [w, False])
        entry[1] = entry[1] or not packed
        if m._cached is not None and m._cached[0][0] == t:
            total += _nbytes(m._cached[1])
        if sparse and m._triton and m._tiles is not None:
            total += _nbytes(m._tiles[1])
    total += sum(_nbytes(w) for w, read in weights.values() if read)
    seen = set(weights)
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _nbytes(t)
    for m in model.modules():
        if isinstance(m, LevelBatchNormMixin):
            total += sum(_nbytes(v) for per in m.level_stats.values() for v in per.values())
    return total


def _bound(value, name: str) -> float | None:
    """A budget: None or a positive number (inf = no bound, returned as None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ELSATypeError(f"choose_level: {name} must be None or a positive number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or v <= 0:
        raise ELSAError(f"choose_level: {name} must be a positive number (or None: no bound), got {value!r}")
    return None if math.isinf(v) else v


def _count(value, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ELSATypeError(f"choose_level: {name} must be an int >= {least}, got {type(value).__name__} {value!r}")
    if value < least:
        raise ELSAError(f"choose_level: {name} must be an int >= {least}, got {value}")
    return int(value)


def _as_call(example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise ELSATypeError(f"choose_level: example_inputs is a mapping with a key {bad[0]!r} that is not a str; "
                                "a mapping gives keyword arguments: model(**example_inputs)")
        return (), dict(example_inputs)
    raise ELSATypeError(f"choose_level: example_inputs must be a Tensor (model(x)), a tuple of positional arguments "
                        f"(model(*args)) or a dict of keyword arguments (model(**kwargs)), got {type(example_inputs).__name__}")


def _sync_fn(model: nn.Module):
    """A function waiting for the model's CUDA devices (no-op on the CPU)."""
    devs = sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"})
    if not devs:
        return lambda: None

    def sync():
        for d in devs:
            torch.cuda.synchronize(d)
    return sync


def _median_ms(model, args, kwargs, warmup: int, runs: int, sync) -> float:
    """Median wall time of ``runs`` calls of ``model(*args, **kwargs)`` after ``warmup`` untimed ones, ms."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(*args, **kwargs)
            sync()
        for _ in range(runs):
            t0 = time.perf_counter()
            model(*args, **kwargs)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _snapshot(model: nn.Module) -> list:
    """The level (and backend request) of every levelled module, to put back."""
    return [(m, m.level, getattr(m, "backend_request", None)) for m in model.modules()
            if isinstance(m, (ELSAModule, LevelBatchNormMixin))]


def _restore(snap: list) -> None:
    for m, lv, req in snap:
        if req is not None and m.backend_request != req:
            m.backend = req
        if lv is not None:
            m.set_level(lv)


def _excess(r: LevelRow, lat: float | None, mem: float | None, qual: float | None = None) -> float:
    """The sum of the relative excesses of ``r`` over the bounds it violates (0: it fits); a
    cosine below ``qual`` counts its shortfall (``qual - cosine``)."""
    out = 0.0
    if lat is not None and r.median_ms > lat:
        out += r.median_ms / lat - 1.0
    if mem is not None and r.resident_mib > mem:
        out += r.resident_mib / mem - 1.0
    if qual is not None and r.cosine < qual:
        out += qual - r.cosine
    return out


def _no_fit(table: LevelTable, lat, mem, was, qual=None) -> ELSAError:
    best = min(table.rows, key=lambda r: (_excess(r, lat, mem, qual), -r.level))
    over = []
    if lat is not None and best.median_ms > lat:
        over.append(f"latency {100 * (best.median_ms / lat - 1):.3g} % over the {lat:g} ms bound")
    if mem is not None and best.resident_mib > mem:
        over.append(f"memory {100 * (best.resident_mib / mem - 1):.3g} % over the {mem:g} MiB bound")
    if qual is not None and best.cosine < qual:
        over.append(f"cosine {best.cosine:.4g} under the {qual:g} bound")
    err = ELSAError(
        f"choose_level: no level meets the budget; the closest is level {best.level} ({best.structure}, sparsity "
        f"{best.sparsity:.3f}): median {best.median_ms:.4g} ms, resident {best.resident_mib:.4g} MiB "
        f"({', '.join(over)}). The model stays at level {was}.\n{table}")
    err.table = table
    return err


def _checked(model, example_inputs, max_latency_ms, max_memory_mib, warmup, runs) -> tuple:
    """The arguments of :func:`choose_level`, checked: ``(lat, mem, warmup, runs, args, kwargs)``."""
    check_module(model, "model", "choose_level", order=_ORDER)
    lat = _bound(max_latency_ms, "max_latency_ms")
    mem = _bound(max_memory_mib, "max_memory_mib")
    warmup = _count(warmup, "warmup", 0)
    runs = _count(runs, "runs", 1)
    args, kwargs = _as_call(example_inputs)
    if not elsa_modules(model):
        raise ELSAError(f"choose_level: model ({type(model).__name__}) has no ELSA module: call elsa_codec.swap_ "
                        "or elsa_codec.load first")
    return lat, mem, warmup, runs, args, kwargs


def _quality(model: nn.Module, min_quality) -> tuple:
    """``(bound or None, {level: quality record})`` from the ELSA modules' quality report.

    Raises:
        ELSAError: ``min_quality`` not a number in (-1, 1], or given for a checkpoint without a report.
    """
    report = next((m.quality for _, m in elsa_modules(model) if getattr(m, "quality", None) is not None), None)
    rec = {r["level"]: r for r in report["levels"]} if report is not None else {}
    if min_quality is None:
        return None, rec
    if isinstance(min_quality, bool) or not isinstance(min_quality, numbers.Real) or not -1 < min_quality <= 1:
        raise ELSAError(f"choose_level: min_quality is a cosine in (-1, 1], got {min_quality!r}")
    if report is None:
        raise ELSAError("choose_level: min_quality= needs the checkpoint's quality report, and this one has none "
                        "(convert it with `elsa convert ... --calibration FILE`)")
    return float(min_quality), rec


def _row(model, info, ms: float, rec: dict) -> LevelRow:
    q = rec.get(info.level, {})
    return LevelRow(info.level, info.structure, float(info.sparsity), ms, resident_bytes(model) / MIB,
                    q.get("cosine"), q.get("perplexity"))


def choose_level(model: nn.Module, example_inputs, *, max_latency_ms: float | None = None,
                 max_memory_mib: float | None = None, min_quality: float | None = None, warmup: int = 1,
                 runs: int = 5) -> LevelTable:
    """Measure every level of a served model on this machine and select the densest that fits.

    ELSA (arXiv 2312.06872) ships one file; each machine picks its level. For each level ``t`` in
    ``1..T+1`` (``T+1`` = dense): :func:`~elsa_codec.serving.swap.set_level` ``(model, t)``, then
    ``warmup`` untimed and ``runs`` timed calls ``model(*args)`` under ``torch.inference_mode()``
    (``time.perf_counter``, CUDA synchronised), and the bytes the served model holds for the level.
    The chosen level is the densest (highest ``t``) whose median latency is ``<= max_latency_ms``,
    whose resident MiB is ``<= max_memory_mib`` and whose recorded cosine is ``>= min_quality``;
    the model is left at that level.

    Memory is counted from the model's own data structures, not from the process's RSS
    (:func:`resident_bytes`): what a process serving only that level holds (``elsa_codec.load(path,
    model, level=t)``); a model swapped in memory with ``swap_`` also keeps its encoded weights.

    The model runs as it is (call ``model.eval()`` first), on inputs of the shape it will serve;
    ``semi_structured`` modules are measured on the default backends (``set_level`` resets them).

    Args:
        model: an ``nn.Module`` served by ELSA (after :func:`elsa_codec.swap_` / :func:`elsa_codec.load`).
        example_inputs: a Tensor (``model(x)``), a tuple of positional arguments
            (``model(*args)``) or a dict / mapping of keyword arguments (``model(**kwargs)``).
        max_latency_ms: the latency bound in milliseconds (median of one call); None or inf: no bound.
        max_memory_mib: the resident-weights bound in MiB (2**20 bytes); None or inf: no bound.
        min_quality: the least mean cosine of the final hidden states to the original model, as
            the checkpoint's quality report records it per level (``elsa convert --calibration``).
        warmup: untimed calls per level before timing (int >= 0).
        runs: timed calls per level (int >= 1); the median is kept.

    Returns:
        A :class:`LevelTable`: ``T+1`` rows (level, structure, sparsity, median_ms, resident_mib),
        the chosen level, the budget. Without bounds the dense level is chosen.

    Raises:
        ELSATypeError: ``model`` not an ``nn.Module``; ``example_inputs`` not a Tensor, tuple or
            mapping with str keys; a budget, ``warmup`` or ``runs`` of the wrong type.
        ELSAError: a budget <= 0 or NaN, ``warmup < 0``, ``runs < 1``, no ELSA module in
            ``model``, ``min_quality`` outside (-1, 1] or without a quality report (all before
            any timing); no level meets the budget: the message names the
            closest level (smallest sum of relative excesses over the violated bounds) and its
            figures, the exception's ``table`` attribute holds the :class:`LevelTable` (``chosen``
            None), and every module is put back at the level it had before the call (also when
            the model raises).

    Example::

        >>> import torch, elsa_codec as ec
        >>> from elsa_codec.serving.chooser import choose_level
        >>> model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)).eval()
        >>> _ = ec.swap_(model, ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.9, 0.5])))
        >>> table = choose_level(model, torch.randn(1, 1024), max_memory_mib=4)  # dense holds 8 MiB
        >>> print(table)          # e.g. on a 2-core AVX-512 CPU:
           level  structure     sparsity  median ms  resident MiB
        *      1  unstructured    90.0 %      0.218         1.264
               2  unstructured    50.0 %     0.3407         4.274
               3  dense            0.0 %      0.403         8.008
        budget: latency none, memory <= 4 MiB; median of 5 runs; chosen: level 1 (*)
        >>> table.chosen, model[0].level
        (1, 1)
    """
    lat, mem, warmup, runs, args, kwargs = _checked(model, example_inputs, max_latency_ms, max_memory_mib, warmup, runs)
    qual, rec = _quality(model, min_quality)
    infos, was = levels(model), elsa_modules(model)[0][1].level
    snap, sync, rows = _snapshot(model), _sync_fn(model), []
    try:
        for info in infos:
            set_level(model, info.level)
            rows.append(_row(model, info, _median_ms(model, args, kwargs, warmup, runs, sync), rec))
    except BaseException:
        _restore(snap)
        raise
    fits = [r.level for r in rows if _excess(r, lat, mem, qual) == 0.0]
    table = LevelTable(tuple(rows), max(fits) if fits else None, lat, mem, warmup, runs, qual)
    if not fits:
        _restore(snap)
        raise _no_fit(table, lat, mem, was, qual)
    set_level(model, table.chosen)
    return table
