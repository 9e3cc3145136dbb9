"""ELSA training step overhead relative to plain training, per phase kind (CPU, one thread).

``python -m bench.train_overhead [--steps 40] [--optimizers adamw,adamw-decay,sgd-momentum]
[--out bench/results/train-overhead]``

Two copies of a model train side by side on the same batches, step for step (interleaved, so
machine noise hits both alike): one plain, one with a :class:`elsa_codec.LevelEmbedder`
attached (default config: ``verify="phase_end"``), both with the same optimizer: ``adamw``
(AdamW, no weight decay: the guard's grad mode), ``adamw-decay`` (AdamW, weight_decay 0.01:
restore mode wherever a weight has frozen entries), ``sgd-momentum`` (SGD, momentum 0.9: grad
mode). The ``mode`` column says which mode the guard used in the phase.

For each phase of a two-level run (level 1 sparsify: pruning, nothing frozen; level 1 densify:
frozen weights; level 2 sparsify: pruning and frozen weights; dense training) the median step
time of both over the phase's steady steps (``steady_steps``: no GMP mask update in the step nor
in the one before, whose plan rebuild zeroes moments; the first two steps left out) is recorded;
``overhead`` is ELSA / plain - 1. ``mean_overhead`` is over every step, so it includes the GMP
mask updates (10 per sparsify phase, amortised over only ``--steps`` steps here).
Models: the MLP 512-1024-1024-10 (batch 32) of the issue, and a MiniLM-sized stack (6 blocks of
384x384 q/k/v/o and 384x1536 / 1536x384 feed-forward Linear layers, 512 tokens a step).
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec


def mlp():
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


class Block(nn.Module):
    def __init__(self, d=384, ff=1536):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v
        x = self.n1(x + self.o(a))
        return self.n2(x + self.fc2(F.gelu(self.fc1(x))))


def minilm():
    return nn.Sequential(*[Block() for _ in range(6)])


MODELS = {
    "mlp-512-1024-1024-10": (mlp, lambda g: (torch.randn(32, 512, generator=g), torch.randint(0, 10, (32,), generator=g))),
    "minilm-layers-6x384": (minilm, lambda g: (torch.randn(8, 64, 384, generator=g), torch.randn(8, 64, 384, generator=g))),
}


def _loss(out, y):
    return F.cross_entropy(out, y) if y.dtype == torch.long else F.mse_loss(out, y)


def _step(model, opt, x, y) -> float:
    t0 = time.perf_counter()
    loss = _loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9),
}


def _mode(emb, opt) -> str:
    plan = emb.guard.plans.get(id(opt))
    if plan is None or not (plan.exempt or plan.restore):
        return "none"
    return "restore" if plan.restore else "grad"


def measure(name: str, steps: int, verify: str = "phase_end", optimizer: str = "adamw") -> list[dict]:
    """Rows (one per phase) of plain vs ELSA step times for model ``name`` and ``optimizer``."""
    make, batch = MODELS[name]
    torch.manual_seed(0)
    plain = make()
    elsa = make()
    elsa.load_state_dict(plain.state_dict())
    emb = ec.LevelEmbedder(elsa, ec.ELSAConfig(levels=[0.9, 0.75], steps=steps, seed=0, verify=verify,
                                               filter_fn=lambda m, fqn: isinstance(m, nn.Linear)))
    o_plain = OPTIMIZERS[optimizer](plain.parameters())
    o_elsa = OPTIMIZERS[optimizer](elsa.parameters())
    emb.attach(o_elsa)
    g = torch.Generator().manual_seed(0)
    times: dict[int, tuple[list, list, list]] = {}
    modes: dict[int, set] = {}
    changed = False
    for _ in range(emb.total_steps):
        ph, gen = emb.phase, emb.state.generation
        x, y = batch(g)
        tp, te = _step(plain, o_plain, x, y), _step(elsa, o_elsa, x, y)
        times.setdefault(ph.index, ([], [], []))
        steady = not changed and emb.state.generation == gen  # no mask update in it nor in the step before
        changed = emb.state.generation != gen
        for lst, v in zip(times[ph.index], (tp, te, steady)):
            lst.append(v)
        modes.setdefault(ph.index, set()).add(_mode(emb, o_elsa))
    rows = []
    for ph in emb.plan:
        tp, te, steady = times[ph.index]
        keep = [i for i in range(2, len(tp)) if steady[i]] or list(range(len(tp)))
        mp, me = statistics.median(tp[i] for i in keep), statistics.median(te[i] for i in keep)
        rows.append(dict(model=name, optimizer=optimizer, mode="+".join(sorted(modes[ph.index] - {"none"})) or "none",
                         phase=ph.name, kind=ph.kind, verify=verify, steps=ph.steps, steady_steps=len(keep),
                         plain_ms=round(mp * 1e3, 3), elsa_ms=round(me * 1e3, 3),
                         overhead=round(me / mp - 1, 4),
                         mean_overhead=round(statistics.mean(te) / statistics.mean(tp) - 1, 4)))
    emb.finalize()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="steps per phase")
    p.add_argument("--out", default=os.path.join("bench", "results", "train-overhead"))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--verify", default="phase_end")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma-separated, of {sorted(OPTIMIZERS)}")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        for opt in a.optimizers.split(","):
            rows += measure(name, a.steps, a.verify, opt)
            for r in rows[-4:]:
                print(f"{r['model']:22s} {opt:12s} {r['mode']:12s} {r['phase']:26s} plain {r['plain_ms']:8.2f} ms  "
                      f"ELSA {r['elsa_ms']:8.2f} ms  overhead {r['overhead']:+.1%} (mean {r['mean_overhead']:+.1%})",
                      flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"overhead-{a.verify}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["cpu", "torch"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
