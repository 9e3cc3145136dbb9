"""The performance targets of docs/DESIGN.md, checked against one run's rows.

``python -m bench.targets CSV`` (or ``python -m bench targets CSV``) prints the section for
the newest run in the CSV; ``python -m bench`` prints it at the end of a run and writes it to
``targets.md`` beside the CSV. ``--grid GRID_CSV`` adds the newest run of bench/gpu_grid.py's grid
(the fused GEMM targets), as ``bench/gpu_check.sh`` does with its codec run (the decode target).

CPU targets (this 2-core machine):
- extract (the level switch's decode) within 3x of a tensor copy of the same bytes:
  ``p50(extract_level) / p50(clone) <= 3``, every codec shape and dtype;
- encode within 10x of a copy: ``p50(encode_tensor) / p50(clone) <= 10``;
- dense level equal to nn.Linear: ``|p50(ELSALinear dense) / p50(nn.Linear) - 1|`` within noise,
  i.e. at most ``max(0.05, (p80 - p20) / p50 of nn.Linear)``.

GPU targets (H100/H200, bf16, Llama-sized weights: N and K >= 4096; M in {1, 16, 128, 4096}):
- elsa-fused >= 0.9x the throughput of dense at every level: ``p50(dense) / p50(elsa-fused) >= 0.9``;
- block:64x64 levels at M = 1: ``p50(elsa-fused) <= 1.3 x density x p50(dense)``;
- decode >= 80% of copy bandwidth: ``gbps(decode triton) / gbps(clone) >= 0.8``;
- the packed level GEMM (issue 33; the grid's packed stage, ``elsa-packed`` rows), bf16, weights
  4096x4096 and 11008x4096, M = 1..16, unstructured levels: ``p50(elsa-packed) / p50(dense)`` at
  most 0.35 at 90% sparsity, 0.6 at 70%, 0.9 at 50% (:data:`PACKED_TARGETS`); "not measured"
  without packed rows. Each packed row is paired with the dense row of its own stage and group.
"""
from __future__ import annotations

import dataclasses
import os
import sys

TOL_DENSE = 0.05
#: Issue 33: (sparsity, latency of elsa-packed / cuBLAS at most), unstructured levels.
PACKED_TARGETS = ((0.9, 0.35), (0.7, 0.6), (0.5, 0.9))
#: The weights `[N, K]` and the M range the packed targets are judged on (bfloat16).
PACKED_TARGET_SHAPES = ((4096, 4096), (11008, 4096))
PACKED_TARGET_M = (1, 16)


@dataclasses.dataclass
class Target:
    name: str
    threshold: str
    measured: str  # the worst case, as text
    met: bool | None  # None: not measured on this device
    details: list  # lines "case: ratio"


def _f(r, key) -> float:
    return float(r[key])


def _index(rows, op, provider=None):
    return [r for r in rows if r["op"] == op and (provider is None or r["provider"] == provider)]


def _nk(shape: str):
    parts = shape.split("x")
    return int(parts[-2]), int(parts[-1])


def _m(shape: str) -> int:
    return int(shape.split("x")[0])


def cpu_targets(rows) -> list:
    out = []
    copies = {(r["shape"], r["dtype"]): r for r in _index(rows, "copy", "clone")}
    into = {(r["shape"], r["dtype"]): r for r in _index(rows, "copy", "copy_")}
    for op, prov, limit, label in (("extract", "extract_level", 3.0, "CPU: extract (level switch decode) within 3x of a copy"),
                                   ("encode", "encode_tensor", 10.0, "CPU: encode within 10x of a copy")):
        det, worst = [], None
        for r in _index(rows, op, prov):
            c = copies.get((r["shape"], r["dtype"]))
            if c is None:
                continue
            ratio = _f(r, "p50_us") / _f(c, "p50_us")
            ci = into.get((r["shape"], r["dtype"]))
            extra = f"; {_f(r, 'p50_us') / _f(ci, 'p50_us'):.2f}x copy_ into a preallocated tensor" if ci else ""
            det.append(f"{r['shape']} {r['dtype']}: {ratio:.2f}x clone ({_f(r, 'p50_us'):.0f} vs {_f(c, 'p50_us'):.0f} us{extra})")
            worst = ratio if worst is None else max(worst, ratio)
        out.append(Target(label, f"<= {limit:g}x", "-" if worst is None else f"{worst:.2f}x (worst)",
                          None if worst is None else worst <= limit, det))
    det, worst_dev, ok = [], None, None
    lin = {r["shape"] + r["dtype"]: r for r in _index(rows, "serving_forward", "nn.Linear")}
    for r in _index(rows, "serving_forward", "ELSALinear"):
        if r["level"] != "dense":
            continue
        b = lin.get(r["shape"] + r["dtype"])
        if b is None:
            continue
        ratio = _f(r, "p50_us") / _f(b, "p50_us")
        tol = max(TOL_DENSE, (_f(b, "p80_us") - _f(b, "p20_us")) / _f(b, "p50_us"))
        good = abs(ratio - 1) <= tol
        det.append(f"{r['shape']} {r['dtype']}: {ratio:.3f}x nn.Linear (noise band +-{tol:.3f}) {'ok' if good else 'OUTSIDE'}")
        dev = abs(ratio - 1)
        if worst_dev is None or dev > worst_dev[0]:
            worst_dev = (dev, ratio)
        ok = good if ok is None else ok and good
    out.append(Target("CPU: dense level of ELSALinear equal to nn.Linear", "ratio 1 within noise (>= 5%)",
                      "-" if worst_dev is None else f"{worst_dev[1]:.3f}x (furthest from 1)", ok, det))
    return out


def _stage(r) -> str:
    return r.get("stage", "")


def packed_targets(rows, dense) -> list:
    """Issue 33's packed targets (:data:`PACKED_TARGETS`); other packed rows as info lines."""
    def key(r):  # the level sets share level numbers: the density tells them apart
        return (_stage(r), r["shape"], r["dtype"], r["structure"], r["level"], r["density"])

    fused = {key(r): r for r in _index(rows, "linear", "elsa-fused")}
    per = {sp: ([], None) for sp, _ in PACKED_TARGETS}
    info = []
    for r in _index(rows, "linear", "elsa-packed"):
        d = dense.get((_stage(r), r["shape"], r["dtype"]))
        if d is None:
            continue
        ratio = _f(r, "p50_us") / _f(d, "p50_us")
        fu = fused.get(key(r))
        line = (f"{r['shape']} {r['dtype']} level {r['level']} ({r['structure']}, density {_f(r, 'density'):.3f}): "
                f"{ratio:.2f}x cuBLAS latency ({_f(r, 'p50_us'):.1f} vs {_f(d, 'p50_us'):.1f} us"
                + (f"; elsa-fused {_f(fu, 'p50_us'):.1f} us, packed / fused {_f(r, 'p50_us') / _f(fu, 'p50_us'):.2f})"
                   if fu else ")"))
        sp = next((sp for sp, _ in PACKED_TARGETS if abs(1.0 - _f(r, "density") - sp) < 0.005), None)
        m, nk = _m(r["shape"]), _nk(r["shape"])
        target = (sp is not None and r["structure"] == "unstructured" and r["dtype"] == "bfloat16"
                  and nk in PACKED_TARGET_SHAPES and PACKED_TARGET_M[0] <= m <= PACKED_TARGET_M[1])
        if target:
            det, worst = per[sp]
            det.append(line)
            per[sp] = (det, ratio if worst is None else max(worst, ratio))
        else:
            info.append(line + " (no packed target)")
    out = []
    for i, (sp, limit) in enumerate(PACKED_TARGETS):
        det, worst = per[sp]
        out.append(Target(f"GPU: elsa-packed at {sp:.0%} sparsity <= {limit:g}x cuBLAS latency (bf16, 4096x4096 and "
                          f"11008x4096, M = 1..16)", f"<= {limit:g}x", "-" if worst is None else f"{worst:.2f}x (worst)",
                          None if worst is None else worst <= limit, det + (info if i == len(PACKED_TARGETS) - 1 else [])))
    return out


def gpu_targets(rows) -> list:
    out = []
    dense = {(_stage(r), r["shape"], r["dtype"]): r for r in _index(rows, "linear", "dense")}
    fused = _index(rows, "linear", "elsa-fused")

    def big(shape):
        n, k = _nk(shape)
        return n >= 4096 and k >= 4096

    det, worst, info = [], None, []
    for r in fused:
        d = dense.get((_stage(r), r["shape"], r["dtype"]))
        if d is None:
            continue
        ratio = _f(d, "p50_us") / _f(r, "p50_us")
        line = f"{r['shape']} {r['dtype']} level {r['level']} ({r['structure']}, density {_f(r, 'density'):.3f}): {ratio:.2f}x"
        if big(r["shape"]) and r["dtype"] == "bfloat16":
            det.append(line)
            worst = ratio if worst is None else min(worst, ratio)
        else:
            info.append(line + " (not a target shape/dtype)")
    out.append(Target("GPU: elsa-fused >= 0.9x dense throughput at every level (bf16, Llama shapes)", ">= 0.9x",
                      "-" if worst is None else f"{worst:.2f}x (worst)", None if worst is None else worst >= 0.9,
                      det + info))
    det, worst, info = [], None, []
    for r in fused:
        if not r["structure"].startswith("block") or _m(r["shape"]) != 1:
            continue
        d = dense.get((_stage(r), r["shape"], r["dtype"]))
        if d is None:
            continue
        ratio = _f(r, "p50_us") / (_f(r, "density") * _f(d, "p50_us"))
        line = f"{r['shape']} {r['dtype']} level {r['level']} density {_f(r, 'density'):.3f}: {ratio:.2f} x density x dense"
        if big(r["shape"]) and r["dtype"] == "bfloat16":
            det.append(line)
            worst = ratio if worst is None else max(worst, ratio)
        else:
            info.append(line + " (not a target shape/dtype)")
    for r in _index(rows, "linear", "launch-floor"):
        info.append(f"empty kernel ({r['shape']}, {r['timing'] or 'timing unknown'}): {_f(r, 'p50_us'):.2f} us, "
                    "the least time any kernel is measured at")
    out.append(Target("GPU: block:64x64 levels at M=1 within 1.3 x density x dense latency", "<= 1.3",
                      "-" if worst is None else f"{worst:.2f} (worst)", None if worst is None else worst <= 1.3,
                      det + info))
    copies = {(r["shape"], r["dtype"]): r for r in _index(rows, "copy", "clone")}
    det, worst = [], None
    for r in _index(rows, "decode", "triton"):
        c = copies.get((r["shape"], r["dtype"]))
        if c is None or not r["gbps"] or not c["gbps"]:
            continue
        ratio = _f(r, "gbps") / _f(c, "gbps")
        det.append(f"{r['shape']} {r['dtype']}: {_f(r, 'gbps'):.0f} GB/s vs copy {_f(c, 'gbps'):.0f} GB/s = {ratio:.0%}")
        worst = ratio if worst is None else min(worst, ratio)
    out.append(Target("GPU: decode kernel >= 80% of copy bandwidth", ">= 80%",
                      "-" if worst is None else f"{worst:.0%} (worst)", None if worst is None else worst >= 0.8, det))
    return out + packed_targets(rows, dense)


def grid_as_results(grid_rows) -> list:
    """bench/gpu_grid.py's ``grid.csv`` rows as ``op = "linear"`` rows of the results CSV, so that
    :func:`render` judges them; rows without a timing (dry run, failed provider) are left out.
    ``bench/gpu_check.sh`` merges them with its codec run (the decode target) into ``targets.md``."""
    out = []
    for r in grid_rows:
        if not r.get("p50_us"):
            continue
        out.append(dict(op="linear", provider=r["provider"], stage=r.get("stage", ""), shape=r["shape"],
                        dtype=r["dtype"], level=r["level"],
                        structure=r["structure"], density=r["density"], p20_us=r["p20_us"], p50_us=r["p50_us"],
                        p80_us=r["p80_us"], timing=r.get("timing", ""), gbps="", tflops="", device=r["device"],
                        torch=r["torch"], triton=r["triton"], git_sha=r.get("git_sha", ""), timestamp=r["timestamp"]))
    return out


def semi_structured_lines(rows) -> list:
    """The N:M levels served by the fused kernel beside ``to_sparse_semi_structured`` (cuSPARSELt or
    CUTLASS through PyTorch) on the same shape and level: the issue's 2:4 comparison, no threshold."""
    semi = {(_stage(r), r["shape"], r["dtype"], r["level"], r["structure"]): r
            for r in _index(rows, "linear", "semi-structured")}
    lines = []
    for r in _index(rows, "linear", "elsa-fused"):
        s = semi.get((_stage(r), r["shape"], r["dtype"], r["level"], r["structure"]))
        if s:
            lines.append(f"{r['structure']} level {r['level']} {r['shape']} {r['dtype']}: elsa-fused {_f(r, 'p50_us'):.1f} us "
                         f"vs semi-structured {_f(s, 'p50_us'):.1f} us ({_f(r, 'p50_us') / _f(s, 'p50_us'):.2f}x "
                         "the semi-structured latency)")
    return lines


def info_lines(rows) -> list:
    """Figures without a target: sparse levels after the first call, level switch vs decode, model,
    N:M levels against the semi-structured backend."""
    lines = semi_structured_lines(rows)
    lin = {r["shape"] + r["dtype"]: r for r in _index(rows, "serving_forward", "nn.Linear")}
    for r in _index(rows, "serving_forward", "ELSALinear"):
        if r["level"] == "dense":
            continue
        b = lin.get(r["shape"] + r["dtype"])
        if b:
            lines.append(f"ELSALinear {r['shape']} {r['dtype']} level {r['level']} (density {_f(r, 'density'):.2f}) after the first call: "
                         f"{_f(r, 'p50_us') / _f(b, 'p50_us'):.3f}x nn.Linear latency")
    dec = {r["shape"] + r["dtype"]: r for r in _index(rows, "serving_decode")}
    fwd = {r["shape"] + r["dtype"] + r["level"]: r for r in _index(rows, "serving_forward", "ELSALinear")}
    for r in _index(rows, "serving_switch"):
        d = dec.get(r["shape"] + r["dtype"])
        f = fwd.get(r["shape"] + r["dtype"] + r["level"])
        if d:
            extra = (f"; (switch - steady forward {_f(f, 'p50_us'):.0f} us) / decode = "
                     f"{(_f(r, 'p50_us') - _f(f, 'p50_us')) / _f(d, 'p50_us'):.2f}") if f else ""
            lines.append(f"level switch {r['shape']} {r['dtype']} (set_level + first forward): {_f(r, 'p50_us'):.0f} us = "
                         f"{_f(r, 'p50_us') / _f(d, 'p50_us'):.2f}x one decode ({_f(d, 'p50_us'):.0f} us){extra}")
    mdense = {r["shape"] + r["dtype"]: r for r in _index(rows, "model_forward", "dense")}
    steady = {(r["shape"], r["dtype"], r["structure"], r["level"]): r for r in _index(rows, "model_forward") if r["provider"] != "dense"}
    for r in _index(rows, "model_forward"):
        if r["provider"] == "dense":
            continue
        b = mdense.get(r["shape"] + r["dtype"])
        if b:
            lines.append(f"MiniLM {r['shape']} {r['dtype']} {r['provider']} level {r['level']} ({r['structure']}, density {_f(r, 'density'):.2f}): "
                         f"{_f(r, 'p50_us') / 1e3:.1f} ms = {_f(b, 'p50_us') / _f(r, 'p50_us'):.2f}x the dense model's speed")
    for r in _index(rows, "model_switch"):
        s = steady.get((r["shape"], r["dtype"], r["structure"], r["level"]))
        if s:
            lines.append(f"MiniLM switch to level {r['level']} ({r['structure']}) + first forward: {_f(r, 'p50_us') / 1e3:.1f} ms "
                         f"vs steady {_f(s, 'p50_us') / 1e3:.1f} ms ({_f(r, 'p50_us') / _f(s, 'p50_us'):.2f}x)")
    return lines


def evaluate(rows) -> tuple[list, list, str]:
    """``(cpu_targets, gpu_targets, device kind)``; the other kind's targets are marked not measured."""
    gpu = any(r["provider"] in ("elsa-fused", "elsa-packed") or (r["op"] == "decode" and r["provider"] == "triton")
              for r in rows)
    cpu_t, gpu_t = cpu_targets(rows), gpu_targets(rows)
    if gpu:  # the CPU targets' ratios, measured on the GPU: shown, not judged
        for t in cpu_t:
            t.name = t.name.replace("CPU: ", "CPU target, measured on the GPU run (info): ")
    return cpu_t, gpu_t, "gpu" if gpu else "cpu"


def _mark(met) -> str:
    return "not measured" if met is None else ("MET" if met else "NOT MET")


def render(rows, *, title: str | None = None) -> str:
    """The targets section as markdown."""
    cpu_t, gpu_t, kind = evaluate(rows)
    r0 = rows[0] if rows else {}
    lines = [f"# targets{(' - ' + title) if title else ''}", ""]
    if r0:
        lines += [f"device: {r0['device']}; torch {r0['torch']}, triton {r0['triton']}, git {r0['git_sha']}, run {r0['timestamp']}", ""]
    lines += ["| target | threshold | measured | verdict |", "|---|---|---|---|"]
    order = (gpu_t + cpu_t) if kind == "gpu" else (cpu_t + gpu_t)
    for t in order:
        verdict = _mark(t.met)
        if t.met is None and t.name.startswith("GPU") and kind == "cpu":
            verdict = "not measured (no GPU in this run)"
        elif kind == "gpu" and t in cpu_t:
            verdict = "info only (a CPU target)"
        lines.append(f"| {t.name} | {t.threshold} | {t.measured} | {verdict} |")
    lines.append("")
    for t in order:
        if t.details:
            lines.append(f"**{t.name}**")
            lines.append("")
            lines += [f"- {d}" for d in t.details]
            lines.append("")
    info = info_lines(rows)
    if info:
        lines.append("**Other figures (no target)**")
        lines.append("")
        lines += [f"- {d}" for d in info]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .common import csv_command, csv_rows, read_csv

    p = csv_command("python -m bench targets", "Check docs/DESIGN.md's performance targets against a results CSV.")
    p.add_argument("--grid", help="also judge this bench/gpu_grid.py grid.csv (its newest run), as op=linear rows")
    a = p.parse_args(argv)
    if a.grid and not os.path.exists(a.csv):  # the codec step of a GPU stretch failed: judge the grid alone
        print(f"python -m bench targets: no {a.csv}; the grid alone (decode target not measured)", file=sys.stderr)
        rows = []
    else:
        rows = csv_rows(a, "python -m bench targets")
    if a.grid:
        if not os.path.exists(a.grid):
            print(f"python -m bench targets: no such file: {a.grid}", file=sys.stderr)
            return 2
        rows += grid_as_results(read_csv(a.grid, device=a.device))
    if not rows:
        if a.grid:
            print(f"python -m bench targets: no timed rows in {a.csv} or {a.grid}", file=sys.stderr)
        return 2
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
