"""A served model keeps serving what was checked (issue 32, finding 2).

By default ``ec.load`` serves weights in memory the model owns: overwriting or truncating the file
afterwards changes no output and cannot crash the process. ``ec.load(..., mmap=True)`` serves the
mapped file (small devices) and refuses, at the next level switch, a file replaced, modified or
truncated since the load. The truncation cases run in a child process: a wrong answer there is a
SIGBUS, which must not take the test process down.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import elsa_codec as ec
from elsa_codec.format.pages import _file_backed


def make_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 16))


def _file(tmp_path, seed=0, name="m.safetensors") -> str:
    sd = make_model(seed).state_dict()
    p = str(tmp_path / name)
    ec.save_file(ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.5])), p)
    return p


def _outputs(model, x) -> dict:
    out = {}
    with torch.no_grad():
        for t in (1, 2, "dense", 1):
            ec.set_level(model, t)
            out[str(t)] = model(x).clone()
    return out


def _scribble(path) -> None:
    """Garbage over every byte after the header, in place (same inode, same size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        f.write(bytes([0x5A]) * (size - 8 - n))


def _mapped(t: torch.Tensor) -> bool:
    return _file_backed(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())


@pytest.mark.parametrize("level", [None, 1])
def test_default_load_owns_its_weights(tmp_path, level):
    p = _file(tmp_path)
    x = torch.randn(3, 64)
    served = ec.load(p, make_model(1), level=level)
    assert not any(_mapped(m.weight) for _, m in ec.elsa_modules(served))
    before = _outputs(served, x)
    time.sleep(0.02)
    _scribble(p)
    after = _outputs(served, x)
    for k in before:
        assert torch.equal(before[k], after[k]), f"level {k} changed after the file was overwritten"
    os.replace(_file(tmp_path, seed=5, name="other.safetensors"), p)
    assert all(torch.equal(before[k], v) for k, v in _outputs(served, x).items())


CHILD = textwrap.dedent(r"""
    import os, sys, torch
    from torch import nn
    import elsa_codec as ec
    path, mode = sys.argv[1:]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 16))
    x = torch.randn(3, 64)
    served = ec.load(path, model, level=1, **({"mmap": True} if mode == "mmap" else {}))
    with torch.no_grad():
        ref = {t: (ec.set_level(served, t), served(x).clone())[1] for t in (2, "dense", 1)}
    os.truncate(path, 0)
    try:
        with torch.no_grad():
            for t in (2, "dense", 1):
                ec.set_level(served, t)
                assert torch.equal(served(x), ref[t]), f"level {t} changed"
    except ec.ELSAError as e:
        print("ELSAError:", e)
        sys.exit(3)
    print("unchanged")
""")


def _child(path, mode):
    return subprocess.run([sys.executable, "-c", CHILD, path, mode], capture_output=True, text=True, timeout=120)


def test_default_load_survives_truncation(tmp_path):
    p = _file(tmp_path)
    r = _child(p, "owned")
    assert r.returncode == 0 and "unchanged" in r.stdout, f"exit {r.returncode}: {r.stdout}{r.stderr[-2000:]}"


def test_mmap_load_refuses_a_truncated_file(tmp_path):
    p = _file(tmp_path)
    r = _child(p, "mmap")
    assert r.returncode == 3, f"exit {r.returncode} (-7 is SIGBUS): {r.stdout}{r.stderr[-2000:]}"
    assert p in r.stdout and "truncated" in r.stdout and "mmap=True" in r.stdout


def _mmap_served(tmp_path):
    p = _file(tmp_path)
    served = ec.load(p, make_model(1), level=1, mmap=True)
    assert all(_mapped(m.weight) for _, m in ec.elsa_modules(served))  # the small-device mode: no copy
    return p, served


def test_mmap_load_serves_the_file_while_unchanged(tmp_path):
    p, served = _mmap_served(tmp_path)
    x = torch.randn(3, 64)
    ref = _outputs(ec.load(p, make_model(1)), x)
    got = _outputs(served, x)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_mmap_load_refuses_a_replaced_file(tmp_path):
    p, served = _mmap_served(tmp_path)
    os.replace(_file(tmp_path, seed=5, name="other.safetensors"), p)
    with pytest.raises(ec.ELSAError, match=r"m\.safetensors: the memory-mapped file changed .*replaced by another file"):
        ec.set_level(served, 2)
    assert {m.level for _, m in ec.elsa_modules(served)} == {1}  # nothing changed


def test_mmap_load_refuses_a_file_modified_in_place(tmp_path):
    p, served = _mmap_served(tmp_path)
    time.sleep(0.05)  # file times have a coarse clock: make the write's mtime differ
    _scribble(p)
    with pytest.raises(ec.ELSAError, match="modified in place") as ei:
        ec.set_level(served, "dense")
    assert p in str(ei.value)


def test_mmap_load_refuses_a_removed_file(tmp_path):
    p, served = _mmap_served(tmp_path)
    os.unlink(p)
    with pytest.raises(ec.ELSAError, match="No such file"):
        ec.set_sparsity(served, 0.5)
