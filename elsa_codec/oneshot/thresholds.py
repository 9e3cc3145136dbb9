"""Exact k-th magnitude selection: the thresholds behind every magnitude level.

In memory (:func:`_kth_largest`, :func:`global_thresholds`) and streamed over chunks
(:func:`kth_smallest`, :func:`global_thresholds_stream`, on the bit patterns of ``|w|``:
:func:`magnitude_key`). A tie at a threshold goes to the lowest flat index in every caller (the
order of a stable descending sort), so the levels nest and the counts are exact.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import ELSAError

__all__ = ["magnitude_key", "kth_smallest", "global_thresholds_stream", "global_thresholds", "key_to_float"]


def _kth_largest(flat: torch.Tensor, keeps: list) -> dict:
    """``{keep: the keep-th largest value of flat}`` (1-based), as 0-d tensors on flat's device.

    On CPU one ``numpy.partition`` (a single copy, no index tensor) serves every level.
    """
    if not keeps:
        return {}
    n = flat.numel()
    if flat.device.type == "cpu":
        import numpy as np

        pos = sorted({n - kp for kp in keeps})
        part = np.partition(flat.numpy(), pos)
        out = {kp: torch.tensor(part[n - kp]) for kp in keeps}
        del part
        return out
    return {kp: torch.kthvalue(flat, n - kp + 1).values for kp in keeps}


def global_thresholds(get_tensor, names: list, sparsities: list) -> list:
    """Exact global magnitude thresholds (one per sparsity) over the tensors ``names``, streaming.

    ``get_tensor(name)`` returns a tensor; it is called twice per name, so peak memory stays near
    the largest tensor. The threshold of sparsity ``s`` is the ``round(s * total)``-th smallest
    ``|w|`` (0-based) over all the tensors, found with a 65,536-bin histogram of the float32 bit
    patterns, then an exact sort inside the one bin that holds it.
    """
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for n in names:
        b = (get_tensor(n).detach().abs().float().reshape(-1).view(torch.int32) >> 15).cpu()
        hist += torch.bincount(b, minlength=1 << 16)
        total += b.numel()
    cum = torch.cumsum(hist, 0)
    want = []
    for s in sparsities:
        k = min(max(int(round(s * total)), 0), total - 1)
        b = int(torch.searchsorted(cum, torch.tensor(k), right=True))
        want.append((b, k - (int(cum[b - 1]) if b else 0)))
    vals = {b: [] for b, _ in want}
    for n in names:
        w = get_tensor(n).detach().abs().float().reshape(-1).cpu()
        bb = w.view(torch.int32) >> 15
        for b in vals:
            vals[b].append(w[bb == b])
    return [float(torch.sort(torch.cat(vals[b])).values[r]) for b, r in want]


#: ``chunks()`` returns a fresh iterator over consecutive flat float chunks of one tensor (or of
#: several tensors, for :func:`global_thresholds_stream`), in index order.
ChunkSource = Callable[[], Iterable[torch.Tensor]]


_HI_BINS = 1 << 16  # float32 |w|: bits >> 15


_LO_BINS = 1 << 15  # float32 |w|: bits & 0x7FFF inside one high bin; 16-bit |w|: all 15 bits


def magnitude_key(x: torch.Tensor, *, as_float32: bool = False) -> torch.Tensor:
    """The bit pattern of ``|x|`` as int32, ordered like ``|x|`` (NaN above Inf).

    Args:
        x: flat float32 / float16 / bfloat16 tensor.
        as_float32: key of ``|x|.float()`` (31 bits) for every dtype; otherwise 16-bit dtypes keep
            their own 15 magnitude bits.

    Returns:
        int32 tensor of ``x``'s shape: float32 (or ``as_float32``) ``0..2**31-1``, 16-bit ``0..2**15-1``.
    """
    if x.dtype == torch.float32:
        return x.view(torch.int32) & 0x7FFFFFFF
    if as_float32:
        return x.float().view(torch.int32) & 0x7FFFFFFF
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.view(torch.int16).to(torch.int32) & 0x7FFF
    raise ELSAError(f"magnitude keys need float32, float16 or bfloat16, got {x.dtype}")


def _wide(x: torch.Tensor, as_float32: bool) -> bool:
    return as_float32 or x.dtype == torch.float32


def kth_smallest(chunks: ChunkSource, ranks: list, *, as_float32: bool = False) -> list:
    """Exact order statistics of ``|w|`` over all chunks, by histograms (one or two passes).

    Args:
        chunks: re-iterable chunk source (see :data:`ChunkSource`); every chunk of one dtype.
        ranks: 0-based ranks in ascending order of ``|w|`` (each in ``0..n-1``).
        as_float32: rank the float32 values of ``|w|`` (keys of :func:`magnitude_key`).

    Returns:
        ``[(key, greater)]`` per rank: the :func:`magnitude_key` of the rank-th smallest ``|w|``
        and how many elements have a larger key.

    Raises:
        ELSAError: a rank outside ``0..n-1``.
    """
    hist, wide = None, None
    for ch in chunks():
        key = magnitude_key(ch, as_float32=as_float32)
        if hist is None:
            wide = _wide(ch, as_float32)
            hist = torch.zeros(_HI_BINS if wide else _LO_BINS, dtype=torch.int64)
        hist += torch.bincount(key >> 15 if wide else key, minlength=hist.numel())
        del key
    if not ranks:
        return []
    if hist is None:
        raise ELSAError("kth_smallest: no data")
    cum = torch.cumsum(hist, 0)
    total = int(cum[-1])
    picks = []
    for r in ranks:
        if not 0 <= r < total:
            raise ELSAError(f"kth_smallest: rank {r} outside 0..{total - 1}")
        b = int(torch.searchsorted(cum, torch.tensor(r), right=True))
        picks.append((b, r - (int(cum[b - 1]) if b else 0)))
    if not wide:
        return [(b, total - int(cum[b])) for b, _ in picks]
    low = _low_histograms(chunks, {b for b, _ in picks}, as_float32)
    out = []
    for b, within in picks:
        lc = torch.cumsum(low[b], 0)
        lo = int(torch.searchsorted(lc, torch.tensor(within), right=True))
        out.append(((b << 15) | lo, total - int(cum[b]) + int(lc[-1]) - int(lc[lo])))
    return out


def _low_histograms(chunks: ChunkSource, bins: set, as_float32: bool) -> dict:
    """Second pass for float32 keys: ``{high bin: histogram of the low 15 bits of its keys}``."""
    low = {b: torch.zeros(_LO_BINS, dtype=torch.int64) for b in bins}
    for ch in chunks():
        key = magnitude_key(ch, as_float32=as_float32)
        hi = key >> 15
        for b in bins:
            sel = key[hi == b]
            if sel.numel():
                low[b] += torch.bincount(sel & 0x7FFF, minlength=_LO_BINS)
        del key, hi
    return low


def key_to_float(key: int) -> float:
    """The float32 value whose bit pattern is ``key`` (a float32 magnitude key), as a Python float."""
    return float(np.array([key], dtype=np.int32).view(np.float32)[0])


def global_thresholds_stream(chunks: ChunkSource, sparsities: list) -> list:
    """:func:`elsa_codec.format.encode.global_thresholds` from chunks: the same floats, a few chunks of memory.

    Args:
        chunks: chunks of every selected tensor, one after the other (dtypes may differ; each is
            ranked by its float32 ``|w|``).
        sparsities: per level; the threshold of ``s`` is the ``round(s * total)``-th smallest
            ``|w|`` (0-based, clamped to ``0..total-1``).

    Returns:
        One Python float per sparsity.
    """
    total = sum(ch.numel() for ch in chunks())
    ranks = [min(max(int(round(s * total)), 0), total - 1) for s in sparsities]
    return [key_to_float(k) for k, _ in kth_smallest(chunks, ranks, as_float32=True)]
