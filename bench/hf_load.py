"""Peak resident memory of ``from_pretrained`` of an ELSA directory, against the file's bytes.

Run::

    python -m bench hf-load [--hidden 1024 --layers 4 --vocab 8000] [--out DIR]

Builds a Llama-style model with random weights (float32), ``save_pretrained`` + ``elsa convert``
(levels 0.9, 0.75, 0.5) into a temporary folder, then, in a fresh child process per level (dense
and each sparse level): imports torch / transformers / elsa_codec; runs
the same load of a tiny model of the architecture (imports, lazy modules, the CPU planner's
one-off probe: the fixed costs), then reads ``VmRSS`` (the floor); resets the peak
(``/proc/self/clear_refs`` ``5``); runs
``AutoModelForCausalLM.from_pretrained(dir, config=ec.pretrained_config(dir, level=t))``; reads
``VmHWM`` (peak) and ``VmRSS`` (after). The goal (issue: HF-native) is peak - floor <= 1.15 x the
weights file's bytes: the encoded weights load straight into the ELSA layers, never a dense copy
beside them; a sparse level is packed and the file's pages handed back, so "after" drops to about
that level's packed bytes.

Results: ``<out>/results.csv`` (default ``bench/results/hf-load/``) and ``COMMAND.txt``.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys
import torch
import elsa_codec as ec
from transformers import AutoModelForCausalLM
torch.set_num_threads(1)

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out

d, warm, level = sys.argv[1], sys.argv[2], sys.argv[3]
level = None if level == "default" else (level if level == "dense" else int(level))
w = AutoModelForCausalLM.from_pretrained(warm, config=ec.pretrained_config(warm, level=level))
w(torch.zeros(1, 4, dtype=torch.long))
del w
floor = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
model = AutoModelForCausalLM.from_pretrained(d, config=ec.pretrained_config(d, level=level))
s = status()
print(json.dumps({"floor": floor, "peak": s["VmHWM"], "after": s["VmRSS"], "level": ec.set_level(model, model.model.layers[0].mlp.up_proj.level)}))
"""

FIELDS = ["date", "commit", "machine", "model", "file_bytes", "level", "sparsity", "floor_mib", "peak_mib",
          "peak_minus_floor_mib", "peak_over_file", "after_minus_floor_mib"]


def measure(folder: str, warm: str, level) -> dict:
    """One child process loading ``warm`` (a tiny model of the same architecture: imports, lazy
    modules, the CPU planner's one-off probe), then ``folder``, at ``level``; floor / peak / after
    RSS in bytes around the second load."""
    r = subprocess.run([sys.executable, "-c", CHILD, folder, warm, str(level)], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"child failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build(folder: str, hidden: int, layers: int, vocab: int, name: str = "elsa") -> tuple[str, int]:
    """A random Llama-style model saved and converted under ``folder``; (ELSA dir, weights bytes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import elsa_codec as ec

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256), vocab_size=vocab)
    src = os.path.join(folder, f"{name}-src")
    LlamaForCausalLM(cfg).save_pretrained(src)
    out = os.path.join(folder, name)
    ec.convert_pretrained(src, out, levels=[0.9, 0.75, 0.5], progress=False)
    shutil.rmtree(src)
    return out, os.path.getsize(os.path.join(out, "model.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench hf-load", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hf-load"))
    a = p.parse_args(argv)
    from .common import cpu_name, git_sha

    tmp = tempfile.mkdtemp(prefix="elsa-hf-load-")
    rows = []
    try:
        d, nbytes = build(tmp, a.hidden, a.layers, a.vocab)
        warm, _ = build(tmp, 64, 1, 256, name="warm")
        import elsa_codec as ec

        sparsity = {lv.level: lv.sparsity for lv in ec.read_meta(os.path.join(d, "model.safetensors")).levels}
        for level in ("dense", 1, 2, 3):
            m = measure(d, warm, level)
            mib = 1 << 20
            rows.append({"date": _dt.date.today().isoformat(), "commit": git_sha(), "machine": cpu_name(),
                         "model": f"llama h{a.hidden} L{a.layers} V{a.vocab} float32", "file_bytes": nbytes,
                         "level": m["level"], "sparsity": round(sparsity.get(m["level"], 0.0), 4),
                         "floor_mib": round(m["floor"] / mib, 1), "peak_mib": round(m["peak"] / mib, 1),
                         "peak_minus_floor_mib": round((m["peak"] - m["floor"]) / mib, 1),
                         "peak_over_file": round((m["peak"] - m["floor"]) / nbytes, 3),
                         "after_minus_floor_mib": round((m["after"] - m["floor"]) / mib, 1)})
            print(", ".join(f"{k}={rows[-1][k]}" for k in ("level", "sparsity", "peak_minus_floor_mib", "peak_over_file",
                                                          "after_minus_floor_mib")), f"(file {nbytes / mib:.1f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)
    with open(os.path.join(a.out, "COMMAND.txt"), "a") as f:
        f.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} {git_sha()} {cpu_name()}: "
                f"python -m bench hf-load {' '.join(argv or sys.argv[2:])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
