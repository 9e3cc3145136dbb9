"""Peak memory of the streaming encode (``elsa encode``) on a multi-GB synthetic checkpoint.

Run on demand (minutes; not part of ``elsa bench``)::

    python -m elsa_codec.bench.stream_memory [--size-gb 2] [--levels 0.9,0.75,0.5] [--out DIR]

It writes a synthetic float32 safetensors checkpoint of about ``--size-gb`` GB to a temporary
folder (``--tmp``, default ``/tmp``) tensor by tensor (Llama-7B-like shapes: 4096x4096,
11008x4096, 4096x11008 plus small bias / norm tensors; this process never holds more than one
tensor), then runs ``elsa encode`` on it in a child process under ``/usr/bin/time -v`` (maximum
resident set size; without ``/usr/bin/time``, ``getrusage(RUSAGE_CHILDREN).ru_maxrss``), while
polling the child's ``/proc/<pid>/status`` for its anonymous (``RssAnon``: tensors, temporaries)
and file-backed (``RssFile``: the memory-mapped input safetensors, which the kernel may drop at any
time) resident memory: max RSS counts both. The same measurement of a child that only imports
``torch`` and ``elsa_codec`` gives the import floor. The report: checkpoint size, largest tensor,
max RSS, the anonymous peak minus the floor and its ratio to the largest tensor. Both files are
deleted at the end (also on error).

The report is printed and appended to ``<out>/stream_memory.md`` (default
``bench/results/<device-slug>/``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import torch

from . import common

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def write_checkpoint(path: str, size_bytes: int, seed: int = 0) -> tuple[int, int, int]:
    """Write a float32 safetensors file of about ``size_bytes`` one tensor at a time.

    Returns ``(file bytes, largest tensor bytes, number of tensors)``.
    """
    g = torch.Generator().manual_seed(seed)
    plan = []  # (name, shape)
    total = 0
    i = 0
    while total < size_bytes:
        layer, j = divmod(i, len(SHAPES))
        shape = SHAPES[j]
        plan.append((f"model.layers.{layer}.mlp.proj{j}.weight", shape))
        plan.append((f"model.layers.{layer}.mlp.proj{j}.bias", (shape[0],)))
        total += 4 * (shape[0] * shape[1] + shape[0])
        i += 1
    plan.append(("model.norm.weight", (4096,)))
    header, off = {}, 0
    for name, shape in plan:
        n = 4
        for s in shape:
            n *= s
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    largest = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in plan:
            t = torch.randn(shape, generator=g) * 0.02
            f.write(t.numpy().tobytes())
            largest = max(largest, t.numel() * 4)
            del t
    return os.path.getsize(path), largest, len(plan)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _status_kb(pid: int) -> dict:
    d = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    d[k] = int(v.split()[0])
    except OSError:
        pass
    return d


def _measure(cmd: list[str]) -> dict:
    """Run ``cmd`` and measure its memory. Returns ``peak`` (max RSS, bytes: ``/usr/bin/time -v``,
    else ``getrusage``), ``anon`` / ``file`` (largest anonymous / file-backed resident memory seen by
    polling ``/proc/<pid>/status`` every 20 ms: a lower bound, Linux only; file-backed pages are
    the memory-mapped input), ``wall`` (s) and ``how``."""
    time_bin = "/usr/bin/time" if os.path.exists("/usr/bin/time") else shutil.which("time")
    full = [time_bin, "-v", *cmd] if time_bin else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = file = 0
    while p.poll() is None:
        pids = _children(p.pid) if time_bin else [p.pid]
        for pid in pids:
            st = _status_kb(pid)
            anon = max(anon, st.get("RssAnon", 0))
            file = max(file, st.get("RssFile", 0))
        time.sleep(0.02)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", err) if time_bin else None
    if m:
        peak, how = int(m.group(1)) * 1024, "/usr/bin/time -v (max RSS)"
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        how = "getrusage(RUSAGE_CHILDREN).ru_maxrss"
        if peak <= before * 1024:
            print("warning: getrusage cannot isolate this child's peak (an earlier child was larger)", file=sys.stderr)
    return dict(peak=peak, anon=anon * 1024, file=file * 1024, wall=wall, how=how)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m elsa_codec.bench.stream_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    p.add_argument("--levels", default="0.9,0.75,0.5", help="elsa encode --levels (default 0.9,0.75,0.5)")
    p.add_argument("--structure", default="unstructured", help="elsa encode --structure")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the encode child (default: unchanged)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the synthetic files (default /tmp)")
    p.add_argument("--out", help="results folder (default bench/results/<device-slug>/)")
    a = p.parse_args(argv)

    out = a.out or os.path.join(common.BENCH_DIR, "results", common.slug(common.cpu_name()))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="elsa-stream-mem-", dir=a.tmp)
    src, dst = os.path.join(work, "synthetic.safetensors"), os.path.join(work, "encoded.safetensors")
    env_note = ""
    try:
        t0 = time.perf_counter()
        size, largest, count = write_checkpoint(src, int(a.size_gb * 1e9))
        print(f"wrote {src}: {size / 1e9:.2f} GB, {count} tensors, largest {largest / 1e6:.0f} MB ({time.perf_counter() - t0:.1f} s)", flush=True)
        if a.threads:
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
            env_note = f", OMP_NUM_THREADS={a.threads}"
        floor = _measure([sys.executable, "-c", "import torch, elsa_codec, safetensors"])
        cmd = [sys.executable, "-m", "elsa_codec.cli", "encode", src, "-o", dst, "--levels", a.levels,
               "--structure", a.structure, "-q"]
        r = _measure(cmd)
        out_size = os.path.getsize(dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ts = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    peak, anon, file, wall = r["peak"], r["anon"], r["file"], r["wall"]
    extra = anon - floor["anon"]
    lines = [
        f"## streaming encode peak memory - {ts}",
        "",
        f"device: {common.cpu_name()}; torch {torch.__version__}; git {common.git_sha()}; max RSS by {r['how']}; "
        f"anonymous / file-backed resident memory by polling /proc/<pid>/status every 20 ms{env_note}",
        f"command: elsa encode <synthetic {size / 1e9:.2f} GB float32 checkpoint> -o <out> --levels {a.levels} --structure {a.structure} -q",
        "",
        "| checkpoint | largest tensor | max RSS | max RSS / checkpoint | anonymous peak | anonymous - import floor | / largest tensor | file-backed peak (mmap of the input) | wall |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {size / 1e9:.2f} GB ({count} tensors) | {largest / 1e6:.0f} MB | {peak / 1e6:.0f} MB | {peak / size:.2f} | "
        f"{anon / 1e6:.0f} MB | {extra / 1e6:.0f} MB | {extra / largest:.1f}x | {file / 1e6:.0f} MB | {wall:.0f} s |",
        "",
        f"import floor (python -c 'import torch, elsa_codec, safetensors'): max RSS {floor['peak'] / 1e6:.0f} MB, "
        f"anonymous {floor['anon'] / 1e6:.0f} MB. Output file {out_size / 1e9:.2f} GB; the synthetic files were deleted.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "stream_memory.md"), "a", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out, common.COMMAND_NAME), "a", encoding="utf-8") as f:
        f.write(f"{ts}  cd {common.REPO_DIR} && python -m elsa_codec.bench.stream_memory {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
