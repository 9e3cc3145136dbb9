"""``elsa plans``: what this machine decided about serving sparse levels on its CPU.

A plan (per weight shape, dtype, density, structure and thread count) says which packed format
serves a level and, per batch-size bucket M, whether packed or dense, with the ratio to dense it
measured (see :mod:`elsa_codec.kernels.cpu.plans`). ``elsa plans`` lists them, ``--refresh``
measures every one again on this machine as it is now, ``--clear`` forgets them (each level is
then measured on its next use), ``--json`` prints machine-readable records.
"""
from __future__ import annotations

import json
import math
import sys

from ..errors import ELSAError


def _record_json(rec: dict) -> dict:
    plan = rec["plan"]
    from ..kernels.cpu.planner import BUCKETS

    buckets = [{"m": b, "route": name, "ratio": None if math.isnan(r) else round(r, 4), "spread": round(sp, 4)}
               for b, name, r, sp in zip(BUCKETS, plan.route_names(), plan.ratios, plan.spreads)]
    return {"key": rec["key"], "shape": list(rec["shape"]), "dtype": str(rec["dtype"]).replace("torch.", ""),
            "density": rec["density"], "structure": rec["structure"], "threads": rec["threads"],
            "formats": rec["forms"], "buckets": buckets, "conditions": plan.conditions}


def _record_line(rec: dict) -> str:
    n, k = rec["shape"]
    c = rec["plan"].conditions or {}
    when = f"measured {c.get('time', '?')}, load {c.get('load', '?')}, others {c.get('other_load', '?')}" if c else "no conditions recorded"
    head = f"{n}x{k} {str(rec['dtype']).replace('torch.', '')} density {rec['density']:.2f} {rec['structure']} {rec['threads']} thread(s)"
    return f"{head}: {rec['plan'].describe()} [{when}]"


def cmd_plans(a) -> int:
    from ..kernels.cpu.plans import clear_plans, plans_path, refresh_plans, stored_plans

    path = plans_path()
    if path is None:
        raise ELSAError("the CPU sparse kernels are unavailable here: no plans (levels are served by the reference path)")
    if a.clear:
        n = clear_plans()
        print(f"{path}: {n} plan(s) removed; each sparse level is measured again on its next use")
        return 0
    if a.refresh:
        refresh_plans()
    recs = stored_plans()
    if a.json:
        json.dump({"file": path, "plans": [_record_json(r) for r in recs]}, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    print(f"{path}: {len(recs)} plan(s){' (measured again now)' if a.refresh else ''}")
    for r in recs:
        print(_record_line(r))
    return 0


def add_parser(sub) -> None:
    """``plans`` on the ``elsa`` command's subparsers."""
    p = sub.add_parser("plans", help="show, refresh or clear this machine's CPU plans (packed or dense, per batch size)",
                       description="List the CPU plans this machine measured: per weight shape, dtype, density, "
                       "structure and thread count, which packed format serves each batch-size bucket M or dense, "
                       "with the measured ratio to dense and its spread, and the conditions of the measurement.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--refresh", action="store_true", help="measure every stored plan again now (random weights of each key)")
    g.add_argument("--clear", action="store_true", help="forget every plan (measured again on next use)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plans)
