"""An ELSA run in the user's own loop that can stop at any step and resume in a new process.

``python tests/training/elsa_resume_job.py OUT_DIR [--stop N] [--resume]``: trains the small MLP of the
tests with AdamW and one cosine learning-rate schedule over ``emb.total_steps``; with ``--stop N``
it saves model + optimizer + schedule + embedder state after step N and exits; with ``--resume``
it loads them and finishes. At the end it writes ``OUT_DIR/elsa.safetensors`` and
``OUT_DIR/counters.pt``. Used by tests/training/test_embedder.py (the data order comes from the step
number, so the runs are bit-for-bit comparable).
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec

CONFIG = dict(levels=[0.75, 0.5], steps=10, densify_steps=6, final_steps=8, seed=5, densify_init="restore",
              schedule=ec.GMPSchedule(end=0.6, updates=4))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    return x, x[:, :4].argmax(1)


def batch(step, x, y, bs=32):
    idx = torch.randint(0, len(y), (bs,), generator=torch.Generator().manual_seed(1000 + step))
    return x[idx], y[idx]


def setup(config=None):
    torch.manual_seed(0)
    model = MLP()
    emb = ec.LevelEmbedder(model, config or ec.ELSAConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    total = emb.total_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    return model, emb, opt, sched


def train(model, emb, opt, sched, start, stop):
    x, y = data()
    model.train()
    for step in range(start, stop):
        xb, yb = batch(step, x, y)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def finish(model, emb, out):
    x, _ = data()
    res = emb.finalize(bn_calibration=[x[i:i + 64] for i in range(0, 256, 64)])
    ec.save_file(res.encode(), os.path.join(out, "elsa.safetensors"))
    torch.save({n: c.clone() for n, c in res.counters.items()}, os.path.join(out, "counters.pt"))
    return res


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stop", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    model, emb, opt, sched = setup()
    ckpt = os.path.join(a.out, "ckpt.pt")
    start = 0
    if a.resume:
        sd = torch.load(ckpt, weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        sched.load_state_dict(sd["sched"])
        emb.load_state_dict(sd["elsa"])
        start = emb.step
    emb.attach(opt)
    stop = emb.total_steps if a.stop is None else a.stop
    train(model, emb, opt, sched, start, stop)
    if a.stop is not None:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "elsa": emb.state_dict()}, ckpt)
        return 0
    finish(model, emb, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
