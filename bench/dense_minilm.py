"""MiniLM's dense level against the final dense phase's schedule, branched from one snapshot.

``python -m bench.dense_minilm [--group unstructured|nm] [--variants restore:5e-4:40,...] [--out DIR]``

The ELSA run of ``bench/results/minilm-elsa`` (all-MiniLM-L6-v2 distilled on Python's documentation,
levels 0.7/0.5/0.3 or 2:4, 380 sparsify + 40 densify steps per level, AdamW, warm-up + cosine per
phase, ``densify_init="restore"``) is trained once up to the start of its final dense phase, with a
:class:`elsa_codec.LevelEmbedder` in this file's own loop, and saved (``--snapshot``). Every variant
then resumes the embedder from that snapshot with its own final phase, so all variants share the
same sparse levels bit for bit:

- ``init``: what the dense-only weights start from: ``restore`` (the run's own densify_init: their
  values before the last sparsify phase), ``zero``, or ``original`` (the pretrained model's values);
- ``lr``: the phase's AdamW peak learning rate (warm-up 5%, cosine to 0);
- ``steps``: the final phase's optimizer steps.

The loss is the example's distillation toward the original model (sentence-embedding cosine plus
the hidden-state term), so this bench measures the schedule, not the loss. Each variant's dense
level is scored on the 248 held-out sentences (mean / min cosine to the original's embeddings) and
appended to ``results.csv`` with the machine.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import time

import torch

import elsa_codec as ec
from elsa_codec.examples.minilm import distill, run

GROUPS = {"unstructured": [0.7, 0.5, 0.3], "nm": ["2:4"]}


def config(levels, final_steps: int) -> ec.ELSAConfig:
    return ec.ELSAConfig(levels=list(levels), steps=380, densify_steps=40, final_steps=final_steps,
                         densify_init="restore", seed=0)


def train_phase(emb, model, batches, ph, lr: float) -> None:
    """One phase as the example's ``distill.make_train_fn`` runs it (a fresh AdamW without weight
    decay, 5% linear warm-up then cosine to 0, batches drawn from ``phase.seed``), in this loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    emb.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: distill.warmup_cosine(s, ph.steps))
    model.eval()
    for batch in batches.stream(ph.steps, ph.seed):
        loss = distill.distill_loss(model, batch, hidden_weight=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    emb.detach()


def snapshot(path: str, levels, batches) -> None:
    student, _ = run.load_encoder(None)
    emb = ec.LevelEmbedder(student, config(levels, 40))
    t0 = time.perf_counter()
    while not emb.phase.final:
        ph = emb.phase
        train_phase(emb, student, batches, ph, 5e-4)
        print(f"{ph.name}: done at step {emb.step} ({time.perf_counter() - t0:.0f} s)", flush=True)
    torch.save({"model": student.state_dict(), "embedder": emb.state_dict()}, path)


def variant(path: str, levels, batches, ref, init: str, lr: float, steps: int) -> dict:
    sd = torch.load(path, weights_only=True)
    student, _ = run.load_encoder(None)
    student.load_state_dict(sd["model"])
    cfg = config(levels, steps)
    emb = ec.LevelEmbedder(student, cfg)
    state = dict(sd["embedder"], config=cfg.to_json())  # the same plan up to the final phase's length
    emb.load_state_dict(state)
    assert emb.phase.final, emb.phase
    with torch.no_grad():
        if init != "restore":
            orig = dict(run.load_encoder(None)[0].named_parameters())
            for n, p in emb.params.items():
                free = ~emb.state.frozen[n]
                p.copy_(torch.where(free, torch.zeros_like(p) if init == "zero" else orig[n].detach(), p))
    t0 = time.perf_counter()
    train_phase(emb, student, batches, emb.phase, lr)
    seconds = time.perf_counter() - t0
    res = emb.finalize()
    scores, _ = ref.score(res.model)
    s = scores["pydoc held-out"]
    return dict(init=init, lr=lr, final_steps=steps, cos_mean=round(s["cos_mean"], 5), cos_min=round(s["cos_min"], 5),
                nn_agree=round(s["nn_agree"], 4), seconds=round(seconds, 1))


def plot(csv_path: str, png: str) -> None:
    """Dense-level mean cosine against the final phase's steps, one line per (group, init, lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key in sorted({(r["group"], r["init"], r["lr"]) for r in rows}):
        pts = sorted((int(r["final_steps"]), float(r["cos_mean"])) for r in rows if (r["group"], r["init"], r["lr"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]}, init {key[1]}, lr {key[2]}")
    ax.axhline(0.995, color="gray", linestyle=":", label="goal 0.995")
    ax.set_xlabel("steps of the final dense phase")
    ax.set_ylabel("dense level: mean cosine to the original (held-out)")
    ax.set_title("all-MiniLM-L6-v2: ELSA's dense level vs its final phase")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", choices=tuple(GROUPS), default="unstructured")
    p.add_argument("--variants", default="restore:5e-4:40", help="init:lr:steps,... (init restore|zero|original)")
    p.add_argument("--snapshot", default=None, help="snapshot file (made when absent)")
    p.add_argument("--out", default=os.path.join("bench", "results", "dense-fidelity", "minilm"))
    p.add_argument("--plot-only", action="store_true", help="only redraw dense_vs_final_steps.png from results.csv")
    a = p.parse_args(argv)
    out = os.path.join(a.out, "results.csv")
    if a.plot_only:
        plot(out, os.path.join(a.out, "dense_vs_final_steps.png"))
        return 0
    levels = GROUPS[a.group]
    snap = a.snapshot or f"/tmp/minilm-final-snapshot-{a.group}.pt"
    settings = run.Settings()
    teacher, tok = run.load_encoder(None, trainable=False)
    batches = distill.TeacherBatches(teacher, tok, run._train_sentences(settings), batch_size=32, max_length=64)
    ref = run.Reference(teacher, tok, {"pydoc held-out": run.eval_sets(settings)["pydoc held-out"]})
    if not os.path.exists(snap):
        snapshot(snap, levels, batches)
    os.makedirs(a.out, exist_ok=True)
    for v in a.variants.split(","):
        init, lr, steps = v.split(":")
        row = dict(group=a.group, **variant(snap, levels, batches, ref, init, float(lr), int(steps)),
                   cpu=platform.processor() or platform.machine(), torch=torch.__version__)
        print(row, flush=True)
        new = not os.path.exists(out)
        with open(out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        plot(out, os.path.join(a.out, "dense_vs_final_steps.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
