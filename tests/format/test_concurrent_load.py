"""Loading while another process atomically replaces the file (issue 32, finding 1).

The reader opens each file once and takes the header, the checks and the tensors from that one
descriptor, so every load gives the old file or the new one: never a "corrupted" error for a path
that always names a valid file, never a mixture of the two.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import elsa_codec as ec

#: loads per test; ELSA_CONCURRENT_LOADS=2000 for the full figure (about 2,000 loads take ~5 s here)
LOADS = int(os.environ.get("ELSA_CONCURRENT_LOADS", "2000"))

#: a process that keeps replacing ``target`` (temp file + os.replace), alternating between the
#: bytes of two files, until ``stop`` exists; it prints the number of replacements.
WRITER = r"""
import os, sys
a, b, target, stop = sys.argv[1:]
blobs = [open(a, "rb").read(), open(b, "rb").read()]
tmp = target + ".w-tmp"
n = 0
while not os.path.exists(stop):
    with open(tmp, "wb") as f:
        f.write(blobs[n % 2])
    os.replace(tmp, target)
    n += 1
print(n)
"""


def _encoded(seed: int):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sd = m.state_dict()
    return ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5]))


def _same(got, ref) -> bool:
    return (sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
            and got.meta.to_json() == ref.meta.to_json())


def _load_many(target: str, refs: list, loads: int) -> tuple:
    """``(failures, unmatched)`` of ``loads`` loads of ``target``: the errors, and the loads equal
    to none of ``refs`` (a mixture)."""
    failures, unmatched = [], 0
    for _ in range(loads):
        try:
            got = ec.load_file(target)
        except ec.ELSAError as e:
            failures.append(str(e))
            continue
        unmatched += not any(_same(got, r) for r in refs)
    return failures, unmatched


def _run_race(tmp_path, target: str, files: list, refs: list, loads: int) -> tuple:
    """``(failures, unmatched, replacements)`` of ``loads`` loads of ``target`` while a writer
    process replaces each file of ``files`` (pairs of sources) over and over."""
    stop = str(tmp_path / "stop")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, a, b, dst, stop], stdout=subprocess.PIPE, text=True)
               for a, b, dst in files]
    try:
        time.sleep(0.2)
        failures, unmatched = _load_many(target, refs, loads)
    finally:
        open(stop, "w").close()
        counts = [int(w.communicate(timeout=30)[0] or 0) for w in writers]
    return failures, unmatched, counts


def test_load_during_atomic_replace_is_old_or_new(tmp_path):
    encs = [_encoded(0), _encoded(1)]
    srcs = [str(tmp_path / f"v{i}.safetensors") for i in range(2)]
    for e, p in zip(encs, srcs):
        ec.save_file(e, p)
    refs = [ec.load_file(p) for p in srcs]
    assert not _same(refs[0], refs[1])
    target = str(tmp_path / "m.safetensors")
    ec.save_file(encs[0], target)
    t0 = time.perf_counter()
    failures, unmatched, counts = _run_race(tmp_path, target, [(*srcs, target)], refs, LOADS)
    print(f"\n{LOADS} loads during {counts[0]} replacements in {time.perf_counter() - t0:.1f} s: "
          f"{len(failures)} failures, {unmatched} mixtures")
    assert counts[0] > 10, "the writer hardly ran: the test proves nothing"
    assert not failures, f"{len(failures)} of {LOADS} loads failed, e.g. {failures[0]}"
    assert unmatched == 0


def test_read_meta_during_atomic_replace(tmp_path):
    srcs = [str(tmp_path / f"v{i}.safetensors") for i in range(2)]
    for i, p in enumerate(srcs):
        ec.save_file(_encoded(i), p)
    want = {ec.read_meta(p).to_json() for p in srcs}
    target = str(tmp_path / "m.safetensors")
    ec.save_file(_encoded(0), target)
    stop = str(tmp_path / "stop")
    w = subprocess.Popen([sys.executable, "-c", WRITER, *srcs, target, stop], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        got = {ec.read_meta(target).to_json() for _ in range(max(LOADS // 4, 50))}
    finally:
        open(stop, "w").close()
        w.communicate(timeout=30)
    assert got <= want


@pytest.mark.parametrize("loads", [max(LOADS // 4, 50)])
def test_sharded_load_during_shard_replace(tmp_path, loads):
    """Each shard read once: a shard replaced by an equal copy of itself while the index is read
    never fails a load."""
    enc = _encoded(0)
    index = str(tmp_path / "s" / "m.safetensors.index.json")
    ec.save_file(enc, index, max_shard_size=300)
    shards = sorted(p for p in os.listdir(tmp_path / "s") if p.endswith(".safetensors"))
    assert len(shards) >= 2
    copies = []
    for s in shards:
        src = str(tmp_path / "s" / s)
        cp = str(tmp_path / f"copy-{s}")
        with open(src, "rb") as f, open(cp, "wb") as g:
            g.write(f.read())
        copies.append((cp, cp, src))
    ref = ec.load_file(index)
    failures, unmatched, counts = _run_race(tmp_path, index, copies[:2], [ref], loads)
    assert min(counts) > 5
    assert not failures, f"{len(failures)} of {loads} loads failed, e.g. {failures[0]}"
    assert unmatched == 0


#: a process that re-encodes ``index`` as a sharded checkpoint, alternating two contents, until ``stop`` exists.
REENCODER = r"""
import os, sys, torch
from torch import nn
import elsa_codec as ec
index, stop = sys.argv[1:]
encs = []
for seed in (0, 1):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    sd = m.state_dict()
    encs.append(ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5])))
n = 0
open(stop + ".ready", "w").close()
while not os.path.exists(stop):
    ec.save_file(encs[n % 2], index, max_shard_size=300)
    n += 1
print(n)
"""


def _wait_ready(stops: list) -> None:
    """Until every re-encoding writer has started (its ``stop + ".ready"`` file), at most 60 s."""
    deadline = time.time() + 60
    while not all(os.path.exists(s + ".ready") for s in stops) and time.time() < deadline:
        time.sleep(0.05)


def test_sharded_load_during_reencode_is_old_or_new(tmp_path):
    """A sharded checkpoint re-encoded (new shards, index swapped, old shards removed) while it
    is loaded: every load gives one of the two checkpoints (a read whose index was swapped under
    it is retried on the new index)."""
    refs = [_encoded(0), _encoded(1)]
    index = str(tmp_path / "m.safetensors.index.json")
    ec.save_file(refs[0], index, max_shard_size=300)
    stop = str(tmp_path / "stop")
    w = subprocess.Popen([sys.executable, "-c", REENCODER, index, stop], stdout=subprocess.PIPE, text=True)
    loads = max(LOADS // 4, 50)
    try:
        _wait_ready([stop])
        failures, unmatched = _load_many(index, refs, loads)
    finally:
        open(stop, "w").close()
        count = int(w.communicate(timeout=60)[0] or 0)
    assert count > 5, "the writer hardly ran: the test proves nothing"
    assert not failures, f"{len(failures)} of {loads} loads failed, e.g. {failures[0]}"
    assert unmatched == 0


def test_two_writers_of_one_sharded_checkpoint_take_turns(tmp_path):
    """Two processes re-encoding one sharded checkpoint at once (and a reader): every load gives
    one of the two checkpoints, and once both stop the folder holds exactly one whole checkpoint
    (no shard of the other, no temporary)."""
    refs = [_encoded(0), _encoded(1)]
    index = str(tmp_path / "m.safetensors.index.json")
    ec.save_file(refs[0], index, max_shard_size=300)
    stops = [str(tmp_path / f"stop{i}") for i in range(2)]
    ws = [subprocess.Popen([sys.executable, "-c", REENCODER, index, s], stdout=subprocess.PIPE, text=True) for s in stops]
    try:
        _wait_ready(stops)
        failures, unmatched = _load_many(index, refs, max(LOADS // 8, 50))
    finally:
        for s in stops:
            open(s, "w").close()
        counts = [int(w.communicate(timeout=60)[0] or 0) for w in ws]
    assert min(counts) > 3, counts
    assert not failures, f"{len(failures)} loads failed, e.g. {failures[0]}"
    assert unmatched == 0
    got = ec.load_file(index)
    assert any(_same(got, r) for r in refs)
    from elsa_codec.format.file import used_shards

    left = {n for n in os.listdir(tmp_path) if not n.startswith("stop")}
    assert left == {"m.safetensors.index.json", *used_shards(index)}
