"""The packed level's tile expansion in registers (private; the layout: :mod:`.packed`).

:func:`expand_tile` turns one ``tile_n x 64`` tile of a :class:`~.packed.PackedLevel` into the
``[64, tile_n]`` bit patterns ``tl.dot`` takes as its right operand (``k`` by ``n``): per row a
popcount of the two bitmap words, an exclusive prefix sum over the tile's rows, then per element
the popcount of its row's bits below it gives its value's offset; dropped weights read nothing
and are ``+0.0``. Integer work only: bit-exact on a GPU and under the interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def popcount32(v):
    """Set bits of each ``uint32`` element (SWAR: 12 integer operations, no intrinsic)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def expand_tile(vals_ptr, bm_ptr, base_ptr, offs_n, kt, KT, tile_row, BLOCK_N: tl.constexpr):
    """``[64, BLOCK_N]`` bit patterns (column ``64 * kt + i``, row ``offs_n[j]``) of tile
    ``(tile_row, kt)``; ``vals_ptr`` points at the values' integer view, ``offs_n`` at whole
    padded rows (``BLOCK_N == tile_n``)."""
    word_ptr = bm_ptr + (offs_n * KT + kt) * 2
    lo = tl.load(word_ptr).to(tl.uint32, bitcast=True)
    hi = tl.load(word_ptr + 1).to(tl.uint32, bitcast=True)
    p_lo = popcount32(lo).to(tl.int32)
    row = p_lo + popcount32(hi).to(tl.int32)
    above = tl.cumsum(row, 0) - row  # kept weights in the tile's rows before each row
    base = tl.load(base_ptr + tile_row * KT + kt)
    kk = tl.arange(0, 64)[:, None]
    upper = kk >= 32
    word = tl.where(upper, hi[None, :], lo[None, :])
    b = (kk & 31).to(tl.uint32)
    one = tl.full((64, 1), 1, tl.uint32)
    below = popcount32(word & ((one << b) - one)).to(tl.int32)
    rank = base + above[None, :] + tl.where(upper, p_lo[None, :], 0) + below
    kept = ((word >> b) & one) != 0
    return tl.load(vals_ptr + rank, mask=kept, other=0)
