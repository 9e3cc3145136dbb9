"""Peak memory and time of the streaming encode (``elsa encode``) on multi-GB synthetic checkpoints.

Run on demand (minutes; not part of ``python -m bench run``)::

    python -m bench stream-memory --size-gb 2,8 --dtype float32,bfloat16
    python -m bench stream-memory --size-gb 2 --shards 4 --jobs 1,2      # --jobs wall time, sharded input

For each size and dtype it writes a synthetic safetensors checkpoint of about ``--size-gb`` GB to
a temporary folder (``--tmp``, default ``/tmp``) tensor by tensor (Llama-7B-like shapes: 4096x4096,
11008x4096, 4096x11008 plus small bias / norm tensors; ``--shards N``: N files plus an index), then
runs ``elsa encode`` on it in a child process under ``/usr/bin/time -v`` (maximum resident set
size; without it ``getrusage(RUSAGE_CHILDREN).ru_maxrss``), while polling ``/proc/<pid>/status`` of
the child and its descendants (``--jobs`` workers) every 5 ms for the anonymous (``RssAnon``:
tensors, temporaries) and file-backed (``RssFile``: the memory-mapped input) resident memory, summed
over the processes. Max RSS counts both. The same measurement of a child that only imports
``torch``, ``elsa_codec`` and ``safetensors`` gives the import floor (one per process). Every run
reports the checkpoint, the largest tensor, the anonymous peak minus the floor and its ratio to the
largest tensor, max RSS and the wall time; the files are deleted after each run (also on error).

Results: appended to ``<out>/stream_memory.csv`` and ``<out>/stream_memory.md`` (default
``bench/results/stream-memory/``) with the exact command and the ``lscpu`` model line.
"""
from __future__ import annotations

import argparse
import csv
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
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = ["timestamp", "git", "checkpoint_gb", "dtype", "shards", "jobs", "tensors", "largest_tensor_mb",
           "anon_peak_mb", "import_floor_mb", "anon_above_floor_mb", "ratio_to_largest", "max_rss_mb",
           "file_backed_peak_mb", "wall_s", "levels", "structure", "command"]


def _plan(size_bytes: int, item: int) -> list:
    """``[(name, shape)]`` of a checkpoint of about ``size_bytes`` (elements of ``item`` bytes)."""
    plan, total, i = [], 0, 0
    while total < size_bytes:
        layer, j = divmod(i, len(SHAPES))
        shape = SHAPES[j]
        plan.append((f"model.layers.{layer}.mlp.proj{j}.weight", shape))
        plan.append((f"model.layers.{layer}.mlp.proj{j}.bias", (shape[0],)))
        total += item * (shape[0] * shape[1] + shape[0])
        i += 1
    plan.append(("model.norm.weight", (4096,)))
    return plan


def _write_file(path: str, plan: list, dtype: torch.dtype, g: torch.Generator) -> int:
    """Write the tensors of ``plan`` (random normal * 0.02) one at a time; the largest's bytes."""
    item = torch.empty(0, dtype=dtype).element_size()
    header, off = {}, 0
    for name, shape in plan:
        n = item
        for s in shape:
            n *= s
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    largest = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in plan:
            t = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            largest = max(largest, t.numel() * item)
            del t
    return largest


def write_checkpoint(path: str, size_bytes: int, seed: int = 0, dtype: torch.dtype = torch.float32, shards: int = 1) -> tuple[int, int, int]:
    """Write a synthetic checkpoint of about ``size_bytes``: one file at ``path``, or (``shards > 1``)
    ``shards`` files beside the index ``path`` (``*.safetensors.index.json``). This process holds
    one tensor at a time.

    Returns ``(bytes of the files, largest tensor bytes, number of tensors)``.
    """
    g = torch.Generator().manual_seed(seed)
    plan = _plan(size_bytes, torch.empty(0, dtype=dtype).element_size())
    if shards <= 1:
        largest = _write_file(path, plan, dtype, g)
        return os.path.getsize(path), largest, len(plan)
    folder, wm, size, largest = os.path.dirname(path), {}, 0, 0
    for i in range(shards):
        name = f"synthetic-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = plan[i::shards]
        largest = max(largest, _write_file(os.path.join(folder, name), part, dtype, g))
        size += os.path.getsize(os.path.join(folder, name))
        wm.update({n: name for n, _ in part})
    with open(path, "w") as f:
        json.dump({"metadata": {"total_size": size}, "weight_map": dict(sorted(wm.items()))}, f)
    return size, largest, len(plan)


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(x) for x in f.read().split()]
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


def _measure(cmd: list[str], poll_s: float = 0.005) -> dict:
    """Run ``cmd`` and measure its memory. Returns ``peak`` (max RSS, bytes: ``/usr/bin/time -v``,
    else ``getrusage``), ``anon`` / ``file`` (largest anonymous / file-backed resident memory,
    summed over the command's processes, seen by polling ``/proc/<pid>/status`` every ``poll_s``:
    a lower bound, Linux only; file-backed pages are the memory-mapped input), ``procs`` (most
    processes seen at once), ``wall`` (s) and ``how``."""
    time_bin = "/usr/bin/time" if os.path.exists("/usr/bin/time") else shutil.which("time")
    full = [time_bin, "-v", *cmd] if time_bin else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = file = procs = 0
    while p.poll() is None:
        pids = [q for q in _tree(p.pid) if q != p.pid] if time_bin else _tree(p.pid)
        sts = [_status_kb(q) for q in pids]
        anon = max(anon, sum(st.get("RssAnon", 0) for st in sts))
        file = max(file, sum(st.get("RssFile", 0) for st in sts))
        procs = max(procs, len(pids))
        time.sleep(poll_s)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{out[-2000:]}\n{err[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", err) if time_bin else None
    if m:
        peak, how = int(m.group(1)) * 1024, "/usr/bin/time -v (max RSS of the largest process)"
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        how = "getrusage(RUSAGE_CHILDREN).ru_maxrss"
        if peak <= before * 1024:
            print("warning: getrusage cannot isolate this child's peak (an earlier child was larger)", file=sys.stderr)
    return dict(peak=peak, anon=anon * 1024, file=file * 1024, wall=wall, how=how, procs=procs)


def lscpu_model() -> str:
    """``lscpu``'s ``Model name`` line (with the CPU count), else the ``/proc/cpuinfo`` name."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        d = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
        return f"{d.get('Model name', common.cpu_name())}, {d.get('CPU(s)', os.cpu_count())} CPUs"
    except (OSError, subprocess.SubprocessError):
        return f"{common.cpu_name()}, {os.cpu_count()} CPUs"


def run_one(size_gb: float, dtype: str, shards: int, jobs: int, a, floor: dict) -> dict:
    """Write one synthetic checkpoint, encode it under measurement, delete both; the CSV row."""
    work = tempfile.mkdtemp(prefix="elsa-stream-mem-", dir=a.tmp)
    src = os.path.join(work, "synthetic.safetensors" + (".index.json" if shards > 1 else ""))
    dst = os.path.join(work, "encoded.safetensors")
    try:
        t0 = time.perf_counter()
        size, largest, count = write_checkpoint(src, int(size_gb * 1e9), dtype=_DTYPES[dtype], shards=shards)
        print(f"wrote {src}: {size / 1e9:.2f} GB {dtype}, {count} tensors in {shards} file(s), largest "
              f"{largest / 1e6:.0f} MB ({time.perf_counter() - t0:.1f} s)", flush=True)
        cmd = [sys.executable, "-m", "elsa_codec.cli.commands", "encode", src, "-o", dst, "--levels", a.levels,
               "--structure", a.structure, "--jobs", str(jobs), "-q"]
        r = _measure(cmd)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    above = r["anon"] - floor["anon"]  # one process; with --jobs workers the tree also holds helpers
    solo = jobs == 1 or shards == 1
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "git": common.git_sha(), "checkpoint_gb": f"{size / 1e9:.2f}", "dtype": dtype, "shards": shards,
        "jobs": jobs, "tensors": count, "largest_tensor_mb": f"{largest / 1e6:.0f}",
        "anon_peak_mb": f"{r['anon'] / 1e6:.0f}", "import_floor_mb": f"{floor['anon'] / 1e6:.0f}" if solo else "n/a",
        "anon_above_floor_mb": f"{above / 1e6:.0f}" if solo else "n/a",
        "ratio_to_largest": f"{above / largest:.2f}" if solo else "n/a",
        "max_rss_mb": f"{r['peak'] / 1e6:.0f}", "file_backed_peak_mb": f"{r['file'] / 1e6:.0f}",
        "wall_s": f"{r['wall']:.1f}", "levels": a.levels, "structure": a.structure,
        "command": "elsa encode <synthetic> -o <out> " + " ".join(cmd[cmd.index("--levels"):]),
    }


def _mb(v: str) -> str:
    return v if v == "n/a" else f"{v} MB"


def _x(v: str) -> str:
    return v if v == "n/a" else f"{v}x"


def _markdown(rows: list, head: str) -> str:
    lines = [head, "", "| checkpoint | dtype | shards | --jobs | largest tensor | anonymous peak | import floor | "
             "anonymous - floor | / largest tensor | max RSS | file-backed peak (mmap) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['checkpoint_gb']} GB ({r['tensors']} tensors) | {r['dtype']} | {r['shards']} | {r['jobs']} | "
                     f"{r['largest_tensor_mb']} MB | {r['anon_peak_mb']} MB | {_mb(r['import_floor_mb'])} | "
                     f"{_mb(r['anon_above_floor_mb'])} | {_x(r['ratio_to_largest'])} | {r['max_rss_mb']} MB | "
                     f"{r['file_backed_peak_mb']} MB | {r['wall_s']} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench stream-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", default="2", help="checkpoint sizes in GB, comma-separated (default 2)")
    p.add_argument("--dtype", default="float32", help="checkpoint dtypes: float32, bfloat16, float16, comma-separated")
    p.add_argument("--shards", type=int, default=1, help="input files (an index when > 1; default 1)")
    p.add_argument("--jobs", default="1", help="elsa encode --jobs values, comma-separated (default 1)")
    p.add_argument("--levels", default="0.9,0.75,0.5", help="elsa encode --levels (default 0.9,0.75,0.5)")
    p.add_argument("--structure", default="unstructured", help="elsa encode --structure")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of the encode child (default: unchanged)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the synthetic files (default /tmp)")
    p.add_argument("--out", default=os.path.join(common.BENCH_DIR, "results", "stream-memory"), help="results folder")
    a = p.parse_args(argv)
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    os.makedirs(a.out, exist_ok=True)
    floor = _measure([sys.executable, "-c", "import torch, elsa_codec, safetensors"])
    rows = []
    for size in [float(s) for s in a.size_gb.split(",") if s]:
        for dt in [d for d in a.dtype.split(",") if d]:
            for jobs in [int(j) for j in a.jobs.split(",") if j]:
                rows.append(run_one(size, dt, a.shards, jobs, a, floor))
                print(_markdown(rows[-1:], ""), flush=True)
    csv_path = os.path.join(a.out, "stream_memory.csv")
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerows(rows)
    command = f"cd {common.REPO_DIR} && python -m bench stream-memory {' '.join(argv)}"
    head = (f"## streaming encode memory and time - {rows[0]['timestamp']}\n\n"
            f"machine: {lscpu_model()}; torch {torch.__version__}; git {rows[0]['git']}"
            f"{f'; OMP_NUM_THREADS={a.threads}' if a.threads else ''}\n\ncommand: `{command}`\n\n"
            f"anonymous memory: RssAnon summed over the encode's processes, polled every 5 ms (with --jobs N on a "
            f"sharded input: the parent, N workers and multiprocessing's helpers, so no single floor applies: n/a); import floor: "
            f"`python -c 'import torch, elsa_codec, safetensors'` = {floor['anon'] / 1e6:.0f} MB a process; "
            f"max RSS by {floor['how']} (it counts the memory-mapped input's pages, which the kernel may drop)")
    text = _markdown(rows, head)
    print(text)
    with open(os.path.join(a.out, "stream_memory.md"), "a", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, common.COMMAND_NAME), "a", encoding="utf-8") as f:
        f.write(f"{rows[0]['timestamp']}  {command}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
