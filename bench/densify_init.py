"""``densify_init="zero"`` against ``"restore"``: dense-level accuracy and exact zeros (CPU).

``python -m bench.densify_init [--seeds 0,1,2] [--out bench/results/train-overhead]``

ELSA (arXiv 2312.06872) on small MLPs (in -> 128 -> 64 -> classes, AdamW, batch 64) for three
scikit-learn data sets shipped with the package (no download): digits, breast cancer, wine;
standardised features, a fixed stratified 70/30 split. Levels 90% / 75% / 50%, 150 steps per
phase. For each initialisation of the pruned weights at a densify phase, the dense level's test
accuracy and the fraction of its prunable weights that are exactly 0 (dead weights shipped as
zeros) are reported, per data set, mean over the seeds.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec


def datasets():
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    out = {}
    for name, load in (("digits", load_digits), ("breast_cancer", load_breast_cancer), ("wine", load_wine)):
        x, y = load(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
        sc = StandardScaler().fit(xtr)
        t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        out[name] = (t(sc.transform(xtr)), torch.tensor(ytr), t(sc.transform(xte)), torch.tensor(yte))
    return out


def run(data, init: str, seed: int, steps: int) -> tuple[float, float]:
    """``(dense accuracy %, fraction of exact zeros in the dense level)``."""
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(xtr.shape[1], 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, int(ytr.max()) + 1))
    emb = ec.LevelEmbedder(model, ec.ELSAConfig(levels=[0.9, 0.75, 0.5], steps=steps, seed=seed, densify_init=init,
                                                filter_fn=lambda m, fqn: isinstance(m, nn.Linear)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    emb.attach(opt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(emb.total_steps):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = emb.finalize()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).float().mean()) * 100
    total = sum(p.numel() for p in emb.params.values())
    zeros = sum(int((p.abs() < 1e-30).sum()) for p in emb.params.values())  # 0 carrying its code bits (a subnormal)
    del res
    return acc, zeros / total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default=os.path.join("bench", "results", "train-overhead"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for name, data in datasets().items():
        for init in ("zero", "restore"):
            accs, zs = zip(*(run(data, init, s, a.steps) for s in seeds))
            rows.append(dict(dataset=name, densify_init=init, seeds=len(seeds),
                             dense_acc_mean=round(statistics.mean(accs), 2), dense_acc_std=round(statistics.pstdev(accs), 2),
                             zero_frac_mean=round(statistics.mean(zs), 4), zero_frac_max=round(max(zs), 4)))
            r = rows[-1]
            print(f"{name:14s} {init:8s} dense accuracy {r['dense_acc_mean']:6.2f} ± {r['dense_acc_std']:.2f} %  "
                  f"exact zeros {r['zero_frac_mean']:.2%} (max {r['zero_frac_max']:.2%})", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "densify_init.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
