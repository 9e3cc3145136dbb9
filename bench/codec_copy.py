"""The code rule against a tensor copy on the CPU: ``encode_tensor``, ``extract_level`` (a sparse
level) and ``decode_codes`` timed side by side with ``dst.copy_(src)`` of the same tensor.

Usage::

    python -m bench.codec_copy [--out DIR] [--shapes 64x64,1536x384] [--dtypes float32,bfloat16]
                                          [--rounds 15] [--block-ms 20] [--threads N] [--name NAME]

Each (shape, dtype) is measured in ``rounds`` interleaved rounds: in every round each of the four
operations runs one block of calls (``block-ms`` long, calibrated per operation) and its per-call
time is recorded, so that a change of the machine's load hits all four alike. The ratio of an
operation is taken per round against that round's ``copy_`` and reported as the median over the
rounds (with p20 / p80). Weights are ``randn / sqrt(K)``, codes ``counter - 1`` (uint8, what
:func:`elsa_codec.encode_tensor` receives from the codec) of T = 3 nested random levels (k = 2),
extracted at level 2. Threads: PyTorch's default unless ``--threads`` (``copy_`` and the kernels
both run on them).

Writes to ``DIR`` (default ``bench/results/codec-copy/``): ``results.csv`` (appended, one row per
shape, dtype and operation), ``NAME.md`` (default ``table``: the ratio table of this run, the
command, the machine, the load average), ``lscpu.txt``. Targets (the issue): encode <= 10x,
extract <= 3x ``copy_``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import subprocess
import sys
import time

import torch

import elsa_codec as ec

from .common import BENCH_DIR, append_csv, percentiles
from .weights import nested_counters, random_weight

SHAPES = [(64, 64), (384, 384), (1536, 384), (1024, 1024), (4096, 4096), (8192, 8192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = ("copy_", "encode_tensor", "extract_level", "decode_codes")
TARGETS = {"encode_tensor": 10.0, "extract_level": 3.0}
LEVELS = [0.9, 0.75, 0.5]
LEVEL = 2
COLUMNS = ["timestamp", "shape", "dtype", "numel", "threads", "op", "p50_us", "ratio", "ratio_p20", "ratio_p80",
           "rounds", "path", "git_sha"]


def operations(shape, dtype, generator) -> dict:
    """The four callables of one (shape, dtype), on fresh data (``OPS`` order)."""
    w = random_weight(shape, dtype, "cpu", generator)
    c, _ = nested_counters(shape, LEVELS, "unstructured", generator=generator)
    codes = c - 1
    T = len(LEVELS)
    k = ec.default_code_bits(T)
    enc = ec.encode_tensor(w, codes, k)
    dst = torch.empty_like(w)
    return {
        "copy_": lambda: dst.copy_(w),
        "encode_tensor": lambda: ec.encode_tensor(w, codes, k),
        "extract_level": lambda: ec.extract_level(enc, LEVEL, k, T),
        "decode_codes": lambda: ec.decode_codes(enc, k),
    }


def _calls_per_block(fn, block_s: float) -> int:
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    return max(1, math.ceil(block_s / one))


def measure(fns: dict, rounds: int, block_s: float) -> dict:
    """Per-call seconds of every operation, one sample per round (interleaved): ``{op: [s, ...]}``."""
    number = {op: _calls_per_block(fn, block_s) for op, fn in fns.items()}
    times = {op: [] for op in fns}
    for _ in range(rounds):
        for op, fn in fns.items():
            n = number[op]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times[op].append((time.perf_counter() - t) / n)
    return times


def ratios(times: dict) -> dict:
    """``{op: (p20, p50, p80)}`` of the per-round ratios ``t_op / t_copy_``."""
    base = times["copy_"]
    return {op: tuple(percentiles([a / b for a, b in zip(ts, base)])) for op, ts in times.items()}


def kernel_path() -> str:
    """Which implementation the CPU codec runs: the C kernel (with its flags) or the reference."""
    from elsa_codec.format.bits import _rule_kernels
    from elsa_codec.native import rule_flags, rule_kernels_error

    rule = _rule_kernels()
    if rule is None:
        return f"PyTorch reference ({rule_kernels_error()})"
    isa = " ".join(f for f in rule_flags() if f.startswith("-m"))
    return f"C kernel elsa_rule.c, called via {'its CPython module' if rule.via == 'python' else 'ctypes'} ({isa})"


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", BENCH_DIR, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def table(results: list, command: str, machine: str, path: str, threads: int, stamp: str, load: str) -> str:
    """The markdown report of one run: ratio per shape and dtype (median of per-round ratios)."""
    lines = [
        "# Code rule vs copy (CPU)",
        "",
        f"`encode_tensor`, `extract_level` (level {LEVEL} of T = {len(LEVELS)}, k = 2) and `decode_codes` against "
        "`dst.copy_(src)` of the same tensor: median over interleaved rounds of the per-round time ratio "
        "(p20-p80 in brackets). Targets: encode <= 10x, extract <= 3x.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}; {threads} threads; torch {torch.__version__}; {stamp}; "
        f"load average before / after: {load}",
        f"- path: {path}",
        "",
        "| shape | dtype | copy_ (us) | encode_tensor | extract_level | decode_codes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, dtype, times, r in results:
        cells = [f"{r[op][1]:.2f}x [{r[op][0]:.2f}-{r[op][2]:.2f}]" for op in OPS[1:]]
        lines.append(f"| {shape} | {dtype} | {percentiles(times['copy_'])[1] * 1e6:.1f} | " + " | ".join(cells) + " |")
    worst = {op: max(r[op][1] for *_, r in results) for op in TARGETS}
    lines += ["", "Worst medians: " + ", ".join(f"{op} {v:.2f}x (target <= {TARGETS[op]:g}x)" for op, v in worst.items())]
    return "\n".join(lines) + "\n"


def _parse_shapes(s: str) -> list:
    return [tuple(int(v) for v in p.split("x")) for p in s.split(",")]


def _parse_dtypes(s: str) -> list:
    return [getattr(torch, d) for d in s.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.codec_copy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "codec-copy"), help="results folder")
    p.add_argument("--shapes", type=_parse_shapes, default=SHAPES, help="e.g. 64x64,1536x384 (default: 64x64 .. 8192x8192)")
    p.add_argument("--dtypes", type=_parse_dtypes, default=DTYPES, help="default float32,bfloat16,float16")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per shape and dtype (default 15)")
    p.add_argument("--block-ms", type=float, default=20.0, help="length of one block of calls, ms (default 20)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's default)")
    p.add_argument("--name", default="table", help="name of the markdown report, NAME.md (default table)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    command = "python -m bench.codec_copy " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    os.makedirs(a.out, exist_ok=True)
    lscpu = _lscpu()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "unknown CPU")
    machine = f"{model}, {os.cpu_count()} CPUs"
    stamp = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    threads, path, sha = torch.get_num_threads(), kernel_path(), _git_sha()
    print(f"codec vs copy_: {machine}, {threads} threads, {path}", flush=True)
    g = torch.Generator().manual_seed(1)
    results, rows = [], []
    for shape in a.shapes:
        for dtype in a.dtypes:
            times = measure(operations(shape, dtype, g), a.rounds, a.block_ms * 1e-3)
            r = ratios(times)
            sname, dname = "x".join(map(str, shape)), str(dtype).replace("torch.", "")
            results.append((sname, dname, times, r))
            print(f"  {sname:>10} {dname:<8} copy_ {percentiles(times['copy_'])[1] * 1e6:10.1f} us  "
                  + "  ".join(f"{op} {r[op][1]:6.2f}x" for op in OPS[1:]), flush=True)
            for op in OPS:
                rows.append({"timestamp": stamp, "shape": sname, "dtype": dname, "numel": math.prod(shape),
                             "threads": threads, "op": op, "p50_us": f"{percentiles(times[op])[1] * 1e6:.3f}",
                             "ratio": f"{r[op][1]:.4f}", "ratio_p20": f"{r[op][0]:.4f}", "ratio_p80": f"{r[op][2]:.4f}",
                             "rounds": a.rounds, "path": path, "git_sha": sha})
    append_csv(os.path.join(a.out, "results.csv"), rows, COLUMNS)
    load = f"{load0} / " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    text = table(results, command, machine, path, threads, stamp, load)
    with open(os.path.join(a.out, f"{a.name}.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(a.out, "lscpu.txt"), "w", encoding="utf-8") as f:
        f.write(lscpu)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
