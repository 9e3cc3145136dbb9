"""ELSA training over several processes (gloo, CPU): DDP and FSDP2 (``fully_shard``), and the
exact magnitude threshold over shards (docs/SCALE.md; arXiv 2312.06872, sections 2.1-2.2).

Each multi-process test launches this file as a worker on 2 ranks (``MASTER_ADDR=127.0.0.1``, a
free port, a timeout that kills the children); the workers save what they computed and the test
compares the ranks with each other and with a single-process run of the same recipe.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.training.distributed import ShardedMagnitude, ThreadComm, select_top

WORLD = 2
LEVELS = [0.75, 0.5]
KW = dict(steps=6, densify_steps=4, final_steps=4, seed=3, progress=False, verify="step")


# ------------------------------------------------------------------ the recipe (worker and reference)
def make_model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)  # odd row counts: FSDP2 shards them unevenly (8 / 7 rows)
    if bn:
        return nn.Sequential(nn.Linear(12, 15), nn.BatchNorm1d(15), nn.Tanh(), nn.Linear(15, 4))
    return nn.Sequential(nn.Linear(12, 15), nn.Tanh(), nn.Linear(15, 9), nn.Tanh(), nn.Linear(9, 4))


def batch(phase, step: int, rank: int):
    g = torch.Generator().manual_seed(phase.seed * 1000 + step * 10 + rank)
    return torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)


def train_fn(wrap: str | None, rank: int):
    """``train_fn(model, phase)``: SGD with momentum, ``rank``'s batches (DistributedSampler-like)."""

    def fn(model, phase):
        net = model
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for step in range(phase.steps):
            x, y = batch(phase, step, rank)
            F.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad()

    return fn


def snapshot(result, model) -> dict:
    from elsa_codec.training.distributed import full_state_dict

    return {"counters": {n: c.clone() for n, c in result.counters.items()},
            "weights": {k: v.clone() for k, v in full_state_dict(model).items()},
            "sparsities": list(result.sparsities)}


# ------------------------------------------------------------------ worker (one rank)
def _worker(kind: str, out: Path) -> None:
    import torch.distributed as dist

    import elsa_codec.format.file as eio

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    real_save = eio.save_file

    def counting_save(enc, path, **kw):  # which rank writes the file
        with open(out / "writers.txt", "a") as f:
            f.write(f"{rank} {Path(path).name}\n")
        real_save(enc, path, **kw)

    eio.save_file = counting_save
    from elsa_codec.training import distributed as ed

    calls, real_masks = [0], ed.ShardedMagnitude.masks

    def counting_masks(self, *a, **k):  # the sharded path really ran
        calls[0] += 1
        return real_masks(self, *a, **k)

    ed.ShardedMagnitude.masks = counting_masks
    runs = {"ddp": [("ddp-wrapped", "different"), ("ddp-inside", "same"), ("ddp-bn", "different")],
            "fsdp": [("fsdp-uniform", "same"), ("fsdp-global", "same")]}[kind]
    for name, data in runs:
        model = make_model(bn=name == "ddp-bn")
        data_rank = rank if data == "different" else 0
        sparsifier = "global" if name.endswith("global") else "uniform"
        if name == "ddp-wrapped":
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model)
        if kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in (model[0], model[2], model[4]):
                fully_shard(layer)
            fully_shard(model)
        fn = train_fn("ddp" if name in ("ddp-inside", "ddp-bn") else None, data_rank)
        calib = [torch.randn(8, 12, generator=torch.Generator().manual_seed(50 + rank)) for _ in range(rank + 1)]
        res = ec.embed_levels(model, LEVELS, fn, sparsifier=sparsifier, bn_calibration=calib if "bn" in name else None,
                              **KW)
        enc = res.save(str(out / f"{name}.safetensors"))
        real_save(enc, str(out / f"{name}-rank{rank}.safetensors"))  # what this rank computed
        snap = snapshot(res, model)
        if kind == "fsdp":
            w = model[0].weight
            snap["local_rows"], snap["sharded_mask_calls"] = w.to_local().shape[0], calls[0]
        torch.save(snap, out / f"{name}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, out: Path, timeout: float = 150.0) -> None:
    """Run :func:`_worker` on ``WORLD`` ranks; kill them all past ``timeout`` seconds."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, kind, str(out)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{kind} workers did not finish within {timeout} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"


def reference(sparsifier: str = "uniform") -> tuple[dict, ec.ELSAStateDict]:
    """The single-process run on rank 0's batches."""
    model = make_model()
    res = ec.embed_levels(model, LEVELS, train_fn(None, 0), sparsifier=sparsifier, **KW)
    return snapshot(res, model), res.encode()


def _same(a: dict, b: dict) -> None:
    assert a["sparsities"] == b["sparsities"]
    assert a["counters"], "no counters"
    assert a["counters"].keys() == b["counters"].keys() and a["weights"].keys() == b["weights"].keys()
    for n in a["counters"]:
        assert torch.equal(a["counters"][n], b["counters"][n]), n
    for n in a["weights"]:  # bit for bit (float32 as int32 patterns)
        x, y = a["weights"][n], b["weights"][n]
        if x.dtype == torch.float32:
            x, y = x.view(torch.int32), y.view(torch.int32)
        assert torch.equal(x, y), n


def _check_run(out: Path, name: str) -> dict:
    """Both ranks computed the same counters, weights and file; rank 0 alone wrote the file."""
    snaps = [torch.load(out / f"{name}-rank{r}.pt") for r in range(WORLD)]
    _same(snaps[0], snaps[1])
    files = [(out / f"{name}-rank{r}.safetensors").read_bytes() for r in range(WORLD)]
    assert files[0] == files[1] == (out / f"{name}.safetensors").read_bytes()
    writers = [ln.split() for ln in (out / "writers.txt").read_text().splitlines()]
    assert [w for w in writers if w[1] == f"{name}.safetensors"] == [["0", f"{name}.safetensors"]]
    return snaps[0]


# ------------------------------------------------------------------ tests
def test_ddp_two_ranks_agree_and_match_one_process(tmp_path):
    launch("ddp", tmp_path)
    a = _check_run(tmp_path, "ddp-wrapped")  # different batches per rank: the ranks agree
    assert a["sparsities"][0] == pytest.approx(0.75, abs=0.01)
    b = _check_run(tmp_path, "ddp-inside")  # the same batches on both ranks: DDP's mean gradient is exact
    ref, enc = reference()
    _same(b, ref)
    c = _check_run(tmp_path, "ddp-bn")  # batch norm: per-level statistics over both ranks' batches
    assert torch.equal(c["weights"]["1.num_batches_tracked"], torch.tensor(3))  # 1 + 2 calibration batches
    ec.save_file(enc, str(tmp_path / "one-process.safetensors"))
    assert (tmp_path / "one-process.safetensors").read_bytes() == (tmp_path / "ddp-inside.safetensors").read_bytes()


def test_fsdp2_two_ranks_shards_match_one_process(tmp_path):
    launch("fsdp", tmp_path)
    for name, sp in (("fsdp-uniform", "uniform"), ("fsdp-global", "global")):
        got = _check_run(tmp_path, name)
        locs = [torch.load(tmp_path / f"{name}-rank{r}.pt") for r in range(WORLD)]
        assert [s["local_rows"] for s in locs] == [8, 7] and all(s["sharded_mask_calls"] > 0 for s in locs)
        ref, _ = reference(sp)
        _same(got, ref)  # exact thresholds over shards: the single-process masks, bit for bit


# ------------------------------------------------------------------ the threshold over shards (one process)
def _shards(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """FSDP2's Shard(0) split: ceil(rows / world) rows per rank, the last ones shorter (or empty)."""
    return list(torch.chunk(t, world, dim=0)) + [t[:0]] * (world - len(torch.chunk(t, world, dim=0)))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_threshold_over_fake_shards_is_the_full_tensors_bit_for_bit(world):
    g = torch.Generator().manual_seed(world)
    w = torch.randn(13, 7, generator=g)
    w[2, :3] = 0.0
    for k in (1, 5, 40, 90, 91):
        full = torch.topk(w.abs().reshape(-1), k).values[-1]
        sel = ThreadComm.run(world, lambda c: select_top([[_shards(w.abs(), world)[c.rank]]], [k], c))
        mask = torch.cat([s[0][0] for s in sel]).reshape(-1)
        assert int(mask.sum()) == k
        kept = w.abs().reshape(-1)[mask]
        assert torch.equal(kept.min().view(torch.int32), full.view(torch.int32))  # the same threshold, bit for bit
        assert bool((w.abs().reshape(-1)[~mask] <= full).all())


@pytest.mark.parametrize("dist_name", ["uniform", "global", "erk"])
def test_sharded_magnitude_masks_equal_the_full_tensor_masks(dist_name):
    g = torch.Generator().manual_seed(1)
    ws = {"a.weight": torch.randn(15, 12, generator=g), "b.weight": torch.randn(9, 15, generator=g),
          "c.weight": torch.randn(4, 9, generator=g)}
    frozen = {n: torch.rand(w.shape, generator=g) < 0.1 for n, w in ws.items()}
    full = ec.MagnitudeSparsifier(dist_name).masks(ws, frozen, 0.6)
    shapes = {n: tuple(w.shape) for n, w in ws.items()}

    def rank(c):
        loc = {n: _shards(w, 3)[c.rank] for n, w in ws.items()}
        fro = {n: _shards(f, 3)[c.rank] for n, f in frozen.items()}
        return ShardedMagnitude(dist_name, shapes, c).masks(loc, fro, 0.6)

    got = ThreadComm.run(3, rank)
    for n in ws:
        assert torch.equal(torch.cat([m[n] for m in got]), full[n]), n


def test_ties_at_the_threshold_are_taken_in_flat_order():
    w = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 2.0], [1.0, 0.5, 1.0]])
    got = ThreadComm.run(2, lambda c: select_top([[_shards(w, 2)[c.rank]]], [4], c))
    mask = torch.cat([g[0][0] for g in got])
    assert mask.tolist() == [[True, True, True], [False, False, True], [False, False, False]]  # 3, 2, the first 1s


def test_ddp_without_process_group_is_a_clear_error():
    from torch.nn.parallel import DistributedDataParallel

    from elsa_codec.training.distributed import dist_context

    model = make_model()
    fake = DistributedDataParallel.__new__(DistributedDataParallel)  # a DDP object, no process group
    nn.Module.__init__(fake)
    fake.module = model
    with pytest.raises(ELSAError, match="process group is not initialised"):
        dist_context(fake, dict(model.named_parameters()))
    assert dist_context(model, dict(model.named_parameters())) is None  # one process: nothing changes


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
