"""``python -m bench cpu --only serving``: a level served the way a user serves it, as a ratio to dense.

The measurement of project issue 44: one 4096x4096 float32 ``nn.Linear`` (seeded ``randn``) encoded
with ``ec.magnitude_counters`` levels 0.9 / 0.75 / 0.5, swapped in with ``ec.swap_``, 1 thread;
per level and M, :data:`CALLS` calls of the module interleaved with as many calls of dense
``F.linear`` on the same (encoded) weight; ``ratio_vs_dense`` = median(level) / median(dense).
Every case runs in a child process of its own with a fresh plans folder (``ELSA_CPU_CACHE``):

- ``quiet``: the plans are measured in the child, on the machine as it is;
- ``stale-plan``: a first child writes the plans while :data:`BUSY` processes spin on every core;
  they are stopped; a second child with the same plans folder serves and measures (the plans
  were measured on a busy machine, so they are measured again on the quiet one, or checked);
- ``resident-all``: as ``quiet`` with ``ec.set_resident(model, "all")`` (the nested form).

Rows: op ``serving``, provider ``elsa``, level ``t``, ``m``, ``format`` = what served the call
(the plan's route), ``ratio_vs_dense``, ``note`` = case and the plan's source. The same numbers go
to ``serving.md`` in the results folder.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

#: Timed calls per level, M and round (interleaved with as many dense calls).
CALLS = 30
CASES = ("quiet", "stale-plan", "resident-all")
M_VALUES = (1, 16, 64, 256)


def measure(levels=(0.9, 0.75, 0.5), n: int = 4096, m_values=M_VALUES, calls: int = CALLS, resident: str = "one") -> list:
    """In this process: ``[{level, m, ratio, route, source}]`` of the issue's measurement."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import elsa_codec as ec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, n))
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, list(levels)))
    served = nn.Sequential(nn.Linear(n, n))
    ec.swap_(served, enc)
    if resident == "all":
        ec.set_resident(served, "all")
    mod = served[0]
    w, b = mod.weight, mod.bias
    out = []
    with torch.no_grad():
        for t in range(1, len(levels) + 1):
            ec.set_level(served, t)
            plan = mod.cpu_plan
            for m in m_values:
                x = torch.randn(m, n)
                reps = max(3, calls if m <= 16 else calls // 5)
                for _ in range(3):
                    served(x), F.linear(x, w, b)
                lv, dn = [], []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    served(x)
                    t1 = time.perf_counter()
                    F.linear(x, w, b)
                    t2 = time.perf_counter()
                    lv.append(t1 - t0)
                    dn.append(t2 - t1)
                route = plan.choice_for(m)
                out.append({"level": t, "m": m, "ratio": statistics.median(lv) / statistics.median(dn),
                            "level_us": statistics.median(lv) * 1e6, "dense_us": statistics.median(dn) * 1e6,
                            "route": "dense" if route is None else route[0], "source": plan.source,
                            "plan": plan.describe()})
    return out


def _child(cache: str, args: list) -> list:
    env = {**os.environ, "ELSA_CPU_CACHE": cache, "OMP_NUM_THREADS": "1"}
    env.pop("ELSA_CPU_CALIBRATE", None)
    code = "import json, sys, torch; torch.set_num_threads(1); from bench.cpu_serving import measure; " \
           "print(json.dumps(measure(**json.loads(sys.argv[1]))))"
    r = subprocess.run([sys.executable, "-c", code, json.dumps(dict(args))], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"bench cpu serving child failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _busy(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_case(case: str, m_values, calls: int) -> tuple[list, list | None]:
    """``(rows, rows written under load or None)`` of one case."""
    args = {"m_values": list(m_values), "calls": calls}
    with tempfile.TemporaryDirectory(prefix="elsa-serving-") as cache:
        if case == "stale-plan":
            procs = _busy(os.cpu_count() or 2)
            try:
                time.sleep(2.0)
                under_load = _child(cache, {**args, "m_values": [1], "calls": 5})
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            time.sleep(5.0)
            return _child(cache, args), under_load
        return _child(cache, {**args, "resident": "all" if case == "resident-all" else "one"}), None


def run_serving(ctx) -> None:
    """The section: every case of :data:`CASES`, rows into ``ctx.rows``, ``serving.md`` beside them."""
    m_values = (1, 16) if ctx.quick else M_VALUES
    calls = 10 if ctx.quick else CALLS
    lines = ["# python -m bench cpu --only serving: one 4096x4096 float32 layer through ec.swap_, 1 thread", "",
             f"Command: `{ctx.command}`; machine: {ctx.machine}.", "",
             "| case | level | M | served as | level p50 | dense p50 | ratio vs dense | plan source |", "|---|---|---:|---|---:|---:|---:|---|"]
    for case in CASES:
        rows, under = run_case(case, m_values, calls)
        if under:
            ctx.log("  serving stale-plan: plans written under load: " + "; ".join(f"L{r['level']} {r['plan']}" for r in under))
        for r in rows:
            ctx.rows.add("serving", "elsa", "4096x4096", _float32(), level=r["level"], structure="unstructured",
                         threads=1, m=r["m"], format=r["route"], ratio_vs_dense=r["ratio"], metric="p50_us",
                         value=r["level_us"], unit="us", note=f"{case}; plan {r['source']}: {r['plan']}")
            lines.append(f"| {case} | {r['level']} | {r['m']} | {r['route']} | {r['level_us']:.0f} us | {r['dense_us']:.0f} us | "
                         f"{r['ratio']:.2f}x | {r['source']} |")
    with open(os.path.join(ctx.out, "serving.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _float32():
    import torch

    return torch.float32
