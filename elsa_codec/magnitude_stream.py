"""Magnitude counters and thresholds computed chunk by chunk, with the results of the in-memory code.

:func:`elsa_codec.codec.tensor_magnitude_counters` needs the whole tensor (a float32 ``|w|`` copy,
a ``numpy.partition`` copy and the counters: about 3x the tensor). The functions here read a tensor
as consecutive flat chunks (a re-iterable source: a memory-mapped file costs no anonymous memory),
so their memory is a few chunks whatever the tensor's size, and they give exactly the same counters
and thresholds:

* the k-th largest ``|w|`` is found from histograms of the bit patterns of ``|w|`` (for
  non-negative IEEE-754 floats the bit pattern orders like the value): a 32,768-bin histogram of
  the 15 magnitude bits of a 16-bit float is exact in one pass; for float32, a 65,536-bin
  histogram of the high 16 bits, then a 32,768-bin histogram of the low 15 bits inside the one
  bin that holds the rank (second pass);
* ties at a level's threshold go to the lowest flat indices, as in the in-memory code.

N:M levels are computed per block of whole rows (their groups lie in one row of the 2-D view);
block levels rank tiles across the whole tensor and fall back to the in-memory function.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .codec import counter_dtype, tensor_magnitude_counters
from .errors import ELSAError

__all__ = ["magnitude_key", "kth_smallest", "global_thresholds_stream", "UnstructuredCounters", "RowBlockCounters"]

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
    """:func:`elsa_codec.codec.global_thresholds` from chunks: the same floats, a few chunks of memory.

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


class UnstructuredCounters:
    """Counters of nested unstructured levels for consecutive chunks of one tensor.

    Equal to ``tensor_magnitude_counters(w, specs, thresholds)`` cut into the same chunks: level
    ``t`` keeps the ``keep_t = round((1 - s_t) * n)`` largest ``|w|``, ties at the threshold to the
    lowest flat indices (so the levels nest). Call it on the chunks in index order, each once.

    Args:
        chunks: re-iterable source of the tensor's flat chunks (read one or two times here; two or
            three with ``thresholds``).
        numel: the tensor's element count ``n``.
        sparsities: ``s_t`` per level 1..T, sparsest first.
        thresholds: global magnitude thresholds (:func:`global_thresholds_stream`); the tensor's
            sparsity at level ``t`` is then the fraction of ``|w|.float()`` below ``thresholds[t]``.
    """

    def __init__(self, chunks: ChunkSource, numel: int, sparsities: list, thresholds: list | None = None):
        n = numel
        if thresholds is not None:
            below = [0] * len(thresholds)
            for ch in chunks():
                a = ch.abs().float()
                for i, thr in enumerate(thresholds):
                    below[i] += int((a < thr).sum())
                del a
            sparsities = [float(b) / max(n, 1) for b in below]
        self.T = len(sparsities)
        keeps = [int(round((1.0 - s) * n)) for s in sparsities]
        inner = [kp for kp in keeps if 0 < kp < n]
        found = dict(zip(inner, kth_smallest(chunks, [n - kp for kp in inner])))
        # per level: ("none" | "all" | "thr", key, ties still to take)
        self.levels = []
        for kp in keeps:
            if kp <= 0:
                self.levels.append(["none", 0, 0])
            elif kp >= n:
                self.levels.append(["all", 0, 0])
            else:
                key, greater = found[kp]
                self.levels.append(["thr", key, kp - greater])

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        """Counters (``1..T+1``, :func:`counter_dtype`) of the next flat ``chunk``."""
        key = magnitude_key(chunk)
        c = torch.full((chunk.numel(),), self.T + 1, dtype=counter_dtype(self.T))
        for lv in self.levels:
            kind, thr, need = lv
            if kind == "none":
                continue
            if kind == "all":
                c.sub_(1)
                continue
            inside = key > thr
            if need > 0:
                ties = (key == thr).nonzero().reshape(-1)[:need]
                inside[ties] = True
                lv[2] = need - ties.numel()
            c.sub_(inside.to(c.dtype))
        return c


class RowBlockCounters:
    """Counters of N:M levels for flat ranges of one tensor, computed per block of whole rows.

    An N:M group lies inside one row of the 2-D view ``[shape[0], -1]``, so the counters of a block
    of rows are those of the whole tensor; blocks hold about ``block_elems`` elements (at least one
    row). Requests must come in increasing order of ``start``.

    Args:
        rows: ``rows(r0, r1)`` returns rows ``r0:r1`` of the tensor (original shape from dim 1 on).
        shape: the tensor's shape (dim >= 2; a 1-D tensor is one row).
        specs: ``[(sparsity, Structure)]`` of the N:M levels.
        name: the tensor's name, for errors.
    """

    def __init__(self, rows: Callable[[int, int], torch.Tensor], shape, specs: list, name: str, block_elems: int):
        self.rows, self.specs, self.name = rows, specs, name
        self.nrows = shape[0] if len(shape) >= 2 else 1
        total = 1
        for s in shape:
            total *= s
        self.row_len = max(total // max(self.nrows, 1), 1)
        self.per_block = max(1, block_elems // self.row_len)
        self.lo = self.hi = 0  # cached flat range
        self.cache = torch.empty(0, dtype=torch.uint8)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        """Counters (:func:`counter_dtype`) of flat elements ``start:stop``."""
        parts = []
        while start < stop:
            if not self.lo <= start < self.hi:
                r0 = start // self.row_len
                r1 = min(self.nrows, r0 + self.per_block)
                c = tensor_magnitude_counters(self.rows(r0, r1), self.specs, None, name=self.name)
                self.cache = c.reshape(-1).to(counter_dtype(len(self.specs)))
                self.lo, self.hi = r0 * self.row_len, r1 * self.row_len
                del c
            end = min(stop, self.hi)
            parts.append(self.cache[start - self.lo : end - self.lo])
            start = end
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def chunked(flat: torch.Tensor, size: int, convert: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``flat`` of ``size`` elements, each converted to ``convert`` if given."""
    for s in range(0, flat.numel(), size):
        ch = flat[s : s + size]
        yield ch.to(convert) if convert is not None else ch
