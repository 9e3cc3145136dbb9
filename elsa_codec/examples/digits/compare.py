"""``elsa compare``: the sparsification methods side by side, as ELSA levels and as separate networks.

For each model (the digits CNN of ``elsa demo`` and an MLP on the same digits), each seed and each
method (magnitude GMP, random pruning with uniform and ERK ratios, L0, sparse variational
dropout, lottery tickets with rewinding, early-bird tickets; :mod:`elsa_codec.training.sparsifiers`):

1. a dense network is trained (``--dense-steps``, shared by the methods of that model and seed;
   the pruning pipeline's methods with ZerO get their own, ZerO-initialised);
2. **ELSA**: :func:`elsa_codec.embed_levels` embeds the levels (default 0.98, 0.95, 0.9, 0.75,
   0.5) with the method (``--steps`` sparsify + ``--densify-steps`` densify steps per level);
3. **separate**: one network per level pruned with :func:`elsa_codec.prune_gmp` and the same
   method, for the budget of one ELSA level (``--steps + --densify-steps``).

``--pipeline`` runs the end-to-end pruning pipeline's study instead (arXiv 2312.01653,
:class:`elsa_codec.PruningPipeline`): GMP, the whole pipeline and the pipeline without each stage
in turn, at 99.7 / 99 / 97 / 90% sparsity; the table then also lists each ablation's change.

Batch-norm statistics are recalibrated per level; test accuracy on the fixed digits split and the
wall time of each run are recorded (denormal floats flushed to zero, for every method alike). The
same ``train_fn`` (SGD with Nesterov momentum, cosine decay per phase) serves every method: its
loss is cross-entropy with :func:`elsa_codec.label_smoothing` plus :func:`elsa_codec.sparsity_penalty`
(both zero except for the methods that set them). Writes ``results.csv`` (long format), ``table.md``
and ``accuracy_vs_sparsity.png`` to ``--out``; runs the (model, seed) jobs in ``--jobs`` processes.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METHODS", "DEFAULT_METHODS", "PIPELINE_ABLATIONS", "PIPELINE_METHODS", "MODELS", "DigitsMLP",
           "make_sparsifier", "run_job", "run", "main"]

#: Method name -> what it is (:func:`make_sparsifier` builds it). Magnitude-ranked methods use ERK ratios.
METHODS = {
    "magnitude": ("GMP, ERK ratios (Zhu & Gupta 2017; Evci et al. 2020)"),
    "random-uniform": ("random, uniform ratios (Liu et al. 2022)"),
    "random-erk": ("random, ERK ratios (Liu et al. 2022)"),
    "l0": ("L0, hard-concrete gates (Louizos et al. 2018)"),
    "vd": ("sparse variational dropout (Molchanov et al. 2017)"),
    "lottery": ("lottery tickets with rewinding, ERK ratios (Frankle et al. 2019)"),
    "early-bird": ("early-bird tickets, ERK ratios (You et al. 2020)"),
    "pipeline": ("end-to-end pruning pipeline, every stage, ERK ratios (arXiv 2312.01653)"),
}
#: The pipeline's ablation: method name -> the :class:`elsa_codec.PruningPipeline` stage turned off.
PIPELINE_ABLATIONS = {
    "pipeline-no-zero": "zero_init",
    "pipeline-no-mask": "learned_mask",
    "pipeline-no-smoothing": "label_smoothing",
    "pipeline-no-soft-act": "soft_activations",
    "pipeline-no-soft-skip": "soft_skips",
}
METHODS.update({k: f"the pipeline without {v}" for k, v in PIPELINE_ABLATIONS.items()})
#: ``elsa compare`` without ``--methods``: the seven sparsification methods.
DEFAULT_METHODS = ("magnitude", "random-uniform", "random-erk", "l0", "vd", "lottery", "early-bird")
#: ``elsa compare --pipeline``: GMP against the pipeline and its ablation at extreme sparsities.
PIPELINE_METHODS = ("magnitude", "pipeline") + tuple(PIPELINE_ABLATIONS)
PIPELINE_LEVELS = (0.997, 0.99, 0.97, 0.9)
MODELS = ("cnn", "mlp")
DEFAULT_LEVELS = (0.98, 0.95, 0.9, 0.75, 0.5)


def make_sparsifier(method: str, seed: int):
    """The :class:`elsa_codec.Sparsifier` of ``method`` (a key of :data:`METHODS`).

    Raises:
        ELSAError: unknown method.
    """
    import elsa_codec as ec

    makers = {
        "magnitude": lambda: ec.MagnitudeSparsifier("erk"),
        "random-uniform": lambda: ec.RandomSparsifier("uniform", seed=seed),
        "random-erk": lambda: ec.RandomSparsifier("erk", seed=seed),
        "l0": lambda: ec.L0Sparsifier(strength=0.1, seed=seed),
        "vd": lambda: ec.VariationalDropoutSparsifier(strength=0.1, seed=seed),
        "lottery": lambda: ec.LotteryTicketSparsifier("erk", rounds=3),
        "early-bird": lambda: ec.EarlyBirdSparsifier("erk", interval=10, threshold=0.1, patience=3),
        "pipeline": lambda: ec.PruningPipeline("erk"),
    }
    if method in PIPELINE_ABLATIONS:
        off = PIPELINE_ABLATIONS[method]
        return ec.PruningPipeline("erk", **{off: 0.0 if off == "label_smoothing" else False})
    if method not in makers:
        raise ec.ELSAError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return makers[method]()


class DigitsMLP(nn.Module):
    """MLP for ``[N, 1, 8, 8]`` digits: ``64 -> 256 -> 256 -> 10`` with BatchNorm1d and ReLU
    (83,456 prunable weights). Returns logits ``[N, 10]``."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(64, width), nn.BatchNorm1d(width)
        self.fc2, self.bn2 = nn.Linear(width, width), nn.BatchNorm1d(width)
        self.fc3 = nn.Linear(width, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn1(self.fc1(x.flatten(1))))
        return self.fc3(self.relu(self.bn2(self.fc2(x))))


def _new_model(kind: str) -> nn.Module:
    from .demo import DigitsCNN

    return DigitsCNN() if kind == "cnn" else DigitsMLP()


def make_train_fn(x, y, *, batch_size: int = 64, lr: float = 0.05):
    """``train_fn(model, phase)``: SGD (Nesterov 0.9, weight decay 5e-4), cosine decay over the
    phase, batches seeded by ``phase.seed``, cross-entropy plus :func:`elsa_codec.sparsity_penalty`."""
    import elsa_codec as ec

    def train_fn(model, phase):
        g = torch.Generator().manual_seed(phase.seed if phase.seed is not None else 0)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, phase.steps) / max(phase.steps, 1))))
        model.train()
        for _ in range(phase.steps):
            idx = torch.randint(0, len(y), (batch_size,), generator=g)
            smoothing = ec.label_smoothing(model)
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=smoothing) + ec.sparsity_penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return train_fn


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100.0


def run_job(kind: str, seed: int, methods, levels, dense_steps: int, steps: int, densify_steps: int) -> list[dict]:
    """One model and seed: the dense network, then ELSA and the separate networks of every method.
    Returns one row per (method, ``"ELSA"``/``"separate"``, level): accuracy (%), sparsity, seconds.

    Runs with 1 thread and denormal floats flushed to zero (many under random masks at 98%, they
    make the CPU's arithmetic several times slower and would dominate the timings: measured 40.7 s
    against 8.9 s flushed for random-uniform ELSA on the CNN, magnitude 8.6 / 7.5 s); both settings
    are put back afterwards (flushing off, torch's default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        return _job_rows(kind, seed, methods, levels, dense_steps, steps, densify_steps)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _job_rows(kind, seed, methods, levels, dense_steps, steps, densify_steps) -> list[dict]:
    from .demo import load_digits_split

    xtr, ytr, xte, yte = load_digits_split()
    calib = [xtr[i : i + 256] for i in range(0, len(xtr), 256)]
    fn = make_train_fn(xtr, ytr)
    rows, states = [], {}
    for method in methods:
        zero = bool(getattr(make_sparsifier(method, seed), "zero_init", False))
        if zero not in states:
            states[zero] = _dense_state(kind, seed, zero, fn, dense_steps)
            rows.append(dict(model=kind, method="dense-zero" if zero else "dense", kind="dense", seed=seed, level=0,
                             sparsity=0.0, accuracy=_accuracy(_loaded(kind, states[zero]), xte, yte), seconds=0.0,
                             drawn_at=float("nan")))
        state = states[zero]
        rows += _elsa_rows(kind, seed, method, levels, state, fn, calib, (xte, yte), steps, densify_steps)
        rows += _separate_rows(kind, seed, method, levels, state, fn, calib, (xte, yte), steps + densify_steps)
    return rows


def _dense_state(kind, seed, zero: bool, fn, dense_steps) -> dict:
    """The dense network of one model and seed (default initialisation, or ZerO for the pipeline)."""
    import elsa_codec as ec

    torch.manual_seed(seed)
    dense = _new_model(kind)
    if zero:
        ec.zero_init_(dense)
    fn(dense, ec.Phase("dense", 0, dense_steps, seed=seed * 1_000_003 + 17))
    return {k: v.clone() for k, v in dense.state_dict().items()}


def _loaded(kind, state) -> nn.Module:
    net = _new_model(kind)
    net.load_state_dict(state)
    return net


def _elsa_rows(kind, seed, method, levels, state, fn, calib, test, steps, densify_steps):
    import elsa_codec as ec

    model = _new_model(kind)
    model.load_state_dict(state)
    t0 = time.perf_counter()
    sp = make_sparsifier(method, seed)
    res = ec.embed_levels(model, list(levels), fn, steps=steps, densify_steps=densify_steps, seed=seed,
                          sparsifier=sp, bn_calibration=calib, progress=False)
    seconds = time.perf_counter() - t0
    enc, net, rows = res.encode(), _new_model(kind), []
    for t in range(1, res.num_levels + 1):
        net.load_state_dict(ec.extract(enc, t))
        rows.append(dict(model=kind, method=method, kind="ELSA", seed=seed, level=t, sparsity=res.sparsities[t - 1],
                         accuracy=_accuracy(net, *test), seconds=seconds, drawn_at=_drawn_at(sp, t - 1)))
    return rows


def _drawn_at(sp, i: int) -> float:
    """Early-bird: the share of sparsify phase ``i`` after which its ticket was drawn (NaN: never drawn or
    another method)."""
    draws = getattr(sp, "draws", None)
    if not draws or i >= len(draws) or draws[i]["drawn_at"] is None:
        return float("nan")
    return draws[i]["drawn_at"] / max(draws[i]["steps"], 1)


def _separate_rows(kind, seed, method, levels, state, fn, calib, test, steps):
    import elsa_codec as ec

    rows = []
    for t, level in enumerate(levels, start=1):
        net = _new_model(kind)
        net.load_state_dict(state)
        t0 = time.perf_counter()
        sp = make_sparsifier(method, seed)
        masks = ec.prune_gmp(net, level, fn, steps=steps, seed=seed * 7 + 1000 + t, progress=False, sparsifier=sp)
        ec.recalibrate_bn(net, calib)
        seconds = time.perf_counter() - t0
        kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        rows.append(dict(model=kind, method=method, kind="separate", seed=seed, level=t, sparsity=1.0 - kept,
                         accuracy=_accuracy(net, *test), seconds=seconds, drawn_at=_drawn_at(sp, 0)))
    return rows


def _job(args):
    return run_job(*args)


def run(*, models=MODELS, methods=DEFAULT_METHODS, seeds=(0, 1, 2), levels=DEFAULT_LEVELS, dense_steps: int = 400,
        steps: int = 150, densify_steps: int = 75, jobs: int = 2, out: str = "elsa-compare-out", log=print) -> list:
    """Every (model, seed) job, in ``jobs`` processes; writes the outputs to ``out``; returns the rows.

    Raises:
        ELSAError: an unknown model or method, bad levels.
    """
    import elsa_codec as ec

    from . import compare_report as report

    for m in models:
        if m not in MODELS:
            raise ec.ELSAError(f"unknown model {m!r}: expected one of {', '.join(MODELS)}")
    for m in methods:
        make_sparsifier(m, 0)
    from ...format.structure import parse_levels

    parse_levels(list(levels))
    work = [(k, s, tuple(methods), tuple(levels), dense_steps, steps, densify_steps) for k in models for s in seeds]
    t0 = time.perf_counter()
    if jobs > 1 and len(work) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(jobs, len(work))) as pool:
            parts = pool.map(_job, work)
    else:
        parts = [_job(w) for w in work]
    rows = [r for p in parts for r in p]
    seconds = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    report.write(rows, out, dict(models=list(models), methods=list(methods), seeds=list(seeds), levels=list(levels),
                                 dense_steps=dense_steps, steps=steps, densify_steps=densify_steps, jobs=jobs,
                                 seconds=seconds, command=" ".join(["elsa compare"] + sys.argv[2:])))
    log(f"elsa compare: {len(rows)} rows in {seconds:.0f} s; results in {out}")
    return rows


def build_parser(prog: str = "elsa compare"):
    from ...argparsing import Parser

    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="cnn,mlp (default both)")
    p.add_argument("--methods", default=None, help="any of " + ", ".join(METHODS) + " (default "
                   + ",".join(DEFAULT_METHODS) + ")")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--levels", default=None, help="sparsities, sparsest first (default "
                   + ",".join(map(str, DEFAULT_LEVELS)) + ")")
    p.add_argument("--dense-steps", type=int, default=None, help="dense training steps (default 400; quick 20)")
    p.add_argument("--steps", type=int, default=None, help="sparsify steps per level (default 150; quick 6)")
    p.add_argument("--densify-steps", type=int, default=None, help="densify steps per level (default 75; quick 3)")
    p.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    p.add_argument("--pipeline", action="store_true",
                   help="the pruning pipeline's study: methods " + ",".join(PIPELINE_METHODS) + ", levels "
                   + ",".join(map(str, PIPELINE_LEVELS)) + " (unless --methods / --levels are given)")
    p.add_argument("--quick", action="store_true", help="seed 0, a few steps (tests; the figures mean nothing)")
    p.add_argument("--out", default="elsa-compare-out", help="output folder (default elsa-compare-out/)")
    return p


def main(argv=None) -> int:
    """``elsa compare``; returns the exit status (2 with one line on bad arguments)."""
    import elsa_codec as ec

    a = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()] if not a.quick else [0]
        methods = a.methods or ",".join(PIPELINE_METHODS if a.pipeline else DEFAULT_METHODS)
        levels = a.levels or ",".join(map(str, PIPELINE_LEVELS if a.pipeline else DEFAULT_LEVELS))
        levels = [float(v) for v in levels.split(",") if v.strip()]
        pick = lambda v, full, quick: v if v is not None else (quick if a.quick else full)  # noqa: E731
        run(models=[m.strip() for m in a.models.split(",") if m.strip()],
            methods=[m.strip() for m in methods.split(",") if m.strip()], seeds=seeds, levels=levels,
            dense_steps=pick(a.dense_steps, 400, 20), steps=pick(a.steps, 150, 6),
            densify_steps=pick(a.densify_steps, 75, 3), jobs=a.jobs, out=a.out)
    except (ec.ELSAError, ValueError) as e:
        print(f"elsa compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(open(os.path.join(a.out, "table.md"), encoding="utf-8").read())
    return 0
