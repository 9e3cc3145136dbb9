"""``python -m bench oneshot-convert``: what ``elsa convert --calibration`` costs against the
magnitude convert on the real all-MiniLM-L6-v2 (time and peak RSS, each convert in its own
process), and one plain forward pass over the same calibration windows for scale.

Writes ``convert.md`` and appends to ``COMMAND.txt`` in ``--out`` (default
``bench/results/oneshot-quality/``). Calibration text = the pydoc sentences outside the 10 %
held-out split, evaluation text = the held-out ones (``elsa_codec.examples.minilm.pydoc_text``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import common
from .cpu_sparse import machine_line

METHODS = ("none", "magnitude", "wanda", "ria")
LEVELS = "0.9,0.7,0.5"


def _texts(folder: str) -> tuple:
    from elsa_codec.examples.minilm import pydoc_text

    train, held = pydoc_text.split(pydoc_text.sentences(), 0.1)
    calib, ev = os.path.join(folder, "calib.txt"), os.path.join(folder, "eval.jsonl")
    with open(calib, "w") as f:
        f.write("\n\n".join(train))
    with open(ev, "w") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in held))
    return calib, ev


def _convert(src: str, out: str, method: str, calib: str, ev: str, seq_len: int, samples: int) -> dict:
    """One ``elsa convert`` in a child process: wall s, peak RSS MiB, the progress lines' seconds."""
    cmd = [sys.executable, "-m", "elsa_codec.cli", "convert", src, "-o", out, "--levels", LEVELS]
    if method != "none":
        cmd += ["--calibration", calib, "--eval", ev, "--method", method, "--seq-len", str(seq_len),
                "--calibration-samples", str(samples)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out_text, err = p.stdout.read(), p.stderr.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err}")
    steps = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+): \d+ \w+ in ([\d.]+) s", err, re.M)}
    cos = re.findall(r"level (\d): cosine ([\d.]+)", out_text)
    return {"wall_s": wall, "rss_mib": ru.ru_maxrss / 1024, "calibration_s": steps.get("calibration"),
            "encode_s": steps.get("encode"), "cosine": {int(t): float(c) for t, c in cos}}


def _forward_s(src: str, calib: str, seq_len: int, samples: int) -> float:
    """Seconds of one plain forward pass of the stock model over the calibration windows."""
    from transformers import AutoModel, AutoTokenizer

    from elsa_codec.serving.hf.calibrate import batches, read_texts, token_windows

    model = AutoModel.from_pretrained(src).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(src), read_texts(calib), seq_len, "calib")[:samples]
    with torch.inference_mode():
        t0 = time.perf_counter()
        for b in batches(windows):
            model(**b)
    return time.perf_counter() - t0


def _table(rows: dict, fwd: float, seq_len: int, samples: int) -> str:
    base = rows["none"]
    out = [f"`elsa convert` of all-MiniLM-L6-v2, levels {LEVELS}, {samples} calibration windows of {seq_len} tokens; "
           f"one plain forward pass over them: {fwd:.1f} s.", "",
           "| method | wall s | calibration s (x forward pass) | encode s | peak RSS MiB (x magnitude convert) | "
           "cosine at 90 / 70 / 50 % |", "|---|---|---|---|---|---|"]
    for m, r in rows.items():
        cal = "-" if r["calibration_s"] is None else f"{r['calibration_s']:.1f} ({r['calibration_s'] / fwd:.2f}x)"
        cos = " / ".join(f"{r['cosine'][t]:.4f}" for t in (1, 2, 3)) if r["cosine"] else "-"
        name = "magnitude (no --calibration)" if m == "none" else m
        out.append(f"| {name} | {r['wall_s']:.1f} | {cal} | {r['encode_s'] or 0:.1f} | {r['rss_mib']:.0f} "
                   f"({r['rss_mib'] / base['rss_mib']:.2f}x) | {cos} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench oneshot-convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/oneshot-quality")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--samples", type=int, default=128)
    a = p.parse_args(argv)
    from elsa_codec.examples.minilm.assets import minilm_dir

    src = minilm_dir()
    os.makedirs(a.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        calib, ev = _texts(tmp)
        rows = {m: _convert(src, os.path.join(tmp, m), m, calib, ev, a.seq_len, a.samples) for m in METHODS}
        fwd = _forward_s(src, calib, a.seq_len, a.samples)
    text = _table(rows, fwd, a.seq_len, a.samples)
    with open(os.path.join(a.out, "convert.md"), "w") as f:
        f.write(text)
    env = common.Env.detect(torch.device("cpu"), torch.get_num_threads())
    with open(os.path.join(a.out, "COMMAND.txt"), "a") as f:
        f.write(f"{env.timestamp}  cd {common.REPO_DIR} && python -m bench oneshot-convert {' '.join(argv or [])}\n"
                f"    machine: {machine_line(env)}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
