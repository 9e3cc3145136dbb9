"""The CPU plans this machine keeps: in memory, on disk, checked before they serve, refreshed.

A plan (:class:`~elsa_codec.kernels.cpu.planner.Plan`) is a decision a served model keeps: which
packed format serves a sparse level and, per batch-size bucket, whether packed or dense. It is
measured once per distinct key ``(shape, dtype, density, structure, threads, formats)``
(:func:`~elsa_codec.kernels.cpu.planner.calibrate`) and kept in memory and in one JSON file per
CPU model, instruction set and kernel build, in the kernels' cache folder
(:func:`elsa_codec.native.cache_dir`; written atomically, an unreadable file is ignored and
rewritten). A plan read back from the file serves only after it holds here and now
(:func:`plan_level`):

- it is measured again when it records no conditions (a file from an older release), another CPU
  or instruction set, or was measured on a busy machine while this one is quiet
  (:func:`~elsa_codec.kernels.cpu.planner.machine_busy`);
- otherwise its packed routes are timed once against dense
  (:func:`~elsa_codec.kernels.cpu.planner.check_plan`, a few ms per route) and every bucket that
  disagrees beyond noise is measured again and the plan decided anew.

:func:`stored_plans` lists what this machine decided, :func:`refresh_plans` measures every stored
key again (on a random weight of the key's shape, density and structure), :func:`clear_plans`
forgets them; ``elsa plans [--refresh] [--clear] [--json]`` is the same from the shell.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading
import warnings

import torch

from ...errors import ELSAError
from .planner import (
    Plan,
    calibrate,
    calibration_on,
    candidates,
    check_plan,
    conditions,
    cost_model,
    machine_busy,
    measure_bucket,
    rechoose,
)

__all__ = ["clear_plans", "plan_level", "plans_path", "refresh_plans", "stored_plans"]

_PLANS: dict = {}
_LOCK = threading.Lock()
_WARNED: set = set()


def plans_path() -> str | None:
    """The plans file of this CPU model, instruction set and kernel build (None without kernels)."""
    return _plans_path()


def _plans_path() -> str | None:
    from ...native import cache_dir, cpu_isa, cpu_kernels_build_id, cpu_model

    build = cpu_kernels_build_id()
    if build is None:
        return None
    tag = hashlib.sha256(f"{cpu_model()}|{build}|{cpu_isa()}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"plans_{tag}.json")


def _read_disk(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        return doc["plans"] if isinstance(doc, dict) and isinstance(doc.get("plans"), dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _write_disk(path: str, updates: dict) -> None:
    """Merge ``updates`` (key -> Plan, or None to drop the key) into the plans file (read, merge,
    write to a temporary name, rename)."""
    from ...native import cpu_model

    try:
        plans = _read_disk(path)
        for key, plan in updates.items():
            if plan is None:
                plans.pop(key, None)
            else:
                plans[key] = plan.to_json()
        fd, tmp = tempfile.mkstemp(prefix=".plans_", dir=os.path.dirname(path))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"cpu": cpu_model(), "plans": plans}, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the plan is still kept in memory


def _key(shape, dtype, density, structure, threads, cands) -> str:
    n, k = shape
    forms = ",".join(c[0] for c in cands)
    return f"{n}x{k}|{str(dtype).replace('torch.', '')}|{density:.2f}|{structure}|{threads}|{forms}"


def _parse_key(key: str) -> dict:
    """The fields of a plan key (:func:`_key`). Raises ValueError on another string."""
    shape, dtype, density, structure, threads, forms = key.split("|")
    n, k = (int(v) for v in shape.split("x"))
    dt = getattr(torch, dtype, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"not a plan key: {key!r}")
    return {"shape": (n, k), "dtype": dt, "density": float(density), "structure": structure,
            "threads": int(threads), "forms": forms.split(",")}


def _stale(plan: Plan, threads: int) -> str | None:
    """Why a plan read from disk must be measured again here, None if it may be checked and kept."""
    from ...native import cpu_isa, cpu_model

    cond = plan.conditions
    if cond is None or not plan.table:
        return "it records no measuring conditions"
    if cond.get("cpu") != cpu_model() or cond.get("isa") != cpu_isa() or int(cond.get("threads", -1)) != threads:
        return "it was measured on another CPU, instruction set or thread count"
    if machine_busy(cond) and not machine_busy(conditions(threads)):
        return "it was measured on a busy machine and this one is quiet"
    return None


def _from_disk(stored, w2d, level, code_bits, threads) -> tuple[Plan | None, bool]:
    """``(plan, changed)``: the stored plan checked here (buckets that disagree measured again), or
    None where it must be measured afresh."""
    try:
        plan = Plan.from_json(stored) if stored else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None, False
    if plan is None or _stale(plan, threads):
        return None, False
    try:
        bad = check_plan(plan, w2d, level, code_bits, threads=threads)
        if not bad:
            return plan, False
        packs = {}
        rows = {b: measure_bucket(w2d, level, code_bits, list(plan.cands), b, threads, packs) for b in bad}
    except (ELSAError, RuntimeError, ValueError):
        return None, False
    plan = rechoose(plan, rows, "re-measured")
    return dataclasses.replace(plan, conditions=conditions(threads)), True


def plan_level(w2d: torch.Tensor, level: int, code_bits: int, structure, density: float, *, cands=None,
               name: str = "weight") -> Plan:
    """The plan of ``level`` of the encoded weight ``w2d`` `[out_features, in_features]` at this
    process's thread count: from memory; else from the disk file, checked here (see the module
    docstring); else measured (:func:`~elsa_codec.kernels.cpu.planner.calibrate`) and stored in
    both; the :func:`~elsa_codec.kernels.cpu.planner.cost_model` when ``ELSA_CPU_CALIBRATE=0``.
    ``cands`` restricts the formats (a forced ``cpu_format``). A failed calibration gives a dense
    plan and one warning."""
    cands = cands or candidates(structure)
    if not calibration_on():
        return cost_model(tuple(w2d.shape), w2d.dtype, density, structure, cands)
    threads = torch.get_num_threads()
    key = _key(tuple(w2d.shape), w2d.dtype, density, structure, threads, cands)
    with _LOCK:
        plan = _PLANS.get(key)
    if plan is not None:
        return plan
    path = _plans_path()
    plan, changed = _from_disk(_read_disk(path).get(key) if path else None, w2d, level, code_bits, threads)
    if plan is None:
        try:
            plan = calibrate(w2d, level, code_bits, structure, cands)
            changed = True
        except (ELSAError, RuntimeError, ValueError) as e:
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(f"elsa_codec: {name}: measuring the sparse-cpu formats of level {level} failed ({e}); "
                              "that level is served dense", RuntimeWarning, stacklevel=3)
            plan = Plan(None, source="fallback")
    if path and changed:
        _write_disk(path, {key: plan})
    with _LOCK:
        _PLANS[key] = plan
    return plan


def clear_plans(*, disk: bool = True) -> int:
    """Forget the CPU plans: those kept in this process and, with ``disk`` (the default), this
    machine's plans file, so that every level is measured again on its next use. Modules keep
    the plan of their current level until their next level switch.

    Returns:
        The number of plans removed from the file (0 with ``disk=False`` or no file).

    Example::

        >>> ec.clear_plans()          # re-measure everything on next use
        >>> ec.set_level(model, 1)    # measured now, on this machine as it is
    """
    with _LOCK:
        _PLANS.clear()
    path = _plans_path() if disk else None
    if not path or not os.path.exists(path):
        return 0
    n = len(_read_disk(path))
    try:
        os.remove(path)
    except OSError:
        return 0
    return n


def stored_plans() -> list[dict]:
    """What this machine decided: one record per plan in its file, sorted by key, with ``key``,
    ``shape`` ``(out_features, in_features)``, ``dtype``, ``density``, ``structure``, ``threads``,
    ``forms`` (the candidates measured) and ``plan`` (a :class:`Plan`: per bucket the route, its
    ratio to dense and its spread; ``conditions``: threads, load, CPU, when). Unreadable entries
    are left out.

    Example::

        >>> for r in ec.stored_plans(): print(r["key"], r["plan"].describe())
    """
    path = _plans_path()
    out = []
    for key, doc in sorted((_read_disk(path) if path else {}).items()):
        try:
            rec = _parse_key(key)
            rec.update(key=key, plan=Plan.from_json(doc))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        out.append(rec)
    return out


def _synthetic_weight(rec: dict) -> torch.Tensor:
    """A random encoded weight of the key's shape and dtype whose level 1 (code bits 1) keeps
    ``density`` of it in the key's structure (magnitude mask)."""
    from ...format.bits import encode_tensor
    from ...oneshot.masks import magnitude_mask

    n, k = rec["shape"]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 31 + k))
    keep = magnitude_mask(w, 1.0 - rec["density"], rec["structure"], name=rec["key"])
    return encode_tensor(w.to(rec["dtype"]), (~keep).to(torch.uint8), 1)


def refresh_plans(keys=None) -> list[dict]:
    """Measure the stored plans again on this machine as it is now (``keys``: some of
    :func:`stored_plans`'s keys; None: all), each on a random weight of its shape, dtype, density
    and structure at its thread count, and store the new plans. Takes about 70-250 ms per key.

    Returns:
        The new records (as :func:`stored_plans`'), in key order.

    Raises:
        ELSAError: a key that is not stored; the kernels are unavailable.
    """
    path = _plans_path()
    if path is None:
        raise ELSAError("refresh_plans: the CPU sparse kernels are unavailable, there are no plans")
    recs = {r["key"]: r for r in stored_plans()}
    want = sorted(recs) if keys is None else list(keys)
    missing = [k for k in want if k not in recs]
    if missing:
        raise ELSAError(f"refresh_plans: no stored plan under {missing[0]!r} ({len(recs)} stored)")
    saved, updates = torch.get_num_threads(), {}
    try:
        for key in want:
            rec = recs[key]
            by_name = {c[0]: c for c in candidates(rec["structure"])}
            cands = [by_name[f] for f in rec["forms"] if f in by_name]
            torch.set_num_threads(rec["threads"])
            updates[key] = calibrate(_synthetic_weight(rec), 1, 1, rec["structure"], cands)
    finally:
        torch.set_num_threads(saved)
    _write_disk(path, updates)
    with _LOCK:
        for key in updates:
            _PLANS.pop(key, None)
    return [r for r in stored_plans() if r["key"] in updates]
