"""Per-tile minimum-code table for skipping empty weight tiles in the fused level GEMM.

docs/DESIGN.md, "Serving": tiles whose every weight is out of the level (all codes ``>= t``) are skipped,
using a per-tile minimum-code table computed once at load (runtime only, nothing on disk). Codes
are ELSA's ``N - 1`` in the ``k`` low bits of each weight (arXiv 2312.06872, section 2.2).

Format: for an encoded weight `[out_features, in_features]` = `[N, K]` and the fixed tile
``TILE_N x TILE_K = 64 x 64``, the table is a contiguous uint8 tensor
`[cdiv(N, 64), cdiv(K, 64)]` on the weight's device whose entry ``[i, j]`` is the smallest code in
``encoded[64*i : 64*i+64, 64*j : 64*j+64]`` (edge tiles cover only the existing weights). Tile
``(i, j)`` holds no weight of level ``t`` exactly when ``table[i, j] >= t``. Codes are at most 255
(``k <= 8``) so uint8 holds them all. The table depends on ``code_bits``.

This op is a plain PyTorch reduction (no Triton kernel): it runs once per weight, reads the weight
once in row chunks (transient memory: one byte per weight of a chunk of 1024 rows), and is traced
as ordinary aten ops by ``torch.compile``.
"""
from __future__ import annotations

import torch

from elsa_codec.errors import ELSAError
from elsa_codec.format.bits import check_code_bits

from ._common import INT_VIEW, check_tensor

__all__ = ["TILE_N", "TILE_K", "tile_table", "tile_table_reference", "tile_table_shape", "tile_density"]

#: Tile rows (output features) covered by one table entry.
TILE_N = 64
#: Tile columns (input features) covered by one table entry.
TILE_K = 64

_CHUNK_ROWS = 1024  # a multiple of TILE_N


def tile_table_shape(out_features: int, in_features: int) -> tuple[int, int]:
    """Shape `[cdiv(N, 64), cdiv(K, 64)]` of the table for a weight `[N, K]`."""
    return (-(-out_features // TILE_N), -(-in_features // TILE_K))


def _check_weight(encoded, code_bits: int) -> None:
    check_tensor(encoded, "encoded")
    if encoded.dim() != 2:
        raise ELSAError(
            f"encoded: the tile table needs a 2-D weight [out_features, in_features], got shape {tuple(encoded.shape)}"
        )
    check_code_bits(encoded.dtype, code_bits, name="encoded")


def tile_table(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Minimum code of every 64x64 tile of ``encoded`` (compute once per weight; see module doc).

    Args:
        encoded: `[N, K]` float32 / float16 / bfloat16 encoded weight (any strides), CPU or CUDA.
        code_bits: ``k``, in ``1..MAX_CODE_BITS[encoded.dtype]``.

    Returns:
        `[cdiv(N, 64), cdiv(K, 64)]` contiguous uint8 tensor on ``encoded``'s device; entry
        ``[i, j]`` = min over the tile of ``bits & (2**k - 1)``. Empty weights (N or K = 0) give an
        empty table.

    Raises:
        ELSAError: not a tensor, not 2-D, unsupported dtype, ``code_bits`` out of range.
    """
    _check_weight(encoded, code_bits)
    n, k = encoded.shape
    tn, tk = tile_table_shape(n, k)
    out = torch.empty((tn, tk), dtype=torch.uint8, device=encoded.device)
    if n == 0 or k == 0:
        return out
    mask = (1 << code_bits) - 1
    bits = encoded.view(INT_VIEW[encoded.dtype])
    kp = tk * TILE_K
    for r0 in range(0, n, _CHUNK_ROWS):
        rows = min(_CHUNK_ROWS, n - r0)
        rp = -(-rows // TILE_N) * TILE_N
        codes = torch.full((rp, kp), 255, dtype=torch.uint8, device=encoded.device)
        codes[:rows, :k] = bits[r0:r0 + rows] & mask
        mins = codes.view(rp // TILE_N, TILE_N, tk, TILE_K).amin(dim=(1, 3))
        out[r0 // TILE_N: r0 // TILE_N + rp // TILE_N] = mins
    return out


def tile_table_reference(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Tile-by-tile Python loop computing the same `[cdiv(N, 64), cdiv(K, 64)]` uint8 table as
    :func:`tile_table` (slow; for tests on small weights)."""
    _check_weight(encoded, code_bits)
    n, k = encoded.shape
    tn, tk = tile_table_shape(n, k)
    codes = encoded.view(INT_VIEW[encoded.dtype]).to(torch.int32) & ((1 << code_bits) - 1)
    out = torch.empty((tn, tk), dtype=torch.uint8)
    for i in range(tn):
        for j in range(tk):
            out[i, j] = int(codes[i * TILE_N:(i + 1) * TILE_N, j * TILE_K:(j + 1) * TILE_K].min())
    return out.to(encoded.device)


def check_tile_table(table, out_features: int, in_features: int, device: torch.device) -> None:
    """Raise ELSAError unless ``table`` is a uint8 `[cdiv(N, 64), cdiv(K, 64)]` tensor on ``device``."""
    if not isinstance(table, torch.Tensor):
        raise ELSAError(f"tile_table: expected a torch.Tensor from tile_table(encoded, code_bits), got {type(table).__name__}")
    want = tile_table_shape(out_features, in_features)
    if tuple(table.shape) != want:
        raise ELSAError(
            f"tile_table: shape {tuple(table.shape)} does not fit a weight [{out_features}, {in_features}]: "
            f"expected {want} (64x64 tiles)"
        )
    if table.dtype != torch.uint8:
        raise ELSAError(f"tile_table: dtype must be torch.uint8, got {table.dtype}")
    if table.device != device:
        raise ELSAError(f"tile_table: on {table.device} but the weight is on {device}")


def tile_density(table: torch.Tensor, level: int) -> float:
    """Fraction of 64x64 tiles that hold at least one weight of level ``level`` (min code < t).

    Reads the table on the host (a device sync): call it once per level switch, e.g. to decide
    whether passing the table to :func:`elsa_codec.kernels.triton.elsa_linear` is worth it.
    """
    if table.numel() == 0:
        return 0.0
    return float((table.to(torch.int32) < int(level)).float().mean())
