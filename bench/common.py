"""Shared pieces of the benchmarks: device facts, timing, the long-format CSV, the log.

Timing (docs/DESIGN.md, "Performance targets"; the bench issue):

- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (its first estimation block is the
  warm-up), topped up with ``Timer.timeit`` blocks until at least ``min_blocks`` blocks exist;
  p20 / p50 / p80 are percentiles of the per-call times of the blocks. Providers that are
  compared are timed in interleaved rounds (:meth:`CpuTimer.round_robin`). The thread count is
  fixed (``torch.set_num_threads``) and printed in the header.
- GPU: ``triton.testing.do_bench`` (warm-up, L2 flushed before every run) with
  ``quantiles=[0.2, 0.5, 0.8]``, or ``triton.testing.do_bench_cudagraph`` where launch overhead
  would dominate (see :class:`GpuTimer`). Triton is imported only on this path.

Nothing here imports Triton or initialises CUDA at import time.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
from typing import Callable, Iterable

import torch

#: Column order of the long-format CSV (one row per measurement).
COLUMNS = [
    "op", "provider", "shape", "dtype", "level", "structure", "density",
    "p20_us", "p50_us", "p80_us", "gbps", "tflops",
    "device", "torch", "triton", "git_sha", "timestamp",
]

CSV_NAME = "results.csv"
PNG_NAME = "latency_vs_density.png"
LOG_NAME = "bench.log"
COMMAND_NAME = "COMMAND.txt"
TARGETS_NAME = "targets.md"

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)


# ------------------------------------------------------------------------------------------------
# Device and environment facts
# ------------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    s = re.sub(r"\((r|tm|c)\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human name of the device: the GPU name on CUDA, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def triton_version() -> str:
    """Installed Triton version (read from the package metadata: Triton is not imported)."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "none"


def git_sha() -> str:
    """Short commit of the repository holding bench/, ``+dirty`` when the tree has changes;
    ``unknown`` outside a git checkout. Read-only (no optional index refresh)."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_DIR, env=env,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if st else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def busy_processes(limit: int = 6) -> list[str]:
    """Other processes using CPU right now (``ps``), to record the machine's load in the log."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    me = os.getpid()
    for line in out[1:]:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == me:
            continue
        try:
            if float(parts[1]) < 5.0:
                continue
        except ValueError:
            continue
        rows.append(f"pid {parts[0]} {parts[1]}% cpu: {parts[3][:110]}")
        if len(rows) >= limit:
            break
    return rows


@dataclasses.dataclass
class Env:
    """Facts written in every CSV row and in the log header."""

    device: torch.device
    device_name: str
    device_slug: str
    torch: str
    triton: str
    git_sha: str
    timestamp: str
    threads: int

    @classmethod
    def detect(cls, device: torch.device, threads: int) -> "Env":
        name = device_name(device)
        ts = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        return cls(device, name, slug(name), torch.__version__, triton_version(), git_sha(), ts, threads)


# ------------------------------------------------------------------------------------------------
# Log: stdout plus the results folder's bench.log
# ------------------------------------------------------------------------------------------------
class Log:
    """Prints every line and appends it to a log file (flushed line by line)."""

    def __init__(self, path: str | None = None, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self._f = open(path, "a", encoding="utf-8") if path else None

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        if not self.quiet:
            print(line, flush=True)
        if self._f:
            self._f.write(line + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Stats:
    """Per-call latency percentiles in microseconds, and how they were taken."""

    p20_us: float
    p50_us: float
    p80_us: float
    samples: int
    method: str

    @property
    def spread(self) -> float:
        """Relative p20-p80 spread ``(p80 - p20) / p50``."""
        return (self.p80_us - self.p20_us) / self.p50_us if self.p50_us > 0 else math.inf

    def scaled(self, factor: float) -> "Stats":
        return Stats(self.p20_us * factor, self.p50_us * factor, self.p80_us * factor, self.samples, self.method)

    @staticmethod
    def merge(a: "Stats", b: "Stats") -> "Stats":
        """Average of two measurements of the same thing (used by paired rounds)."""
        return Stats((a.p20_us + b.p20_us) / 2, (a.p50_us + b.p50_us) / 2, (a.p80_us + b.p80_us) / 2,
                     a.samples + b.samples, a.method)


def percentiles(values: Iterable[float], qs=(20, 50, 80)) -> list[float]:
    """Linear-interpolation percentiles (numpy's default) of ``values``."""
    v = sorted(values)
    if not v:
        return [math.nan for _ in qs]
    out = []
    for q in qs:
        pos = (len(v) - 1) * q / 100.0
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


class CpuTimer:
    """``torch.utils.benchmark`` timing with a fixed thread count.

    ``min_run_time`` (s) goes to ``blocked_autorange``; blocks are added with ``timeit`` until
    there are ``min_blocks`` of them (so slow calls still get p20 / p80 from several samples).
    :meth:`round_robin` times several callables in interleaved rounds (``rounds``), so that a
    change of the machine's load during the measurement hits all of them alike.
    """

    def __init__(self, threads: int, min_run_time: float = 0.2, min_blocks: int = 5, rounds: int = 3):
        self.threads = threads
        self.min_run_time = min_run_time
        self.min_blocks = min_blocks
        self.rounds = rounds

    def samples(self, fn: Callable[[], object], *, min_run_time: float | None = None,
                min_blocks: int | None = None, **_) -> list:
        """Per-call seconds of each block (``Measurement.times``)."""
        from torch.utils.benchmark import Timer

        t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=self.threads)
        m = t.blocked_autorange(min_run_time=self.min_run_time if min_run_time is None else min_run_time)
        times = list(m.times)
        want = self.min_blocks if min_blocks is None else min_blocks
        while len(times) < want:
            times.extend(t.timeit(m.number_per_run).times)
        return times

    @staticmethod
    def stats(times: list) -> Stats:
        p20, p50, p80 = (x * 1e6 for x in percentiles(times))
        return Stats(p20, p50, p80, len(times), "torch.utils.benchmark")

    def __call__(self, fn: Callable[[], object], **kw) -> Stats:
        return self.stats(self.samples(fn, **kw))

    def round_robin(self, fns: list, *, rounds: int | None = None, min_run_time: float | None = None,
                    min_blocks: int | None = None, **_) -> list:
        """Stats of each of ``fns``, measured in ``rounds`` interleaved rounds (each round a share
        of ``min_run_time`` and ``min_blocks``, default the timer's); the samples of all rounds are
        pooled."""
        r = max(1, self.rounds if rounds is None else rounds)
        mrt = self.min_run_time if min_run_time is None else min_run_time
        mb = self.min_blocks if min_blocks is None else min_blocks
        pooled = [[] for _ in fns]
        for _ in range(r):
            for i, fn in enumerate(fns):
                pooled[i] += self.samples(fn, min_run_time=mrt / r, min_blocks=-(-mb // r))
        return [self.stats(t) for t in pooled]

    def choose_graphs(self, fn) -> bool:
        return False

    def sync(self) -> None:
        pass


class GpuTimer:
    """``triton.testing.do_bench`` (L2 flushed before every call; per-call CUDA events), or
    ``do_bench_cudagraph`` (``graphs=True``: the calls replayed from a CUDA graph, no launch
    overhead, no L2 flush: see the rotating weight copies in ``layer``). p20 / p50 / p80 are the
    quantiles of the raw per-call times. ``auto`` policy (:meth:`choose_graphs`): graphs when the
    plain measurement of the group's baseline is below ``graph_below_us``."""

    def __init__(self, rep_ms: int = 100, warmup_ms: int = 25, graphs: str = "auto", graph_below_us: float = 50.0):
        import triton.testing  # GPU path only

        self._tt = triton.testing
        self.rep_ms = rep_ms
        self.warmup_ms = warmup_ms
        self.graphs = graphs
        self.graph_below_us = graph_below_us

    def samples(self, fn: Callable[[], object], *, graphs: bool = False, **_) -> tuple[list, str]:
        """Per-call milliseconds and the method used."""
        if graphs:
            try:
                return list(self._tt.do_bench_cudagraph(fn, rep=self.rep_ms, return_mode="all")), "do_bench_cudagraph"
            except Exception as e:  # capture not supported by this op: fall back, say so
                torch.cuda.synchronize()
                method = f"do_bench (graph capture failed: {type(e).__name__})"
        else:
            method = "do_bench"
        return list(self._tt.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")), method

    def __call__(self, fn: Callable[[], object], **kw) -> Stats:
        times, method = self.samples(fn, **kw)
        p20, p50, p80 = (x * 1e3 for x in percentiles(times))
        return Stats(p20, p50, p80, len(times), method)

    def round_robin(self, fns: list, **kw) -> list:
        """The GPU is not shared: one measurement per callable, in order."""
        return [self(fn, **kw) for fn in fns]

    def choose_graphs(self, fn: Callable[[], object]) -> bool:
        """Whether a group of measurements (all providers of one shape) should use CUDA graphs:
        ``on``/``off``, or ``auto`` = the plain measurement of ``fn`` (the dense baseline) is
        below ``graph_below_us`` microseconds (launch overhead would dominate)."""
        if self.graphs in ("on", "off"):
            return self.graphs == "on"
        return self(fn).p50_us < self.graph_below_us

    def sync(self) -> None:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# CSV rows
# ------------------------------------------------------------------------------------------------
class Results:
    """Collects rows (dicts keyed by :data:`COLUMNS`) and appends them to the CSV."""

    def __init__(self, env: Env, log: Log):
        self.env = env
        self.log = log
        self.rows: list[dict] = []

    def add(self, op: str, provider: str, shape: str, dtype, level, structure: str, density: float,
            stats: Stats, *, nbytes: float | None = None, flops: float | None = None, note: str = "") -> dict:
        """Record one measurement. ``nbytes`` / ``flops``: the bytes moved / floating-point
        operations of ONE call (effective figures: gbps = nbytes / p50, tflops = flops / p50)."""
        p50_s = stats.p50_us * 1e-6
        row = {
            "op": op,
            "provider": provider,
            "shape": shape,
            "dtype": dtype_name(dtype),
            "level": str(level),
            "structure": structure,
            "density": f"{density:.6f}",
            "p20_us": f"{stats.p20_us:.3f}",
            "p50_us": f"{stats.p50_us:.3f}",
            "p80_us": f"{stats.p80_us:.3f}",
            "gbps": f"{nbytes / p50_s / 1e9:.4f}" if nbytes and p50_s > 0 else "",
            "tflops": f"{flops / p50_s / 1e12:.6f}" if flops and p50_s > 0 else "",
            "device": self.env.device_name,
            "torch": self.env.torch,
            "triton": self.env.triton,
            "git_sha": self.env.git_sha,
            "timestamp": self.env.timestamp,
        }
        self.rows.append(row)
        extra = []
        if row["gbps"]:
            extra.append(f"{float(row['gbps']):8.2f} GB/s")
        if row["tflops"]:
            extra.append(f"{float(row['tflops']) * 1e3:9.2f} GFLOP/s")
        self.log(
            f"  {op:<15} {provider:<16} {shape:<22} {row['dtype']:<8} L={row['level']:<5} {structure:<13} "
            f"d={density:5.3f}  p50 {stats.p50_us:11.1f} us  [p20 {stats.p20_us:.1f}, p80 {stats.p80_us:.1f}]  "
            + "  ".join(extra) + (f"  ({stats.method})" if stats.method not in ("torch.utils.benchmark", "do_bench") else "")
            + (f"  {note}" if note else "")
        )
        return row

    def write(self, path: str) -> int:
        """Append the rows to ``path`` (header written when the file is new). Returns the count."""
        return append_csv(path, self.rows)


def append_csv(path: str, rows: list[dict], columns: list[str] = COLUMNS) -> int:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != columns:
            raise SystemExit(f"{path}: existing CSV has columns {header}, expected {columns}; use another --out")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerows(rows)
    return len(rows)


def read_csv(path: str, *, run: str = "latest", device: str | None = None) -> list[dict]:
    """Rows of a results CSV. ``run="latest"``: only the rows of the newest run (greatest
    ``timestamp``) of the newest device in the file (or of ``device``); ``"all"``: every row."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if device is not None:
        rows = [r for r in rows if r["device"] == device]
    if run == "latest" and rows:
        ts = max(r["timestamp"] for r in rows)
        rows = [r for r in rows if r["timestamp"] == ts]
    elif run not in ("latest", "all"):
        rows = [r for r in rows if r["timestamp"] == run]
    return rows


def dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return str(dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtypes(text: str) -> list[torch.dtype]:
    out = []
    for p in text.split(","):
        p = p.strip().lower()
        if not p:
            continue
        if p not in DTYPES:
            raise SystemExit(f"python -m bench: unknown dtype {p!r}; expected one of float32, bfloat16, float16")
        out.append(DTYPES[p])
    return out


def fmt_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.1f} us"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (best effort): ``python -m bench ...`` or ``python -m bench ...``."""
    argv = sys.argv if argv is None else argv
    prog = os.path.basename(argv[0]) if argv else "python"
    import shlex

    rest = " ".join(shlex.quote(a) for a in argv[1:])
    if prog == "elsa":
        return f"python -m bench {rest}".strip() if not argv[1:2] == ["bench"] else f"elsa {rest}"
    if argv and os.path.abspath(argv[0]).startswith(BENCH_DIR):
        return f"python -m bench {rest}".strip()
    return " ".join(shlex.quote(a) for a in argv)


def csv_command(prog: str, description: str):
    """The argument parser shared by ``python -m bench plot|table|targets``: ``CSV``, ``--run``, ``--device``."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("csv")
    p.add_argument("--run", default="latest", help="'latest' (default: the newest run in the file), 'all', or a timestamp")
    p.add_argument("--device", help="only rows of this device name")
    return p


def csv_rows(a, prog: str) -> list:
    """The rows a :func:`csv_command` asked for; prints ``PROG: no rows in CSV`` when there are none."""
    import sys

    if not os.path.exists(a.csv):
        print(f"{prog}: no such file: {a.csv}", file=sys.stderr)
        return []
    rows = read_csv(a.csv, run=a.run, device=a.device)
    if not rows:
        print(f"{prog}: no rows in {a.csv}", file=sys.stderr)
    return rows
