"""The packed GPU level: a level's kept weights plus a bitmap per tile (built once, at ``set_level``).

ELSA (Halvachi et al., arXiv 2312.06872, section 2.2) serves level ``t`` as ``where(code < t, W, 0)``.
The fused decode-in-GEMM (:mod:`.linear`) reads every byte of the encoded weight, so an
unstructured level costs what dense costs. A packed level stores only what the level keeps, in a
layout the Triton kernel expands in registers (SpInfer, EuroSys 2025: a bitmap index per
tensor-core tile; docs/DESIGN.md, "Serving"):

- the weight ``[N, K]`` is cut into tiles of ``tile_n`` rows by 64 columns (the kernel's
  ``tl.dot`` tile: ``BLOCK_N = tile_n``, ``BLOCK_K = 64``); ``N`` and ``K`` are padded to whole
  tiles with weights the level drops;
- ``bitmap``: ``int32 [N_pad, K_pad / 64, 2]``, per row and tile the 64 keep bits as two words
  (bit ``j`` of word ``h`` is column ``64 * kt + 32 * h + j``);
- ``values``: the kept weights' bit patterns (the stored ones: bit-exact), tile by tile (row tiles
  outer, column tiles inner), inside a tile row by row, columns ascending;
- ``tile_base``: ``int32 [N_pad / tile_n, K_pad / 64]``, the offset of each tile's first value.

Inside a tile the offset of the kept weight at (row ``r``, column ``c``) is the tile's base plus
the kept counts of the rows above (an exclusive prefix sum of the rows' popcounts) plus the
popcount of the row's bits below ``c``: the kernel needs no per-row index.

Bytes per weight: ``density * element_size + 1/8`` (the bitmap) ``+ 4 / (64 * tile_n)`` (the
bases): at bfloat16 0.16x dense at 90% sparsity, 0.36x at 70%, 0.56x at 50% (the roofline floors,
bench/results/roofline/). Per kept weight that is ``element_size + 1 / (8 * density)`` bytes: at
bfloat16 3.25 at 10% density, 2.42 at 30%, 2.25 at 50%, against 4 for CSR with 16-bit column
indices (whose rows of uneven length also do not map onto ``tl.dot`` tiles). The bitmap reads
less above 1/16 density (6.25%); the levels this path is routed to (90% sparsity and denser) are
all above it. Block levels go to the fused kernel's tile skipping (:mod:`.route`). Unpacking with :func:`unpack_level_reference` gives back
``where(code < t, W, 0)`` bit for bit.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from elsa_codec.errors import ELSAError

from ._common import INT32_LIMIT, INT_VIEW, check_codec_args

__all__ = ["PackedLevel", "TILE_K_PACKED", "TILE_N_CHOICES", "pack_level", "unpack_level_reference", "packed_nbytes"]

#: Columns per bitmap tile (two 32-bit words per row).
TILE_K_PACKED = 64
#: Rows per tile the kernels accept (``BLOCK_N`` of the packed GEMM).
TILE_N_CHOICES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class PackedLevel:
    """One level of an ``[N, K]`` encoded weight, packed (module docstring for the layout).

    Attributes:
        values: ``[nnz]`` kept weights, the encoded tensor's dtype (its bit patterns).
        bitmap: ``int32 [N_pad, K_pad / 64, 2]`` keep bits.
        tile_base: ``int32 [N_pad / tile_n, K_pad / 64]`` offset of each tile's first value.
        shape: ``(N, K)`` of the weight.
        tile_n: rows per tile.
        level: the level packed.
    """

    values: torch.Tensor
    bitmap: torch.Tensor
    tile_base: torch.Tensor
    shape: tuple
    tile_n: int
    level: int

    @property
    def nbytes(self) -> int:
        """Resident bytes of the packed level (values + bitmap + tile bases)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.bitmap, self.tile_base))

    @property
    def density(self) -> float:
        """Kept fraction of the ``N * K`` weights."""
        n, k = self.shape
        return self.values.numel() / max(n * k, 1)

    def to(self, device) -> "PackedLevel":
        """A copy on ``device``."""
        return dataclasses.replace(self, values=self.values.to(device), bitmap=self.bitmap.to(device),
                                   tile_base=self.tile_base.to(device))

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"PackedLevel([{n}, {k}], level={self.level}, density={self.density:.3f}, tile={self.tile_n}x64, "
                f"{self.values.dtype}, {self.nbytes / 2**20:.2f} MiB)")


def packed_nbytes(n: int, k: int, density: float, element_size: int, tile_n: int = 64) -> float:
    """Bytes of a packed ``[n, k]`` level of the given density (the roofline model's weight bytes)."""
    n_pad, kt = math.ceil(n / tile_n) * tile_n, math.ceil(k / TILE_K_PACKED)
    return density * n * k * element_size + n_pad * kt * 8 + (n_pad // tile_n) * kt * 4


def _grid(n: int, k: int, tile_n: int) -> tuple[int, int, int]:
    n_pad = math.ceil(n / tile_n) * tile_n
    kt = math.ceil(k / TILE_K_PACKED)
    return n_pad, kt, n_pad // tile_n


def _tiled(t: torch.Tensor, nt: int, tile_n: int, kt: int) -> torch.Tensor:
    """``[N_pad, K_pad]`` -> tile-major ``[NT, KT, tile_n, 64]`` (a copy)."""
    return t.reshape(nt, tile_n, kt, TILE_K_PACKED).permute(0, 2, 1, 3).contiguous()


def _check_pack_args(encoded, level, code_bits, num_levels, tile_n) -> int:
    t, _ = check_codec_args(encoded, level, code_bits, num_levels)
    if encoded.dim() != 2:
        raise ELSAError(f"encoded: expected a 2-D weight [out_features, in_features], got shape {tuple(encoded.shape)}")
    if isinstance(tile_n, bool) or tile_n not in TILE_N_CHOICES:
        raise ELSAError(f"tile_n must be one of {TILE_N_CHOICES}, got {tile_n!r}")
    return t


def pack_level(encoded: torch.Tensor, level, code_bits: int, *, num_levels: int | None = None,
               tile_n: int = 64) -> PackedLevel:
    """Pack level ``t`` of an encoded weight: its kept values, a bitmap and tile offsets (torch
    ops on ``encoded``'s device; ``encoded`` is not modified).

    Args:
        encoded: ``[out_features, in_features]`` float32 / float16 / bfloat16 encoded weight.
        level: ``t`` in ``1..2**k`` (``1..T+1`` and ``"dense"`` with ``num_levels``).
        code_bits: ``k``.
        num_levels: ``T`` (optional range check).
        tile_n: rows per tile, one of :data:`TILE_N_CHOICES`.

    Returns:
        :class:`PackedLevel`.

    Raises:
        ELSAError: a non-tensor or unsupported dtype, not 2-D, ``code_bits`` / ``level`` out of
            range, a bad ``tile_n``, more than ``2**31 - 1`` kept weights (int32 offsets).

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> p = pack_level(w, 1, 1)  # k = 1: the code is the low bit, 0 for all four patterns
        >>> p.values.numel(), unpack_level_reference(p).equal(torch.where((w.view(torch.int32) & 1) < 1, w, 0))
        (4, True)
    """
    t = _check_pack_args(encoded, level, code_bits, num_levels, tile_n)
    n, k = encoded.shape
    n_pad, kt, nt = _grid(n, k, tile_n)
    bits = encoded.contiguous().view(INT_VIEW[encoded.dtype])
    padded = torch.zeros((n_pad, kt * TILE_K_PACKED), dtype=bits.dtype, device=bits.device)
    padded[:n, :k] = bits
    keep = torch.zeros((n_pad, kt * TILE_K_PACKED), dtype=torch.bool, device=bits.device)
    keep[:n, :k] = (bits & ((1 << code_bits) - 1)) < t
    nnz = int(keep.sum())
    if nnz > INT32_LIMIT:
        raise ELSAError(f"encoded: level {t} keeps {nnz} weights, more than the packed format's int32 offsets hold")
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    words = (keep.reshape(n_pad, kt, 2, 32).to(torch.int64) << shifts).sum(-1)  # distinct bits: the sum is the OR
    bitmap = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    keep_t = _tiled(keep, nt, tile_n, kt)
    values = _tiled(padded, nt, tile_n, kt)[keep_t].view(encoded.dtype)
    counts = keep_t.sum((2, 3), dtype=torch.int64).reshape(-1)
    base = (torch.cumsum(counts, 0) - counts).reshape(nt, kt).to(torch.int32)
    return PackedLevel(values, bitmap.contiguous(), base.contiguous(), (n, k), tile_n, t)


def unpack_level_reference(packed: PackedLevel) -> torch.Tensor:
    """Pure-PyTorch expansion of a :class:`PackedLevel` to its dense ``[N, K]`` level
    (``where(code < t, W, 0)`` bit for bit), read from the bitmap and values alone."""
    n, k = packed.shape
    n_pad, kt, nt = _grid(n, k, packed.tile_n)
    dev = packed.values.device
    shifts = torch.arange(32, dtype=torch.int64, device=dev)
    keep = ((packed.bitmap.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 1
    keep_t = _tiled(keep.reshape(n_pad, kt * TILE_K_PACKED).bool(), nt, packed.tile_n, kt)
    ivals = packed.values.view(INT_VIEW[packed.values.dtype])
    out_t = torch.zeros(keep_t.shape, dtype=ivals.dtype, device=dev)
    out_t[keep_t] = ivals
    out = out_t.permute(0, 2, 1, 3).reshape(n_pad, kt * TILE_K_PACKED)[:n, :k].contiguous()
    return out.view(packed.values.dtype)
