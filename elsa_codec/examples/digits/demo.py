"""``elsa demo``: ELSA against separately trained GMP networks on scikit-learn's digits.

The experiment of ELSA (Halvachi et al., arXiv 2312.06872, section 3), shrunk to run on two CPU
cores in under three minutes: a small CNN (Conv2d + BatchNorm2d + Linear) on the 1797 8x8
handwritten digits shipped with scikit-learn (``sklearn.datasets.load_digits``, no download;
a fixed stratified 70/30 train/test split, the same for every seed).

1. Train the dense network (``--dense-steps`` SGD steps, default 600: about 30 epochs of
   mini-batches of 64; SGD with Nesterov momentum 0.9, weight decay 5e-4, cosine learning rate
   from 0.05 per phase, random 1-pixel shifts).
2. ELSA (:func:`elsa_codec.embed_levels`): embed three levels (90%, 75%, 50% sparsity by
   default, spread over the layers by ERK): per level a GMP sparsify phase (``--steps``, default
   400: cubic ramp over the first 70%, then fine-tuning) and a densify phase (``--densify-steps``,
   default 200); the last densify phase (``--final-steps``, default ``--densify-steps``) trains
   the dense network. Every densify phase distils toward the dense network of step 1
   (:class:`elsa_codec.DistillConfig`: ``--distill-weight`` times the temperature-softened KL of
   its logits, ``--distill-temperature``; weight 0 turns it off). Biases and batch-norm affine
   parameters are frozen with level 1 (``freeze_shared``), per-level batch-norm statistics are
   recalibrated; the result is encoded and saved to ONE file.
3. The baseline (the paper's): one GMP network per level, each pruned from the same dense
   network with the training budget of one ELSA level (``--steps + --densify-steps``), stored
   as its own dense-format safetensors file.
4. The ELSA file is loaded into a fresh model with :func:`elsa_codec.load` and every level is
   evaluated (:func:`elsa_codec.set_level`).

Printed: a table (level, structure, sparsity, test accuracy of the ELSA level, of the separate GMP
network, the difference; the dense network before and after), file sizes (ELSA vs the separate
files, a compressed estimate for them, and dense + one bitmask per level), and whether the goals
hold: every ELSA level within 1.0 accuracy point of its separate GMP network (not more than 1.0
below; judged on the mean over the seeds), and the final dense network at most 0.1 point below the
initial one. A PNG plot of accuracy vs
sparsity, the table and a JSON record go to ``--out`` (default ``elsa-demo-out/``).

Variants: ``--dtype bfloat16`` (ship and serve in bf16: training keeps float32 master weights,
which is ten times faster than bf16 arithmetic on CPU, and every weight is rounded to bf16 and
encoded in it when frozen (``embed_levels(encode_dtype=torch.bfloat16)``), ``k = 2`` code bits
of bf16's 7 stored mantissa bits; the separate GMP networks and the dense network are cast to bf16
and evaluated in bf16 too); ``--structure 2:4`` (levels ``1:4, 2:4``, both 2:4-compatible, so each
level can run on 2:4 sparse tensor cores; generally ``--structure N:M`` gives the levels
``1:M, 2:M, 4:M, ..., N:M``; the first conv, whose input dimension 9 is no multiple of M, stays
dense and out of the levels); ``--structure block:RxC``; ``--seeds 0,1,2`` (mean +- standard
deviation over seeds); ``--quick`` (a few steps, for tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ELSAError
from ...training.distill import DistillConfig

__all__ = ["DigitsCNN", "load_digits_split", "make_train_fn", "evaluate", "run", "main"]

DEFAULT_LEVELS = (0.9, 0.75, 0.5)
GOAL_POINTS = 1.0
#: The dense level after ELSA may trail the dense network before it by at most this many points.
DENSE_GOAL_POINTS = 0.1
#: The demo's distillation term toward the dense network before ELSA (``bench/dense_digits.py``).
DISTILL = DistillConfig(weight=1.0, temperature=1.0)


# --------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------
def load_digits_split(dtype: torch.dtype = torch.float32, test_size: float = 0.3):
    """The digits data set as tensors: ``(x_train, y_train, x_test, y_test)``.

    ``x``: ``[N, 1, 8, 8]`` of ``dtype``, pixel values (0..16) standardised with the training
    set's mean and standard deviation; ``y``: ``[N]`` int64 labels 0..9. The split is stratified
    and fixed (``random_state=0``): 1257 training and 540 test images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, stratify=d.target, random_state=0)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = ((x - mean) / std).to(dtype)
    return x[tr], y[tr], x[te], y[te]


class DigitsCNN(nn.Module):
    """Small CNN for ``[N, 1, 8, 8]`` inputs: three 3x3 conv layers (16, 32, 64 channels, no bias)
    each with BatchNorm2d and ReLU, two 2x2 max-pools, and a Linear ``256 -> 10``. 25,744 prunable
    weights (conv 144 + 4,608 + 18,432, linear 2,560). Returns logits ``[N, 10]``."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w * 2 * 2, num_classes)
        self.relu = nn.ReLU()  # a module, so hooks (the pruning pipeline's soft activations) reach it

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(self.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(x.flatten(1))


def make_train_fn(x, y, *, batch_size: int = 64, lr: float = 0.05, momentum: float = 0.9,
                  weight_decay: float = 5e-4, shift: int = 1):
    """A ``train_fn(model, phase)`` for :func:`elsa_codec.embed_levels`: ``phase.steps`` steps of
    SGD (Nesterov momentum, weight decay) with a cosine learning-rate decay from ``lr`` to 0 over
    the phase, mini-batches of ``batch_size`` drawn epoch by epoch in an order seeded by
    ``phase.seed``, random shifts of up to ``shift`` pixels as augmentation, cross-entropy loss."""

    def train_fn(model, phase):
        g = torch.Generator().manual_seed(phase.seed if phase.seed is not None else 0)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, phase.steps) / max(phase.steps, 1)))
        )
        model.train()
        n = len(y)
        perm, pos = torch.randperm(n, generator=g), 0
        for _ in range(phase.steps):
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            idx = perm[pos : pos + batch_size]
            pos += batch_size
            xb = x[idx]
            if shift:
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(xb).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return train_fn


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself for float32, else a copy cast to ``dtype`` (round to nearest)."""
    if dtype == torch.float32:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in percent (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean()) * 100.0
    model.train(was)
    return acc


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
def _save_plain(state_dict, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, path)
    return os.path.getsize(path)


def _compressed_estimate(state_dict, prunable) -> int:
    """Bytes of a sparse-bitmask file: prunable tensors as their nonzero values + 1 bit per weight,
    the rest as they are (no header)."""
    total = 0
    for k, v in state_dict.items():
        if k in prunable:
            total += int((v != 0).sum()) * v.element_size() + (v.numel() + 7) // 8
        else:
            total += v.numel() * v.element_size()
    return total


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def _levels_for(structure: str, levels_arg):
    if levels_arg:
        return [s.strip() if ":" in s else float(s) for s in levels_arg.split(",") if s.strip()], "unstructured" if ":" in levels_arg else structure
    from ...format.structure import parse_structure

    st = parse_structure(structure)
    if st.kind == "nm":
        ns, n = [], 1
        while n < st.n:
            ns.append(n)
            n *= 2
        ns.append(st.n)
        return [f"{k}:{st.m}" for k in ns], "unstructured"
    return list(DEFAULT_LEVELS), str(st)


def run(
    *,
    seed: int = 0,
    levels=None,
    structure: str = "unstructured",
    sparsifier: str = "erk",
    dtype: torch.dtype = torch.float32,
    dense_steps: int = 600,
    steps: int = 400,
    densify_steps: int = 200,
    lr: float = 0.05,
    freeze_shared: bool = True,
    densify_init: str = "zero",
    final_steps: int | None = None,
    distill=None,
    out: str = "elsa-demo-out",
    progress: bool = True,
    log=print,
) -> dict:
    """One seed of the demo. Returns a dict of results (accuracies in percent, sizes in bytes).

    Raises:
        ELSAError: bad levels or structure.
    """
    from ...format.structure import parse_levels
    from ...training.weights import prunable_weights

    t_start = time.perf_counter()
    lv, st = _levels_for(structure, levels)
    parse_levels(lv, st)  # bad levels fail here, before any training
    os.makedirs(out, exist_ok=True)
    data = load_digits_split()
    torch.manual_seed(seed)
    dense = DigitsCNN()
    # N:M patterns run along the input dimension; conv1's (1*3*3 = 9) fits no M > 1: keep it dense.
    nm = any(isinstance(v, str) and ":" in v for v in lv)
    filter_fn = (lambda m, fqn: isinstance(m, (nn.Linear, nn.Conv2d)) and fqn != "conv1") if nm else None
    pnames = list(prunable_weights(dense, filter_fn=filter_fn))
    job = _Job(seed, lv, st, sparsifier, dtype, steps, densify_steps, filter_fn, make_train_fn(data[0], data[1], lr=lr),
               [data[0][i : i + 256] for i in range(0, len(data[0]), 256)], data[2].to(dtype), data[3], out, progress, log,
               final_steps, distill)
    acc_before, dense_state = _train_dense(job, dense, dense_steps)
    res, encoded, elsa_path, acc_elsa, how = _run_elsa(job, dense_state, freeze_shared, densify_init)
    T = res.num_levels
    acc_gmp, gmp_sp, gmp_sizes, gmp_est = _run_gmp(job, dense_state, T, set(pnames))
    dense_size = _save_plain(_cast(dense, dtype).state_dict(), os.path.join(out, f"dense-seed{seed}.safetensors"))
    bitmask_bytes = sum((encoded[n].numel() + 7) // 8 for n in pnames)
    return dict(
        seed=seed,
        levels=[str(v) for v in lv],
        structures=list(res.structures),
        sparsity=list(res.sparsities),
        gmp_sparsity=gmp_sp,
        acc_elsa=acc_elsa[:T],
        acc_gmp=acc_gmp,
        acc_dense_before=acc_before,
        acc_dense_after=acc_elsa[T],
        size_elsa=os.path.getsize(elsa_path),
        size_gmp_files=sum(gmp_sizes),
        size_gmp_compressed=sum(gmp_est),
        size_dense=dense_size,
        size_dense_bitmasks=dense_size + T * bitmask_bytes,
        code_bits=res.code_bits,
        dtype=str(dtype).replace("torch.", ""),
        sparsifier=sparsifier,
        prunable=pnames,
        seconds=time.perf_counter() - t_start,
        evaluated_via=how,
        history=[{k: v for k, v in h.items()} for h in res.history],
    )


@dataclasses.dataclass
class _Job:
    """What the three parts of one seed's run share."""

    seed: int
    levels: list
    structure: str
    sparsifier: str
    dtype: torch.dtype
    steps: int
    densify_steps: int
    filter_fn: object
    train_fn: object
    calib: list
    x_eval: torch.Tensor  # evaluation (serving) dtype; training keeps float32 master weights
    y_eval: torch.Tensor
    out: str
    progress: bool
    log: object
    final_steps: int | None = None  # None: densify_steps
    distill: object = None  # a DistillConfig, or None


def _train_dense(job: _Job, dense: nn.Module, dense_steps: int) -> tuple:
    """Train the dense network; ``(test accuracy, its state dict)``."""
    from ...training.phases import Phase

    t0 = time.perf_counter()
    job.train_fn(dense, Phase("dense", 0, dense_steps, seed=job.seed * 1_000_003 + 17))
    acc = evaluate(_cast(dense, job.dtype), job.x_eval, job.y_eval)
    job.log(f"[seed {job.seed}] dense network: test accuracy {acc:.2f}%  ({time.perf_counter() - t0:.1f} s)")
    return acc, {k: v.clone() for k, v in dense.state_dict().items()}


def _run_elsa(job: _Job, dense_state: dict, freeze_shared: bool, densify_init: str) -> tuple:
    """ELSA from the dense network, saved and served at every level; ``(result, encoded, path,
    accuracy per level 1..T+1, how it was evaluated)``."""
    from ...format.encode import extract
    from ...format.file import load_file, save_file
    from ...serving.swap import load, set_level
    from ...training.run import embed_levels

    t0 = time.perf_counter()
    model = DigitsCNN()
    model.load_state_dict(dense_state)
    res = embed_levels(
        model, job.levels, job.train_fn, steps=job.steps, densify_steps=job.densify_steps, structure=job.structure,
        sparsifier=job.sparsifier, bn_calibration=job.calib, filter_fn=job.filter_fn, seed=job.seed,
        progress=job.progress, freeze_shared=freeze_shared, densify_init=densify_init,
        final_steps=job.final_steps, distill=job.distill, encode_dtype=job.dtype if job.dtype != torch.float32 else None,
    )
    encoded = res.encode()
    path = os.path.join(job.out, f"elsa-seed{job.seed}.safetensors")
    save_file(encoded, path)
    t_elsa = time.perf_counter() - t0
    enc = load_file(path)
    served = load(path, DigitsCNN().to(job.dtype)).eval()
    plain = DigitsCNN().to(job.dtype).eval()
    acc, max_diff = [], 0.0
    for t in range(1, res.num_levels + 2):
        set_level(served, t)
        acc.append(evaluate(served, job.x_eval, job.y_eval))
        plain.load_state_dict(extract(enc, t))  # cross-check the serving layers against the plain extraction
        with torch.no_grad():
            max_diff = max(max_diff, float((served(job.x_eval).float() - plain(job.x_eval).float()).abs().max()))
    how = f"elsa_codec.load + set_level (max |logit difference| vs extract(): {max_diff:.2g})"
    job.log(f"[seed {job.seed}] ELSA: {res.num_levels} levels embedded and encoded in {t_elsa:.1f} s; evaluated via {how}")
    return res, encoded, path, acc, how


def _run_gmp(job: _Job, dense_state: dict, T: int, pnames: set) -> tuple:
    """One GMP network per level, from the dense network; ``(accuracies, sparsities, file sizes,
    compressed-size estimates)``."""
    from ...training.bn import recalibrate_bn
    from ...training.run import prune_gmp

    t0 = time.perf_counter()
    acc, sps, sizes, est = [], [], [], []
    for i, (lvl, _) in enumerate(zip(job.levels, range(T))):
        net = DigitsCNN()
        net.load_state_dict(dense_state)
        masks = prune_gmp(net, lvl, job.train_fn, steps=job.steps + job.densify_steps, structure=job.structure,
                          sparsifier=job.sparsifier, filter_fn=job.filter_fn, seed=job.seed * 7 + 1000 + i,
                          progress=job.progress)
        recalibrate_bn(net, job.calib)
        net = _cast(net, job.dtype)
        acc.append(evaluate(net, job.x_eval, job.y_eval))
        sps.append(1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()))
        sd = net.state_dict()
        sizes.append(_save_plain(sd, os.path.join(job.out, f"gmp-level{i + 1}-seed{job.seed}.safetensors")))
        est.append(_compressed_estimate(sd, pnames))
    job.log(f"[seed {job.seed}] separate GMP networks: {T} trained in {time.perf_counter() - t0:.1f} s")
    return acc, sps, sizes, est


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _agg(vals):
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return m, s


def _fmt(vals, width=13):
    m, s = _agg(vals)
    txt = f"{m:.2f}" if len(vals) == 1 else f"{m:.2f} ± {s:.2f}"
    return txt.rjust(width)


def _kib(b: float) -> str:
    return f"{b / 1024:.1f} KiB"


def summarize(runs: list[dict]) -> tuple[str, dict]:
    """The printed report for one or several seeds, and the aggregated numbers (means)."""
    r0 = runs[0]
    T = len(r0["acc_elsa"])
    lines = []
    seeds = ",".join(str(r["seed"]) for r in runs)
    lines.append(
        f"ELSA demo: digits 8x8, DigitsCNN, dtype {r0['dtype']}, sparsifier {r0['sparsifier']}, "
        f"k={r0['code_bits']} code bits, seed(s) {seeds}" + (" (mean ± std over seeds)" if len(runs) > 1 else "")
    )
    lines.append(f"prunable tensors: {', '.join(r0['prunable'])}")
    lines.append("")
    hdr = (f"{'level':<6} {'structure':<13} {'sparsity':>9} {'ELSA acc %':>13} {'baseline %':>13} "
           f"{'ELSA - base':>13}  baseline")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    agg = {"levels": [], "dense": {}}
    goals = []
    for t in range(T):
        e = [r["acc_elsa"][t] for r in runs]
        g = [r["acc_gmp"][t] for r in runs]
        d = [a - b for a, b in zip(e, g)]
        sp = statistics.fmean(r["sparsity"][t] for r in runs)
        lines.append(
            f"{t + 1:<6} {r0['structures'][t]:<13} {sp * 100:>8.1f}% {_fmt(e)} {_fmt(g)} {_fmt(d)}  separate GMP network"
        )
        ok = statistics.fmean(d) >= -GOAL_POINTS
        goals.append((f"level {t + 1} ({sp:.0%}): ELSA {statistics.fmean(e):.2f}% vs separate GMP {statistics.fmean(g):.2f}% "
                      f"(diff {statistics.fmean(d):+.2f} points, goal >= -{GOAL_POINTS:.1f})", ok))
        agg["levels"].append(dict(level=t + 1, sparsity=sp, elsa=_agg(e), gmp=_agg(g), diff=_agg(d), goal_met=ok))
    b = [r["acc_dense_before"] for r in runs]
    a = [r["acc_dense_after"] for r in runs]
    dd = [x - y for x, y in zip(a, b)]
    lines.append(f"{'dense':<6} {'-':<13} {0.0:>8.1f}% {_fmt(a)} {_fmt(b)} {_fmt(dd)}  dense network before ELSA")
    lines.append(f"(ELSA acc of 'dense' = level {T + 1}, the dense network after ELSA; sparsity = fraction of zeros "
                 "over the prunable tensors)")
    okd = statistics.fmean(dd) >= -DENSE_GOAL_POINTS
    goals.append((f"dense: after {statistics.fmean(a):.2f}% vs before {statistics.fmean(b):.2f}% "
                  f"(diff {statistics.fmean(dd):+.2f} points, goal >= -{DENSE_GOAL_POINTS:.1f})", okd))
    agg["dense"] = dict(before=_agg(b), after=_agg(a), diff=_agg(dd), goal_met=okd)
    lines.append("")
    lines.append("file sizes (safetensors files written to --out):")
    sz = lambda k: statistics.fmean(r[k] for r in runs)  # noqa: E731
    lines.append(f"  ELSA, one file (all {T} levels + dense, per-level BN stats):   {_kib(sz('size_elsa')):>12}")
    lines.append(f"  {T} separate sparse files, dense format:                       {_kib(sz('size_gmp_files')):>12}"
                 f"   (+ dense file: {_kib(sz('size_gmp_files') + sz('size_dense'))})")
    lines.append(f"  {T} separate sparse files, compressed estimate (values+bitmask): {_kib(sz('size_gmp_compressed')):>10}"
                 f"   (+ dense file: {_kib(sz('size_gmp_compressed') + sz('size_dense'))})")
    lines.append(f"  dense file + one bitmask per level:                          {_kib(sz('size_dense_bitmasks')):>12}")
    lines.append(f"  dense file alone:                                            {_kib(sz('size_dense')):>12}")
    lines.append("")
    lines.append("goals (paper's claim):")
    for txt, ok in goals:
        lines.append(f"  [{'MET' if ok else 'NOT MET'}] {txt}")
    agg["all_goals_met"] = all(ok for _, ok in goals)
    agg["sizes"] = {k: sz(k) for k in ("size_elsa", "size_gmp_files", "size_gmp_compressed", "size_dense", "size_dense_bitmasks")}
    return "\n".join(lines), agg


def plot(runs: list[dict], path: str) -> None:
    """Accuracy vs sparsity (PNG, matplotlib Agg): ELSA levels, separate GMP networks, dense before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = len(runs[0]["acc_elsa"])
    sp = [100 * statistics.fmean(r["sparsity"][t] for r in runs) for t in range(T)]
    e = [_agg([r["acc_elsa"][t] for r in runs]) for t in range(T)]
    g = [_agg([r["acc_gmp"][t] for r in runs]) for t in range(T)]
    a = _agg([r["acc_dense_after"] for r in runs])
    b = _agg([r["acc_dense_before"] for r in runs])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.errorbar([0.0] + sp[::-1], [a[0]] + [m for m, _ in e][::-1], yerr=[a[1]] + [s for _, s in e][::-1],
                marker="o", capsize=3, label="ELSA (one file; level T+1 = dense)")
    ax.errorbar(sp, [m for m, _ in g], yerr=[s for _, s in g], marker="s", linestyle="--", capsize=3,
                label="separate GMP networks")
    ax.axhline(b[0], color="gray", linestyle=":", label=f"dense before ELSA ({b[0]:.2f}%)")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    seeds = ",".join(str(r["seed"]) for r in runs)
    ax.set_title(f"digits 8x8, DigitsCNN, {runs[0]['dtype']}, seeds {seeds}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elsa demo",
        description=(
            "ELSA vs separately trained GMP networks on scikit-learn's 8x8 digits (small CNN, CPU). "
            "Trains a dense network, embeds nested sparse levels with ELSA (one file), trains one GMP "
            "network per level, loads the ELSA file into a fresh model and evaluates every level. "
            "Prints a table, file sizes and whether the goals hold; writes a PNG plot to --out."
        ),
    )
    p.add_argument("--model", choices=("digits", "minilm"), default="digits",
                   help="digits (this demo) or minilm: all-MiniLM-L6-v2 distilled into ELSA levels on Python's "
                        "documentation, ~25 min (its options: elsa demo --model minilm --help)")
    p.add_argument("--out", default="elsa-demo-out", help="output folder (plot, table, JSON, files); default elsa-demo-out/")
    p.add_argument("--seed", type=int, default=0, help="seed of a single run (default 0)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2: report mean ± std")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the files and of evaluation (training keeps float32 master weights)")
    p.add_argument("--structure", default="unstructured",
                   help="unstructured (levels 90/75/50%%), N:M, e.g. 2:4 (levels 1:4,2:4; 4:8 -> 1:8,2:8,4:8), or block:RxC")
    p.add_argument("--levels", default=None, help="override the levels: e.g. 0.9,0.75,0.5 or 1:8,2:8,4:8 (sparsest first)")
    p.add_argument("--sparsifier", choices=("uniform", "global", "erk"), default="erk",
                   help="how each level's sparsity spreads over the layers (default erk; same for ELSA and GMP)")
    p.add_argument("--dense-steps", type=int, default=None, help="SGD steps of the dense training (default 600; quick 40)")
    p.add_argument("--steps", type=int, default=None, help="steps of each ELSA sparsify phase (default 400; quick 20)")
    p.add_argument("--densify-steps", type=int, default=None,
                   help="steps of each densify phase (default 200; quick 10); a GMP network gets --steps + --densify-steps")
    p.add_argument("--no-freeze-shared", action="store_true",
                   help="let biases and batch-norm affine parameters keep training after level 1 (default: frozen)")
    p.add_argument("--densify-init", choices=("zero", "restore"), default="zero",
                   help="pruned weights restart from zero (default) or from their values before the sparsify phase")
    p.add_argument("--final-steps", type=int, default=None,
                   help="steps of ELSA's final dense phase (default: --densify-steps)")
    p.add_argument("--distill-weight", type=float, default=DISTILL.weight,
                   help=f"weight of the distillation term toward the dense network before ELSA (its logits, "
                        f"every densify phase; default {DISTILL.weight:g}; 0: off)")
    p.add_argument("--distill-temperature", type=float, default=DISTILL.temperature,
                   help=f"temperature of that term (default {DISTILL.temperature:g})")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (cosine decay per phase)")
    p.add_argument("--quick", action="store_true", help="a few steps only (tests; accuracies are not meaningful)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: this CNN's tensors are too small for intra-op threads to pay; "
                        "2 threads measured several times slower on the 2-core machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _distill(a):
    """The demo's :class:`elsa_codec.DistillConfig` from ``--distill-*`` (None for weight 0).

    Raises:
        ELSAError: a negative weight or a temperature <= 0.
    """
    if a.distill_weight == 0:
        return None
    return DistillConfig(weight=a.distill_weight, temperature=a.distill_temperature)


def _which_model(argv: list[str]) -> tuple[str, list[str]]:
    """``(model, the other arguments)`` from ``--model digits|minilm`` (default digits)."""
    from ...argparsing import Parser

    pre = Parser(prog="elsa demo", add_help=False)
    pre.add_argument("--model", choices=("digits", "minilm"), default="digits")
    known, rest = pre.parse_known_args(argv)
    return known.model, rest


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``argv`` without the program name (``None``: ``sys.argv[1:]``). Returns 0 on
    success, 2 on bad input (the error is printed). ``--model minilm`` runs
    :mod:`elsa_codec.examples.minilm.run` with the other arguments."""
    model, argv = _which_model(list(sys.argv[1:] if argv is None else argv))
    if model == "minilm":
        from ..minilm.run import main as minilm_main

        return minilm_main(argv, prog="elsa demo --model minilm")
    a = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    dense_steps = a.dense_steps if a.dense_steps is not None else (40 if a.quick else 600)
    steps = a.steps if a.steps is not None else (20 if a.quick else 400)
    densify_steps = a.densify_steps if a.densify_steps is not None else (10 if a.quick else 200)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()] if a.seeds else [a.seed]
    except ValueError:
        print(f"elsa demo: error: --seeds must be comma-separated integers, got {a.seeds!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    runs = []
    try:
        for s in seeds:
            runs.append(run(seed=s, levels=a.levels, structure=a.structure, sparsifier=a.sparsifier, dtype=dtype,
                            dense_steps=dense_steps, steps=steps, densify_steps=densify_steps, lr=a.lr, out=a.out,
                            progress=not a.no_progress, freeze_shared=not a.no_freeze_shared,
                            densify_init=a.densify_init, final_steps=a.final_steps, distill=_distill(a)))
    except ELSAError as e:
        print(f"elsa demo: error: {e}", file=sys.stderr)
        return 2
    text, agg = summarize(runs)
    elapsed = time.perf_counter() - t0
    text += f"\n\ntotal time: {elapsed:.1f} s on {torch.get_num_threads()} CPU thread(s)"
    print()
    print(text)
    png = os.path.join(a.out, "accuracy_vs_sparsity.png")
    plot(runs, png)
    with open(os.path.join(a.out, "table.txt"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": runs, "summary": agg, "seconds": elapsed,
                   "args": {k: v for k, v in vars(a).items()}}, f, indent=1, default=str)
    print(f"plot: {png}; table and JSON: {a.out}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
