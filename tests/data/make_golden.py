"""Regenerate tests/data/golden_v1.safetensors and its expectations (run only on a format change).

    python tests/data/make_golden.py

The golden file pins format version 1: a file written today must read the same tomorrow.
"""
import hashlib
import json
import os

import torch

import elsa_codec as ec

HERE = os.path.dirname(os.path.abspath(__file__))


def level_digest(sd) -> str:
    h = hashlib.sha256()
    for n in sorted(sd):
        t = sd[n].contiguous()
        h.update(n.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main():
    g = torch.Generator().manual_seed(2312)
    sd = {
        "fc1.weight": torch.randn(24, 16, generator=g),
        "fc1.bias": torch.randn(24, generator=g),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g).to(torch.bfloat16),
        "bn.weight": torch.ones(8),
        "bn.bias": torch.zeros(8),
        "bn.running_mean": torch.zeros(8),
        "bn.running_var": torch.ones(8),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    c = ec.magnitude_counters(sd, [0.9, 0.75, 0.5])
    bn = {t: {"bn": {"running_mean": torch.full((8,), float(t)), "running_var": torch.full((8,), 1.0 + t), "num_batches_tracked": torch.tensor(t)}} for t in range(1, 5)}
    enc = ec.encode(sd, c, bn_stats=bn)
    ec.save_file(enc, os.path.join(HERE, "golden_v1.safetensors"))
    expect = {str(t): level_digest(ec.extract(enc, t)) for t in range(1, 5)}
    with open(os.path.join(HERE, "golden_v1.json"), "w") as f:
        json.dump({"levels": expect, "sparsities": enc.meta.sparsities()}, f, indent=1)


if __name__ == "__main__":
    main()
