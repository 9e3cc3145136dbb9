"""Magnitude counters and thresholds computed chunk by chunk, with the results of the in-memory code.

:func:`elsa_codec.format.encode.tensor_magnitude_counters` needs the whole tensor (a float32 ``|w|`` copy,
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

from typing import Callable

import torch

from ..format.encode import counter_dtype
from .magnitude import tensor_magnitude_counters
from .thresholds import ChunkSource, kth_smallest, magnitude_key

__all__ = ["magnitude_key", "kth_smallest", "UnstructuredCounters", "RowBlockCounters"]

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


