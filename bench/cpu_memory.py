"""``python -m bench cpu`` section ``memory``: resident memory of ``ec.load(path, model, level=t, mmap=True)`` and
the level switch, one fresh subprocess per case (so RSS is clean).

For one ``N x K`` layer (default 4096x4096) with a bias, float32 and bfloat16, the parent writes
an ELSA file (one-shot magnitude levels 0.9 / 0.75 / 0.5, unstructured) and a plain safetensors
file of the same (unencoded) weights. Each worker (``python -m bench.cpu_memory
--worker ...``) imports torch and elsa_codec, loads the CPU kernels and builds an uninitialised
skeleton (``torch.nn.utils.skip_init``: nothing resident), records ``/proc/self/status``
(RssAnon / RssFile / VmRSS) as the import floor, then:

- ``plain``: ``safetensors.torch.load_file`` + ``load_state_dict`` of the unencoded weights;
- ``dense``: ``ec.load(path, model, level="dense", mmap=True)`` (served from the mapped file);
- ``1..T``: ``ec.load(path, model, level=t, mmap=True)`` (the small-device mode; the default
  ``ec.load`` holds the encoded weights in owned memory instead);

runs a few M=1 forwards and records the status again (plus ``ru_maxrss`` and the tracemalloc
peak of Python objects). Sparse cases then time level switches: ``release_pages(weight)`` then
``ec.set_level(model, t2)`` (re-reads the mapped encoded weight and packs level ``t2``), against
``release_pages(weight)`` then ``weight.view(int).sum()`` (reading the encoded tensor from the
file), p50 of several repetitions, at 1 and 2 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LEVELS = [0.9, 0.75, 0.5]


def file_rss(paths) -> int:
    """Resident bytes of this process's mappings of the files ``paths`` (``/proc/self/smaps``)."""
    want = {os.path.realpath(p) for p in paths if p}
    total, inside = 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8") as f:
            for line in f:
                head = line.split(None, 5)
                if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    inside = len(head) == 6 and os.path.realpath(head[5].strip()) in want
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return -1
    return total


def read_status(files=()) -> dict:
    """RssAnon / RssFile / RssShmem / VmRSS / VmHWM in bytes (``/proc/self/status``), and
    ``FileMapRss``: the resident bytes of the mappings of ``files`` (the model file)."""
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    out["FileMapRss"] = file_rss(files)
    return out


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(a) -> dict:
    import gc
    import resource
    import tracemalloc

    import torch
    from torch import nn

    import elsa_codec as ec
    from elsa_codec.format.pages import release_pages
    from elsa_codec.native import cpu_kernels

    torch.set_num_threads(1)
    cpu_kernels()  # the shared object is part of the floor
    dtype = getattr(torch, a.dtype)
    n, k = (int(v) for v in a.shape.split("x"))
    model = nn.Sequential(torch.nn.utils.skip_init(nn.Linear, k, n, dtype=dtype))
    x = torch.randn(1, k).to(dtype)
    gc.collect()
    _malloc_trim()
    files = [a.file, a.plain]
    floor = read_status(files)
    tracemalloc.start()
    t0 = time.perf_counter()
    if a.case == "plain":
        from safetensors.torch import load_file

        sd = load_file(a.plain)
        model.load_state_dict(sd)
        del sd
    else:
        level = "dense" if a.case == "dense" else int(a.case)
        ec.load(a.file, model, level=level, mmap=True)
    load_s = time.perf_counter() - t0
    gc.collect()
    _malloc_trim()
    after_load = read_status(files)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    gc.collect()
    _malloc_trim()
    after_fwd = read_status(files)
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    lin = model[0]
    packed = 0
    fmt = "-"
    if isinstance(lin, ec.ELSALinear) and lin.level <= lin.num_levels:
        p = lin.packed_level()
        packed, fmt = p.nbytes, p.format
    bias_b = lin.bias.numel() * lin.bias.element_size() if lin.bias is not None else 0
    res = dict(case=a.case, dtype=a.dtype, shape=a.shape, floor=floor, after_load=after_load, after_forward=after_fwd,
               ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, tracemalloc_peak=py_peak,
               packed_bytes=packed, format=fmt, bias_bytes=bias_b, weight_bytes=n * k * torch.tensor([], dtype=dtype).element_size(),
               load_s=load_s, switch=[])
    if isinstance(lin, ec.ELSALinear) and a.case not in ("plain", "dense"):
        w = lin.weight
        iview = w.detach().view(torch.int32 if w.element_size() == 4 else torch.int16)
        t_cur = int(a.case)
        others = [t for t in range(1, lin.num_levels + 1) if t != t_cur]
        for th in (1, 2):
            torch.set_num_threads(th)
            sw, rd = [], []
            for _i in range(a.reps):
                for t2 in others + [t_cur]:
                    res["released"] = release_pages(w)
                    t0 = time.perf_counter()
                    ec.set_level(model, t2)
                    sw.append((t2, time.perf_counter() - t0))
                release_pages(w)
                t0 = time.perf_counter()
                iview.sum()
                rd.append(time.perf_counter() - t0)
            res["switch"].append(dict(threads=th, switch_s=sw, read_s=rd))
        torch.set_num_threads(1)
        res["after_switches"] = read_status(files)
    return res


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------
def _spawn(ctx, args: list) -> dict | None:
    cmd = [sys.executable, "-m", "bench.cpu_memory", "--worker"] + args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        ctx.log(f"  WARNING: worker {' '.join(args)} failed (rc {p.returncode}): {p.stderr.strip()[-600:]}")
        return None
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    res = json.loads(line)
    res["wall_s"] = time.perf_counter() - t0
    return res


def _pcts(v):
    from .common import percentiles

    return percentiles(v)


def run_memory(ctx) -> None:
    import torch
    from safetensors.torch import save_file as st_save

    import elsa_codec as ec

    n, k = ctx.mem_shape
    shape = f"{n}x{k}"
    reps = 3 if ctx.quick else 7
    ctx.log(f"== memory: one {shape} layer + bias, ec.load(path, model, level=t), one subprocess per case; switch reps {reps}")
    g = torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory(prefix="elsa-cpu-mem-") as tmp:
        for dtype in ctx.mem_dtypes:
            dname = str(dtype).replace("torch.", "")
            sd = {"0.weight": (torch.randn(n, k, generator=g) / k**0.5).to(dtype),
                  "0.bias": (torch.randn(n, generator=g) * 0.01).to(dtype)}
            plain = os.path.join(tmp, f"plain-{dname}.safetensors")
            st_save(sd, plain)
            c = ec.magnitude_counters(sd, LEVELS, names=["0.weight"])
            enc = ec.encode(sd, c)
            path = os.path.join(tmp, f"elsa-{dname}.safetensors")
            ec.save_file(enc, path)
            sparsity = list(enc.meta.tensors["0.weight"].sparsity)
            del sd, c, enc
            T = len(LEVELS)
            for case in [c for c in ["plain", "dense"] + [str(t) for t in range(1, T + 1)] if c in ctx.mem_cases]:
                r = _spawn(ctx, ["--case", case, "--dtype", dname, "--shape", shape, "--file", path, "--plain", plain,
                                 "--reps", str(reps)])
                if r is None:
                    continue
                _rows_of(ctx, r, sparsity, T)


def _rows_of(ctx, r, sparsity, T) -> None:
    import torch

    dtype = getattr(torch, r["dtype"])
    case = r["case"]
    if case == "plain":
        prov, level, structure, dens = "plain-load", "dense", "dense", 1.0
    elif case == "dense":
        prov, level, structure, dens = "ec.load", "dense", "dense", 1.0
    else:
        prov, level, structure, dens = "ec.load", int(case), "unstructured", 1.0 - sparsity[int(case) - 1]
    shape = r["shape"]
    fl, af = r["floor"], r["after_forward"]
    # anonymous growth + the model file's resident pages (library code pages touched on first use
    # also show in RssFile: they are not the model's and are left out; RssFile rows are in the CSV)
    resident = (af["RssAnon"] - fl["RssAnon"]) + af["FileMapRss"]
    packed, bias_b = r["packed_bytes"], r["bias_bytes"]
    if case == "plain" or case == "dense":
        budget = r["weight_bytes"] + bias_b
        tgt_note = "unencoded weight + bias"
    else:
        budget = 1.1 * packed + bias_b
        tgt_note = "1.1 x packed + bias"
    add = ctx.rows.add
    common_kw = dict(format=r["format"], bytes=packed or r["weight_bytes"])
    for stage, st in (("floor", fl), ("after_load", r["after_load"]), ("after_forward", af)):
        for key in ("RssAnon", "RssFile", "VmRSS", "FileMapRss"):
            add("memory", prov, shape, dtype, level, structure, dens, metric=f"{stage}.{key}", value=st[key], unit="B", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="resident_beyond_floor", value=resident, unit="B",
        target=budget, met=("yes" if resident <= budget else "no") if case not in ("plain", "dense") else "",
        note=f"RssAnon growth over the floor + the model file's resident mapped pages, after load + 3 forwards; target {tgt_note}", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="peak_ru_maxrss", value=r["ru_maxrss"], unit="B",
        note="Linux carries the parent's RSS at fork into ru_maxrss: an upper bound only", **common_kw)
    hwm = r.get("after_switches", af)["VmHWM"]
    add("memory", prov, shape, dtype, level, structure, dens, metric="peak_vmhwm", value=hwm, unit="B",
        note="VmHWM of the worker (its own address space since exec), at the end", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="peak_minus_floor_vmrss", value=af["VmHWM"] - fl["VmRSS"],
        unit="B", note="VmHWM after load + forwards - floor VmRSS", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="tracemalloc_peak", value=r["tracemalloc_peak"], unit="B",
        note="Python objects only (tensors are not traced)", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="packed_bytes", value=packed, unit="B", **common_kw)
    add("memory", prov, shape, dtype, level, structure, dens, metric="load_s", value=r["load_s"], unit="s", **common_kw)
    for sw in r.get("switch", []):
        th = sw["threads"]
        read = sorted(sw["read_s"])
        rp = _pcts([v * 1e6 for v in read])
        from .common import Stats

        rs = Stats(*rp, len(read), "perf_counter")
        add("switch", "read-encoded", shape, dtype, level, structure, dens, rs, threads=th, bytes=r["weight_bytes"],
            note="release_pages(weight); weight.view(int).sum()")
        for t2 in sorted({t for t, _ in sw["switch_s"]}):
            v = [s * 1e6 for t, s in sw["switch_s"] if t == t2]
            st = Stats(*_pcts(v), len(v), "perf_counter")
            ratio = st.p50_us / rs.p50_us
            d2 = 1.0 - sparsity[t2 - 1]
            add("switch", "ec.set_level", shape, dtype, t2, "unstructured", d2, st, threads=th,
                ratio_vs_dense=ratio, target=3.0, met="yes" if ratio <= 3.0 else "no",
                note=f"from level {case} (pages released first); ratio_vs_dense = p50 / p50(read-encoded)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_memory")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shape", default="4096x4096")
    p.add_argument("--file")
    p.add_argument("--plain")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    print(json.dumps(worker(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
