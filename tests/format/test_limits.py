"""The documented limits, end to end, and byte-reproducible files.

The most levels per dtype (255 float32, 15 float16, 7 bfloat16) work through encode, the file,
load, serving and the PyTorch reference of the kernels; one more is a clear error. The same input
gives byte-identical files in two processes.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec.format.bits import MAX_CODE_BITS

MAX_LEVELS = {torch.float32: 255, torch.float16: 15, torch.bfloat16: 7}


@pytest.mark.parametrize("dtype", list(MAX_LEVELS), ids=lambda d: str(d).replace("torch.", ""))
def test_most_levels_work_end_to_end(tmp_path, dtype):
    T = MAX_LEVELS[dtype]
    assert T == (1 << MAX_CODE_BITS[dtype]) - 1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(dtype)  # 2,048 weights: every level distinct
    sd = model.state_dict()
    levels = [1 - (i + 1) / (T + 1) for i in range(T)]
    counters = ec.magnitude_counters(sd, levels)
    c = counters["0.weight"]
    assert int(c.max()) == T + 1 and int(c.min()) == 1, "the dense counter T+1 must not wrap"
    p = str(tmp_path / "m.safetensors")
    ec.save_file(ec.encode(sd, counters), p)
    cp = str(tmp_path / "c.safetensors")
    ec.save_counters(counters, cp)
    assert torch.equal(ec.load_counters(cp)["0.weight"].to(torch.int64), c.to(torch.int64))
    enc = ec.load_file(p)
    assert enc.meta.num_levels == T and enc.meta.code_bits == MAX_CODE_BITS[dtype]
    w = enc["0.weight"]
    assert torch.equal(ec.decode_counters(w, enc.code_bits).to(torch.int64), c.to(torch.int64))
    served = ec.load(p, nn.Sequential(nn.Linear(64, 32)).to(dtype))
    x = torch.randn(5, 64).to(dtype)
    for t in sorted({1, 2, T // 2, T - 1, T, T + 1}):
        ec.set_level(served, t)
        ref = F.linear(x, ec.extract_level(w, t, enc.code_bits, T), enc["0.bias"])
        # bit for bit on the dense path; the packed sparse-cpu products sum in their own order
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(served(x), ref, rtol=0 if t > T else tol, atol=0 if t > T else tol, msg=f"level {t}")
        kept = int((ec.level_mask(w, t, enc.code_bits, T)).sum())
        assert kept == int((c.to(torch.int64) <= t).sum())
    assert ec.set_level(served, "dense") == T + 1


@pytest.mark.parametrize("dtype", list(MAX_LEVELS), ids=lambda d: str(d).replace("torch.", ""))
def test_one_level_more_is_a_clear_error(dtype):
    T = MAX_LEVELS[dtype] + 1
    w = torch.randn(32, 64).to(dtype)
    levels = [1 - (i + 1) / (T + 1) for i in range(T)]
    counters = ec.magnitude_counters({"w": w}, levels, names=["w"])
    with pytest.raises(ec.ELSAError, match=rf"w: {T} levels need codes 0..{T}.*at most {T - 1} levels"):
        ec.encode({"w": w}, counters)


_ENCODE_SCRIPT = textwrap.dedent(
    """
    import sys, torch, elsa_codec as ec
    from torch import nn
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(40, 24), nn.BatchNorm1d(24), nn.Linear(24, 8, bias=False))
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.5]))
    enc.meta.training = {"note": "x", "levels": [0.9, 0.5], "a": 1}
    ec.save_file(enc, sys.argv[1])
    ec.save_file(enc, sys.argv[1] + ".index.json", max_shard_size=2000)
    """
)


def test_two_processes_write_identical_bytes(tmp_path):
    """Release pipelines hash artefacts: the same input gives the same bytes, whatever the process
    (hash seeds differ) - the single file, the shards and the index, and `elsa encode`."""
    from safetensors.torch import save_file

    torch.manual_seed(2)
    src = str(tmp_path / "in.safetensors")
    save_file({"a.weight": torch.randn(32, 16), "a.bias": torch.randn(32), "b.weight": torch.randn(8, 32).to(torch.bfloat16)}, src)
    digests = []
    for run, seed in enumerate(("1", "12345")):
        d = tmp_path / f"run{run}"
        d.mkdir()
        envv = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", _ENCODE_SCRIPT, str(d / "m.safetensors")], check=True, env=envv, timeout=120)
        subprocess.run([sys.executable, "-m", "elsa_codec.cli", "encode", src, "-o", str(d / "e.safetensors"),
                        "--levels", "0.75,0.5", "-q"], check=True, env=envv, timeout=120)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())})
    assert len(digests[0]) >= 4
    assert digests[0] == digests[1]
