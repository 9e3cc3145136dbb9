"""``python -m bench`` (from a checkout): how fast is each level on this machine.

Usage::

    python -m bench [--quick] [--out DIR] [--threads N] [--only layer,codec,serving,model] ...
    python -m bench plot CSV [-o PNG]      # latency vs density per provider (PNG)
    python -m bench table CSV              # the README's markdown tables
    python -m bench targets CSV            # docs/DESIGN.md's performance targets, measured ratios
    python -m bench stream-memory          # peak RSS of `elsa encode` on a multi-GB synthetic checkpoint
    python -m bench hf-load                # peak RSS of from_pretrained of an ELSA directory vs its file
    python -m bench static [--subset]      # compile gate for sm_90a, no GPU: registers, spills, smem, wgmma
    python -m bench roofline               # bytes / FLOPs / floor time of the GPU grid on H100 and H200
    python -m bench cpu [--quick] [--out DIR]  # the sparse-cpu backend: layer grid, memory, MiniLM (bench/cpu_sparse.py)
    python -m bench cpu-e2e [--quick] [--out DIR]  # whole models per level: LM prefill / decode, MiniLM, switch (bench/cpu_e2e.py)
    python -m bench cpu-e2e report CSV     # its tables.md and tokens_per_s.png again
    python -m bench oneshot-quality [--quick]  # what one-shot levels keep: magnitude / wanda / ria (bench/oneshot_quality.py)
    python -m bench oneshot-convert        # time and peak RSS of elsa convert --calibration vs magnitude (MiniLM)

A run appends its rows to ``<out>/results.csv`` (default ``bench/results/<device-slug>/``), appends
its log to ``bench.log`` and its command line to ``COMMAND.txt``, writes ``targets.md`` and the
PNG, and prints the targets section at the end. See bench/README.md for the columns.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from . import common
from .common import COLUMNS, COMMAND_NAME, CSV_NAME, LOG_NAME, PNG_NAME, TARGETS_NAME

SECTIONS = ("layer", "codec", "serving", "model")


class Context:
    """What the sections need: device, dtypes, timer, results, log and the options."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Latency per level (layer and model), codec throughput and serving ratios; CSV + PNG + targets. "
                    "Sub-commands: 'plot CSV', 'table CSV', 'targets CSV', 'stream-memory', 'hf-load', 'static', 'roofline', 'cpu', 'cpu-e2e', "
                    "'oneshot-quality'.",
    )
    p.add_argument("--quick", action="store_true", help="one-minute smoke run: MiniLM shapes, M in {1, 16}, short timings")
    p.add_argument("--out", help="results folder (default bench/results/<device-slug>/)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: the CPUs this process may use)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {', '.join(SECTIONS)}")
    p.add_argument("--shapes", help="layer shape families: minilm, llama, llama3 (default CPU minilm,llama; GPU all; quick minilm)")
    p.add_argument("--m", help="comma list of M for the layer section (default CPU 1,16,128 / 1,16 for llama; GPU 1,16,128,4096)")
    p.add_argument("--dtypes", help="layer/serving dtypes (default CPU float32, GPU bfloat16)")
    p.add_argument("--codec-dtypes", help="codec dtypes (default float32,bfloat16)")
    p.add_argument("--level-sets", default="unstructured,2:4,block:64x64", help="layer level sets")
    p.add_argument("--model-batch", type=int, help="MiniLM sentences per batch (default CPU 8, GPU 64, quick 2)")
    p.add_argument("--model-structures", help="MiniLM level structures (default CPU unstructured; GPU unstructured,block:64x64)")
    p.add_argument("--min-run-time", type=float, help="CPU: blocked_autorange min_run_time in s (default 0.2, quick 0.02)")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"],
                   help="GPU layer timing with CUDA graphs: auto = when the dense baseline is under 50 us")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="write the log file only")
    return p


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    saved_threads = torch.get_num_threads()
    try:
        return _run(a)
    finally:
        torch.set_num_threads(saved_threads)


def _run(a) -> int:
    t_start = time.perf_counter()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("python -m bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda") if gpu else torch.device("cpu")
    threads = a.threads or _default_threads()
    torch.set_num_threads(threads)
    env = common.Env.detect(device, threads)
    out = a.out or os.path.join(common.BENCH_DIR, "results", env.device_slug)
    os.makedirs(out, exist_ok=True)
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            print(f"python -m bench: unknown section {s!r}; expected {', '.join(SECTIONS)}", file=sys.stderr)
            return 2

    log = common.Log(os.path.join(out, LOG_NAME), quiet=a.quiet)
    cmd = common.command_line()
    with open(os.path.join(out, COMMAND_NAME), "a", encoding="utf-8") as f:
        f.write(f"{env.timestamp}  cd {common.REPO_DIR} && {cmd}\n")

    kernels = None
    semi = False
    if gpu:
        import elsa_codec.kernels.triton as kernels  # imports Triton: GPU path only

        semi = kernels.semi_structured_supported(device)
        timer = common.GpuTimer(rep_ms=40 if a.quick else 100, warmup_ms=10 if a.quick else 25, graphs=a.cuda_graphs)
    else:
        mrt = a.min_run_time if a.min_run_time is not None else (0.02 if a.quick else 0.2)
        timer = common.CpuTimer(threads, min_run_time=mrt, min_blocks=3 if a.quick else 5)

    if a.shapes:
        families = [s.strip() for s in a.shapes.split(",") if s.strip()]
    else:
        families = ["minilm"] if a.quick else (["minilm", "llama", "llama3"] if gpu else ["minilm", "llama"])
    from .layer import SHAPES

    for f in families:
        if f not in SHAPES:
            print(f"python -m bench: unknown shape family {f!r}; expected {', '.join(SHAPES)}", file=sys.stderr)
            return 2
    dtypes = common.parse_dtypes(a.dtypes) if a.dtypes else [torch.bfloat16 if gpu else torch.float32]
    ctx = Context(
        device=device, gpu=gpu, quick=a.quick, log=log, env=env, timer=timer, kernels=kernels, semi_supported=semi,
        results=common.Results(env, log), dtypes=dtypes,
        codec_dtypes=common.parse_dtypes(a.codec_dtypes) if a.codec_dtypes else [torch.float32, torch.bfloat16],
        shape_families=families, m_values=[int(x) for x in a.m.split(",")] if a.m else None,
        level_sets=[s.strip() for s in a.level_sets.split(",") if s.strip()],
        model_batch=a.model_batch or (2 if a.quick else (64 if gpu else 8)),
        model_dtype=dtypes[0],
        model_structures=[s.strip() for s in a.model_structures.split(",")] if a.model_structures
        else (["unstructured", "block:64x64"] if gpu and not a.quick else ["unstructured"]),
    )

    log("=" * 100)
    log(f"python -m bench{' --quick' if a.quick else ''}: {env.timestamp}")
    log(f"command: {cmd}")
    log(f"device: {env.device_name} ({device.type}); torch {env.torch}, triton {env.triton}, git {env.git_sha}")
    log(f"threads: torch.set_num_threads({threads}) (torch.get_num_threads() = {torch.get_num_threads()}, cpus {os.cpu_count()})")
    if gpu:
        cap = torch.cuda.get_device_capability(device)
        log(f"GPU: compute capability {cap[0]}.{cap[1]}, timing triton.testing.do_bench (quantiles 0.2/0.5/0.8), "
            f"CUDA graphs {a.cuda_graphs}; semi-structured 2:4 {'supported' if semi else 'unsupported'}")
    else:
        log(f"timing: torch.utils.benchmark blocked_autorange(min_run_time={timer.min_run_time}) + at least "
            f"{timer.min_blocks} blocks; p20/p50/p80 over the blocks")
    log(f"load average (1/5/15 min) at start: {common.load_average()}")
    busy = common.busy_processes()
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = 0.0
    if not gpu and threads > 1 and load1 + threads > (os.cpu_count() or 1) + 0.5:
        log(f"WARNING: the CPU is shared (load {load1:.1f} on {os.cpu_count()} CPUs): with {threads} threads an OpenMP "
            "barrier waits for a descheduled thread, and latencies quantise to scheduler slices (~12 ms); "
            "--threads 1 measures more stably on a busy machine")
    if busy:
        log("other busy processes at start (they share the CPU with this run):")
        for b in busy:
            log(f"  {b}")
    log(f"output: {out}")

    from . import codec, layer, model, serving

    mods = {"layer": layer, "codec": codec, "serving": serving, "model": model}
    for s in SECTIONS:
        if s not in sections:
            continue
        t0 = time.perf_counter()
        mods[s].run(ctx)
        log(f"-- {s}: {time.perf_counter() - t0:.1f} s (load average now {common.load_average()})")

    csv_path = os.path.join(out, CSV_NAME)
    n = ctx.results.write(csv_path)
    log(f"wrote {n} rows to {csv_path} (columns: {', '.join(COLUMNS)})")
    from .targets import render

    text = render(ctx.results.rows) if ctx.results.rows else "# targets\n\nno rows measured\n"
    with open(os.path.join(out, TARGETS_NAME), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    if not a.no_plot and any(r["op"] in ("linear", "model_forward") for r in ctx.results.rows):
        from .plot import plot

        png = plot(ctx.results.rows, os.path.join(out, PNG_NAME))
        log(f"wrote {png}")
    log(f"load average at end: {common.load_average()}")
    log("")
    log("== targets")
    for line in text.splitlines():
        log(line)
    log(f"total {time.perf_counter() - t_start:.1f} s")
    log.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench`` (``argv`` without the program name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cpu":
        from .cpu_sparse import main as cpu_main

        return int(cpu_main(argv[1:]) or 0)
    if argv and argv[0] == "cpu-e2e":
        from .cpu_e2e import main as cpu_e2e_main

        return int(cpu_e2e_main(argv[1:]) or 0)
    if argv and argv[0] in ("plot", "table", "targets", "stream-memory", "stream_memory", "static", "roofline", "hf-load",
                            "oneshot-quality", "oneshot-convert"):
        import importlib

        name = argv[0].replace("-", "_")
        return int(importlib.import_module(f"bench.{name}").main(argv[1:]) or 0)
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
