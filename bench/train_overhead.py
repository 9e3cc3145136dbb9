"""ELSA training step overhead relative to plain training, per phase kind (CPU, one thread).

``python -m bench.train_overhead [--steps 40] [--out bench/results/train-overhead]``

Two copies of a model train side by side on the same batches, step for step (interleaved, so
machine noise hits both alike): one plain (AdamW), one with a :class:`elsa_codec.LevelEmbedder`
attached (default config: ``verify="phase_end"``). For each phase of a two-level run (level 1
sparsify: pruning, nothing frozen; level 1 densify: frozen weights; level 2 sparsify: pruning and
frozen weights; dense training) the median step time of both is recorded; ``overhead`` is
ELSA / plain - 1. The mean includes the amortised GMP mask updates (10 per sparsify phase).
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


def measure(name: str, steps: int, verify: str = "phase_end") -> list[dict]:
    """Rows (one per phase) of plain vs ELSA step times for model ``name``."""
    make, batch = MODELS[name]
    torch.manual_seed(0)
    plain = make()
    elsa = make()
    elsa.load_state_dict(plain.state_dict())
    emb = ec.LevelEmbedder(elsa, ec.ELSAConfig(levels=[0.9, 0.75], steps=steps, seed=0, verify=verify,
                                               filter_fn=lambda m, fqn: isinstance(m, nn.Linear)))
    o_plain = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    o_elsa = torch.optim.AdamW(elsa.parameters(), lr=1e-4)
    emb.attach(o_elsa)
    g = torch.Generator().manual_seed(0)
    times: dict[int, tuple[list, list]] = {}
    for _ in range(emb.total_steps):
        ph = emb.phase
        x, y = batch(g)
        tp, te = _step(plain, o_plain, x, y), _step(elsa, o_elsa, x, y)
        times.setdefault(ph.index, ([], []))
        times[ph.index][0].append(tp)
        times[ph.index][1].append(te)
    rows = []
    for ph in emb.plan:
        tp, te = times[ph.index]
        mp, me = statistics.median(tp[2:]), statistics.median(te[2:])
        rows.append(dict(model=name, phase=ph.name, kind=ph.kind, verify=verify, steps=ph.steps,
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
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in a.models.split(","):
        rows += measure(name, a.steps, a.verify)
        for r in rows[-4:]:
            print(f"{r['model']:24s} {r['phase']:28s} plain {r['plain_ms']:8.2f} ms  ELSA {r['elsa_ms']:8.2f} ms  "
                  f"overhead {r['overhead']:+.1%} (mean {r['mean_overhead']:+.1%})", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"overhead-{a.verify}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["cpu", "torch"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
