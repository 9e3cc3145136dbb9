"""The digits demo's dense level against the schedule and the distillation term, over seeds.

``python -m bench.dense_digits [--seeds 0,1,2] [--variants NAME=final:init:distill_weight:temperature,...] [--out DIR]``

For each seed the demo's dense network (``elsa demo``: DigitsCNN, 600 SGD steps) is trained once,
then every variant runs ELSA from it (levels 90/75/50%, ERK, 400 sparsify + 200 densify steps per
level, SGD lr 0.05 cosine per phase) with its own

- ``final``: steps of the final dense phase (the demo's default is ``densify_steps`` = 200);
- ``init``: ``densify_init`` (``zero`` or ``restore``);
- ``distill_weight``, ``temperature`` and ``phases``: the :class:`elsa_codec.DistillConfig` term
  toward the original network's logits (weight 0: no term; phases ``densify`` (default) or ``final``);

and the ELSA file is served at every level (``ec.load`` + ``set_level``). The separate GMP network
of each level (the demo's baseline, which no variant changes) is trained once per seed. Rows go to
``results.csv`` (one per variant and seed: accuracy of the dense network before ELSA, of each
level and of the dense level after it, in percent of the 540 test images, and the dense level's
agreement with the original's predictions) and the means to
``summary.md``, with the machine.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time

import torch

import elsa_codec as ec
from elsa_codec.examples.digits import demo

DEFAULT_VARIANTS = ("today=200:zero:0:1,final400=400:zero:0:1,restore=200:restore:0:1,"
                    "kd1=200:zero:1:1,kd1-T2=200:zero:1:2,kd3-T2=200:zero:3:2,kd1-T2-final400=400:zero:1:2,"
                    "kd1-T2-restore=200:restore:1:2")


def parse_variants(text: str) -> list[tuple[str, int, str, float, float, str]]:
    out = []
    for item in text.split(","):
        name, spec = item.split("=")
        final, init, w, T, *ph = spec.split(":")
        out.append((name, int(final), init, float(w), float(T), ph[0] if ph else "densify"))
    return out


def job_for(seed: int, data, out: str, final: int, distill) -> demo._Job:
    return demo._Job(seed, list(demo.DEFAULT_LEVELS), "unstructured", "erk", torch.float32, 400, 200, None,
                     demo.make_train_fn(data[0], data[1], lr=0.05),
                     [data[0][i: i + 256] for i in range(0, len(data[0]), 256)], data[2], data[3], out, False,
                     lambda *a: None, final, distill)


@torch.no_grad()
def agreement(model, original, x) -> float:
    """Percent of the test images on which ``model`` predicts what ``original`` predicts (eval mode)."""
    model.eval(), original.eval()
    return float((model(x).argmax(1) == original(x).argmax(1)).float().mean()) * 100.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--gmp", action="store_true", help="also train the separate GMP networks (the goals' baseline)")
    p.add_argument("--out", default=os.path.join("bench", "results", "dense-fidelity", "digits"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    data = demo.load_digits_split()
    variants = parse_variants(a.variants)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in a.seeds.split(",")):
            torch.manual_seed(seed)
            dense = demo.DigitsCNN()
            base = job_for(seed, data, tmp, None, None)
            before, state = demo._train_dense(base, dense, 600)
            gmp = demo._run_gmp(base, state, 3, set())[0] if a.gmp else [float("nan")] * 3
            original = demo.DigitsCNN()
            original.load_state_dict(state)
            for name, final, init, w, T, phases in variants:
                d = ec.DistillConfig(weight=w, temperature=T, phases=phases) if w > 0 else None
                t0 = time.perf_counter()
                res, _, _, acc, _ = demo._run_elsa(job_for(seed, data, tmp, final, d), state, True, init)
                row = dict(variant=name, seed=seed, final_steps=final, densify_init=init, distill_weight=w,
                           temperature=T, phases=phases, agree=round(agreement(res.model, original, data[2]), 3),
                           dense_before=round(before, 3), **{f"level{t + 1}": round(v, 3)
                                                                            for t, v in enumerate(acc[:3])},
                           dense_after=round(acc[3], 3), dense_diff=round(acc[3] - before, 3),
                           **{f"gmp{t + 1}": round(v, 3) for t, v in enumerate(gmp)},
                           seconds=round(time.perf_counter() - t0, 1))
                rows.append(row)
                print(row, flush=True)
    write(rows, a.out, " ".join(["python -m bench.dense_digits"] + list(argv or [])))
    return 0


def write(rows: list[dict], out: str, command: str) -> None:
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["cpu", "torch"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__})
    lines = ["# digits: the dense level after ELSA against the schedule and the distillation term\n",
             f"Command: `{command}`  ", f"Machine: {platform.machine()}, {os.cpu_count()} cores, 1 torch thread, "
             f"torch {torch.__version__}.  ", "Accuracy in % of the 540 test images (1 image = 0.185 points); "
             "mean ± std over the seeds.\n",
             "| variant | final steps | densify_init | distill weight | T | phases | level 1 (90%) | level 2 (75%) | "
             "level 3 (50%) | dense after | dense before | after - before | agreement with the original |",
             "|---|---:|---|---:|---:|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["variant"] for r in rows))

    def ms(vals):
        return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.2f}"

    for n in names:
        rs = [r for r in rows if r["variant"] == n]
        r0 = rs[0]
        lines.append(f"| {n} | {r0['final_steps']} | {r0['densify_init']} | {r0['distill_weight']:g} | "
                     f"{r0['temperature']:g} | {r0['phases'] if r0['distill_weight'] else '-'} | "
                     + " | ".join(ms([r[k] for r in rs]) for k in ("level1", "level2", "level3", "dense_after",
                                                                   "dense_before", "dense_diff", "agree")) + " |")
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
