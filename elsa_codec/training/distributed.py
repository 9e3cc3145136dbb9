"""ELSA training across processes: DDP (replicated weights) and FSDP2 (``fully_shard``, sharded weights).

ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872), sections 2.1-2.2, run by
``torch.distributed``. Nothing here runs in a single process (:func:`dist_context` returns None
there, and the per-step hooks are the single-process ones).

- DDP: every rank holds the full weights, identical after every step (same initial broadcast,
  identical all-reduced gradients). Masks, frozen values and counters are computed on every rank
  from identical inputs, so they are identical; a fingerprint of the counters and frozen weights
  is compared across ranks at every freeze (one ``int64`` per rank and level) and a mismatch is an
  error naming the tensor.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): every prunable weight is a ``DTensor`` sharded
  along dim 0 (``Shard(0)`` on a 1-D mesh); each rank keeps masks, frozen values and counters of
  its own shard only. The per-step hooks touch the local shard (no communication). A GMP mask
  update needs the magnitude threshold over the FULL tensor (``uniform`` / ``erk``) or over all
  tensors (``global``): :func:`kth_largest_bits` finds it exactly with four all-reduced 256-bin
  histograms of the float32 bit patterns of ``|w|`` (radix select), then ties at the threshold
  are taken in global flat order (one all-gather of per-shard tie counts). No full weight is
  ever gathered during training; counters and weights are gathered once, at the end, to build
  the file.

Collectives go through a :class:`Comm` (``torch.distributed`` in a run, :class:`ThreadComm` in the
one-process tests with fake shards).
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

from ..errors import ELSAError
from .sparsifiers.base import Sparsifier

__all__ = [
    "Comm", "TorchComm", "ThreadComm", "DistContext", "dist_context", "is_dtensor", "local_tensor",
    "kth_largest_bits", "select_top", "ShardedMagnitude", "full_state_dict", "save_once",
]


# ------------------------------------------------------------------ tensors
def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    return hasattr(t, "_local_tensor") and hasattr(t, "placements")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: the local shard of a DTensor (a view, writes go to the shard),
    else ``t.detach()``."""
    t = t.detach()
    return t._local_tensor if is_dtensor(t) else t


# ------------------------------------------------------------------ collectives
class Comm:
    """The collectives ELSA needs: ``rank``, ``world``, in-place sum ``all_reduce(t)``,
    ``all_gather(t) -> Tensor [world, *t.shape]`` (rank order), ``barrier()``."""

    rank: int = 0
    world: int = 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` into ``t`` on every rank."""
        t.copy_(self.all_gather(t)[0])
        return t


class TorchComm(Comm):
    """:class:`Comm` over a ``torch.distributed`` process group (default: the world)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def all_reduce(self, t):
        self.dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t):
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t.contiguous(), group=self.group)
        return torch.stack(out)

    def barrier(self):
        self.dist.barrier(group=self.group)

    def broadcast(self, t):
        self.dist.broadcast(t, src=self.dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                            group=self.group)
        return t


class ThreadComm(Comm):
    """``world`` fake ranks as threads of one process (tests of the sharded logic):
    ``ThreadComm.run(world, fn)`` calls ``fn(comm)`` on each rank's comm and returns the results."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world, self._s = rank, shared["world"], shared

    @staticmethod
    def run(world: int, fn) -> list:
        shared = {"world": world, "barrier": threading.Barrier(world), "slots": [None] * world}
        out, errs = [None] * world, []

        def go(r):
            try:
                out[r] = fn(ThreadComm(r, shared))
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errs.append(e)
                shared["barrier"].abort()

        threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errs:
            raise errs[0]
        return out

    def all_gather(self, t):
        s = self._s
        s["slots"][self.rank] = t.clone()
        s["barrier"].wait()
        got = torch.stack(list(s["slots"]))
        s["barrier"].wait()
        return got

    def all_reduce(self, t):
        t.copy_(self.all_gather(t).sum(0))
        return t

    def barrier(self):
        self._s["barrier"].wait()


# ------------------------------------------------------------------ exact k-th largest over shards
def _float_bits(scores: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative float32 scores: order-preserving (``a < b`` iff ``bits(a) < bits(b)``)."""
    return scores.to(torch.float32).reshape(-1).view(torch.int32)


def kth_largest_bits(bits: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], comm: Comm) -> tuple[list[int], list[int]]:
    """Exact ``k``-th largest value over all ranks, per group, by radix select on bit patterns.

    Four rounds (bytes 3..0 of the int32 patterns), each ONE all-reduce of a ``[J, 256]`` int64
    histogram for all ``J`` groups at once: 8 KiB per group and GMP update, whatever the size.

    Args:
        bits: per group ``j``, this rank's pieces: 1-D int32 tensors of non-negative float32
            bit patterns (:func:`_float_bits`).
        ks: per group, ``1 <= k <= total count over all ranks`` (the same on every rank).
        comm: the collectives.

    Returns:
        ``(thresholds, ties_needed)``: per group the bit pattern of the k-th largest value and how
        many elements equal to it are among the top ``k``.
    """
    J = len(ks)
    prefix = torch.zeros(J, dtype=torch.int64)
    need = torch.tensor([int(k) for k in ks], dtype=torch.int64)
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(J, 256, dtype=torch.int64)
        for j, pieces in enumerate(bits):
            for b in pieces:
                sel = b if shift == 24 else b[(b >> (shift + 8)) == int(prefix[j] >> (shift + 8))]
                if sel.numel():
                    hist[j] += torch.bincount(((sel >> shift) & 255).long(), minlength=256).cpu()
        comm.all_reduce(hist)
        cum = hist.flip(1).cumsum(1)  # cum[:, i]: count with digit >= 255 - i
        idx = (cum < need[:, None]).sum(1)
        above = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(idx))
        need -= above
        prefix |= (255 - idx) << shift
    return [int(v) for v in prefix], [int(v) for v in need]


def select_top(scores: Sequence[Sequence[torch.Tensor]], ks: Sequence[int], comm: Comm) -> list[list[torch.Tensor]]:
    """Boolean masks of the ``k`` largest scores of each group over all ranks, exactly ``k``.

    Ties at the threshold are taken in global flat order: group pieces in order, and within a
    piece rank 0's shard first (a ``Shard(0)`` shard is a contiguous run of the flat tensor).

    Args:
        scores: per group, this rank's pieces (non-negative finite float tensors, any shape).
        ks: per group, how many to keep over all ranks (clamped to ``[0, total]``).
        comm: the collectives.

    Returns:
        per group, per piece, a bool tensor of the piece's shape.
    """
    bits = [[_float_bits(s) for s in g] for g in scores]
    counts = torch.tensor([sum(b.numel() for b in g) for g in bits], dtype=torch.int64)
    comm.all_reduce(counts)
    ks = [max(0, min(int(k), int(n))) for k, n in zip(ks, counts)]
    live = [j for j, k in enumerate(ks) if 0 < k < int(counts[j])]
    thr, need = kth_largest_bits([bits[j] for j in live], [ks[j] for j in live], comm) if live else ([], [])
    out = [[torch.full(s.shape, ks[j] > 0, dtype=torch.bool, device=s.device) for s in g] for j, g in enumerate(scores)]
    if not live:
        return out
    ties = [(b == thr[i]) for i, j in enumerate(live) for b in bits[j]]
    per_rank = comm.all_gather(torch.tensor([int(t.sum()) for t in ties], dtype=torch.int64))  # [world, pieces]
    pos = 0
    for i, j in enumerate(live):
        before = 0
        for p, b in enumerate(bits[j]):
            col = per_rank[:, pos]
            take = max(0, min(int(col[comm.rank]), need[i] - before - int(col[: comm.rank].sum())))
            tie = ties[pos]
            chosen = (b > thr[i]) | (tie & (tie.cumsum(0) <= take))
            out[j][p] = chosen.reshape(scores[j][p].shape)
            before += int(col.sum())
            pos += 1
    return out


# ------------------------------------------------------------------ the sharded sparsifier
class ShardedMagnitude(Sparsifier):
    """Magnitude masks of ``Shard(0)`` shards with the thresholds of the full tensors.

    The same masks as :class:`elsa_codec.MagnitudeSparsifier` on the full tensors (when the
    scores have no ties at the threshold; ties are taken in flat order here, in ``topk``'s order
    there), computed from the local shards with :func:`select_top`.

    Args:
        distribution: ``"uniform"``, ``"global"`` or ``"erk"``.
        shapes: ``name -> global shape``.
        comm: the collectives.

    Structures: ``unstructured``; ``N:M`` groups lie along the input dimension, inside a row of a
    ``[out, in]`` shard, so they are made locally (no communication).
    """

    def __init__(self, distribution: str, shapes: dict, comm: Comm):
        self.distribution, self.shapes, self.comm = distribution, dict(shapes), comm

    def __repr__(self) -> str:
        return f"ShardedMagnitude({self.distribution!r})"

    def _keeps(self, frozen, sparsity: float) -> dict[str, int]:
        """Non-frozen weights to keep per tensor (``uniform``/``erk``) or overall (``global``)."""
        from .schedule import erk_densities

        names = list(self.shapes)
        numel = {n: math.prod(self.shapes[n]) for n in names}
        nf = torch.tensor([int(frozen[n].sum()) for n in names], dtype=torch.int64)
        nf = {n: int(v) for n, v in zip(names, self.comm.all_reduce(nf))}
        if self.distribution == "global":
            keep, total_f = int(round((1.0 - sparsity) * sum(numel.values()))), sum(nf.values())
            if total_f > keep:
                raise ELSAError(f"the frozen weights ({total_f} of {sum(numel.values())}) already exceed the target of "
                                f"{keep} kept (sparsity {sparsity}); levels must be given sparsest first")
            return {"": keep - total_f}
        sps = {n: float(sparsity) for n in names}
        if self.distribution == "erk":
            d = erk_densities(self.shapes, 1.0 - float(sparsity))
            for n in names:
                sps[n] = 1.0 - d[n]
                lim = round((1.0 - sps[n]) * numel[n])
                if lim < nf[n] <= lim + 1:  # as MagnitudeSparsifier: absorb a one-weight rounding difference
                    sps[n] = 1.0 - nf[n] / numel[n]
        out = {}
        for n in names:
            keep = int(round((1.0 - min(max(sps[n], 0.0), 1.0)) * numel[n]))
            if nf[n] > keep:
                raise ELSAError(f"{n}: the frozen weights ({nf[n]} of {numel[n]}) already exceed the target of {keep} "
                                "kept (levels must be given sparsest first, with non-increasing sparsity)")
            out[n] = keep - nf[n]
        return out

    def masks(self, weights, frozen, sparsity, structure="unstructured"):
        """Masks of the local shards (``name -> bool``, shard shapes) at ``sparsity``, containing ``frozen``."""
        from ..format.structure import parse_structure
        from .sparsifiers.base import MagnitudeSparsifier

        st = parse_structure(structure)
        if st.kind == "nm":
            return MagnitudeSparsifier(self.distribution).masks(weights, frozen, sparsity, st)
        keeps = self._keeps(frozen, float(sparsity))
        free = {n: weights[n].detach().abs().to(torch.float32)[~frozen[n]] for n in weights}
        if self.distribution == "global":
            groups, ks = [[free[n] for n in self.shapes]], [keeps[""]]
        else:
            groups, ks = [[free[n]] for n in self.shapes], [keeps[n] for n in self.shapes]
        sel = select_top(groups, ks, self.comm)
        flat = [m for g in sel for m in g]
        out = {}
        for n, m in zip(self.shapes, flat):
            mask = frozen[n].clone()
            mask[~frozen[n]] = m
            out[n] = mask
        return out


def check_sharded_supported(sparsifier, specs, transposed, names) -> None:
    """The FSDP2 path supports magnitude sparsifiers (no custom score), unstructured and N:M levels.

    Raises:
        ELSAError: naming what is not supported with sharded (DTensor) weights.
    """
    from .sparsifiers.base import MagnitudeSparsifier

    if type(sparsifier) is not MagnitudeSparsifier or sparsifier.score is not None:
        raise ELSAError(f"sharded (FSDP2 / DTensor) weights: the sparsifier {sparsifier!r} is not supported; use "
                        "'uniform', 'global' or 'erk' (magnitude, thresholds computed across shards)")
    for _, st in specs:
        if st.kind == "block":
            raise ELSAError(f"sharded (FSDP2 / DTensor) weights: {st} levels are not supported (tiles would span "
                            "shards); use unstructured or N:M levels")
        if st.kind == "nm" and transposed:
            raise ELSAError(f"{sorted(transposed)[0]}: an [in, out] weight sharded along its input dimension cannot "
                            f"carry {st} levels; leave it out with select= / filter_fn=")


# ------------------------------------------------------------------ the run's context
class DistContext:
    """The process group of a multi-process ELSA run and whether the weights are sharded.

    Attributes:
        comm: :class:`TorchComm` over the default group.
        sharded: True for FSDP2 (DTensor) weights, False for DDP / replicated weights.
    """

    def __init__(self, comm: Comm, sharded: bool):
        self.comm, self.sharded = comm, sharded

    @property
    def rank(self) -> int:
        return self.comm.rank

    def fingerprint(self, tensors: dict) -> None:
        """Compare ``tensors`` (``name -> Tensor``) across ranks (DDP: replicated, must be equal).

        One int64 per tensor and rank (the sum of the bit patterns).

        Raises:
            ELSAError: names the first tensor whose ranks differ.
        """
        names = list(tensors)
        fp = torch.tensor([_bits_sum(tensors[n]) for n in names], dtype=torch.int64)
        allfp = self.comm.all_gather(fp)
        for i, n in enumerate(names):
            if bool((allfp[:, i] != allfp[0, i]).any()):
                raise ELSAError(f"{n}: differs across ranks (rank fingerprints {allfp[:, i].tolist()}); the replicated "
                                "weights diverged: every rank must run the same optimizer steps on the DDP-averaged "
                                "gradients and must not write to the weights")

    def agree(self, err: BaseException | None) -> None:
        """Raise on every rank if any rank raised (so no rank waits forever in a collective)."""
        flag = self.comm.all_reduce(torch.tensor([0 if err is None else 1], dtype=torch.int64))
        if err is not None:
            raise err
        if int(flag):
            raise ELSAError("another rank failed the ELSA checks (see its error)")

    def sum(self, values: Sequence[float | int]) -> list:
        """Element-wise sum over ranks (float64)."""
        return self.comm.all_reduce(torch.tensor(list(values), dtype=torch.float64)).tolist()

    def broadcast_int(self, v: int) -> int:
        """Rank 0's ``v`` on every rank."""
        return int(self.comm.all_gather(torch.tensor([int(v)], dtype=torch.int64))[0, 0])

    def full_counters(self, counters: dict, params: dict) -> dict:
        """The full counter tensors from the local shards (one all-gather per tensor, at the end)."""
        if not self.sharded:
            return counters
        from torch.distributed.tensor import DTensor

        out = {}
        for n, c in counters.items():
            p = params[n]
            out[n] = DTensor.from_local(c, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                        run_check=False).full_tensor()
        return out

    def sync_buffers(self, model) -> None:
        """Rank 0's buffers (batch-norm running statistics...) on every rank: after the last step
        each rank's buffers saw its own batches (DDP broadcasts them only at the next forward)."""
        from ..wrappers import unwrap_model

        with torch.no_grad():
            for b in unwrap_model(model).buffers():
                self.comm.broadcast(local_tensor(b))

    def sync_bn_stats(self, stats: dict | None, model, num_levels: int) -> dict | None:
        """Per-level batch-norm statistics averaged over ranks, weighted by each rank's batches
        (the exact mean over all calibration batches), summed in rank order: identical on every
        rank. The model's own buffers get the dense level's (level ``T+1``) synced statistics."""
        if not stats:
            return stats
        out = {t: {m: self._avg_stats(st) for m, st in per.items()} for t, per in stats.items()}
        from .bn import bn_modules

        with torch.no_grad():
            for m, mod in bn_modules(model).items():
                for s, v in out.get(num_levels + 1, {}).get(m, {}).items():
                    getattr(mod, s).copy_(v)
        return out

    def _avg_stats(self, st: dict) -> dict:
        nbt = st["num_batches_tracked"]
        n = self.comm.all_gather(nbt.reshape(1).to(torch.float64))[:, 0]
        w = n / n.sum()
        out = {s: (self.comm.all_gather(st[s].to(torch.float64)) * w.reshape(-1, *([1] * st[s].dim()))).sum(0)
               .to(st[s].dtype) for s in ("running_mean", "running_var")}
        out["num_batches_tracked"] = n.sum().to(nbt.dtype).reshape(nbt.shape)
        return out


def _bits_sum(t: torch.Tensor) -> int:
    t = local_tensor(t)
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from ..format.bits import bits_view

        t = bits_view(t)
    return int(t.to(torch.int64).sum())


def _fsdp1_modules(model) -> list[str]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover
        return []
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDP1)]


def dist_context(model, params: dict, shared: dict | None = None) -> DistContext | None:
    """The distributed context of an ELSA run on ``model`` (None for a single process).

    Raises:
        ELSAError: a model wrapped in FSDP1 (``FullyShardedDataParallel``: flat parameters; use
            ``fully_shard`` (FSDP2) or DDP); DTensor weights or a DDP wrapper without an
            initialised process group; a DTensor placement other than ``Shard(0)`` on a 1-D mesh.
    """
    from torch.nn.parallel import DistributedDataParallel

    fsdp1 = _fsdp1_modules(model)
    if fsdp1:
        raise ELSAError(f"the model is wrapped in FSDP1 (FullyShardedDataParallel at {fsdp1[0]}): its flat "
                        "parameters hide the weights; use torch.distributed.fsdp.fully_shard (FSDP2) or DDP")
    tensors = {**params, **(shared or {})}
    dts = [n for n, p in tensors.items() if is_dtensor(p)]
    import torch.distributed as dist

    up = dist.is_available() and dist.is_initialized()
    if (dts or isinstance(model, DistributedDataParallel)) and not up:
        what = f"{dts[0]} is a DTensor" if dts else "the model is wrapped in DistributedDataParallel"
        raise ELSAError(f"{what} but the torch.distributed process group is not initialised (call "
                        "torch.distributed.init_process_group first, on every rank)")
    if not up or dist.get_world_size() == 1:
        return None
    for n in dts:
        pl, mesh = tensors[n].placements, tensors[n].device_mesh
        if mesh.ndim != 1 or len(pl) != 1 or not (pl[0].is_shard() and pl[0].dim == 0):
            raise ELSAError(f"{n}: DTensor placement {tuple(pl)} on a {mesh.ndim}-D mesh is not supported; ELSA "
                            "supports FSDP2's default Shard(0) on a 1-D mesh (fully_shard(model, mesh=1-D mesh))")
        if mesh.size() != dist.get_world_size():
            raise ELSAError(f"{n}: sharded over {mesh.size()} of {dist.get_world_size()} ranks; ELSA needs the "
                            "1-D mesh of the whole world")
    return DistContext(TorchComm(), sharded=bool(dts))


# ------------------------------------------------------------------ the file
def full_state_dict(model) -> dict:
    """``model``'s state dict under the bare model's names, DTensors gathered to full tensors
    (a collective: every rank calls it, in the same order)."""
    from ..wrappers import strip_wrapper_prefix, unwrap_model

    sd = unwrap_model(model).state_dict()
    return {strip_wrapper_prefix(k): (v.full_tensor() if is_dtensor(v) else v) for k, v in sd.items()}


def save_once(encoded, path: str, **kwargs) -> None:
    """Write ``encoded`` with :func:`elsa_codec.save_file` on rank 0 only; the others wait at a
    barrier (so the file exists on return on every rank). A single process just writes."""
    import torch.distributed as dist

    from ..format.file import save_file

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not multi or dist.get_rank() == 0:
        save_file(encoded, path, **kwargs)
    if multi:
        dist.barrier()
