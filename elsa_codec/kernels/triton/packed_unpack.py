"""Expand a packed level to its dense weight: :func:`unpack_level` (torch op ``elsa_codec::unpack_level``).

The kernel runs the packed GEMM's own tile expansion (:func:`._packed_tile.expand_tile`) and
stores the tile, so its bit-exact agreement with :func:`.packed.unpack_level_reference` (and with
``where(code < t, W, 0)``) checks the expansion the GEMM multiplies. ELSA, arXiv 2312.06872,
section 2.2; the layout in :mod:`.packed`.

Layout of this file: kernel, launcher, torch op, public function (the reference is
:func:`.packed.unpack_level_reference`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elsa_codec.errors import ELSAError

from ._common import INT_VIEW, device_guard, kernels_available
from ._packed_tile import expand_tile
from .packed import TILE_K_PACKED, PackedLevel, unpack_level_reference

__all__ = ["unpack_level", "check_packed"]


@triton.jit
def _unpack_kernel(vals_ptr, bm_ptr, base_ptr, out_ptr, N, K, KT, BLOCK_N: tl.constexpr):
    """One ``[BLOCK_N, 64]`` tile of the dense ``[N, K]`` bit patterns."""
    pid_n = tl.program_id(0)
    kt = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bits = expand_tile(vals_ptr, bm_ptr, base_ptr, offs_n, kt, KT, pid_n, BLOCK_N)
    kk = kt * 64 + tl.arange(0, 64)
    ptrs = out_ptr + offs_n[None, :] * K + kk[:, None]
    tl.store(ptrs, bits, mask=(kk < K)[:, None] & (offs_n < N)[None, :])


def _launch_unpack(packed: PackedLevel) -> torch.Tensor:
    n, k = packed.shape
    ivals = packed.values.view(INT_VIEW[packed.values.dtype])
    out = torch.empty((n, k), dtype=ivals.dtype, device=ivals.device)
    kt, nt = packed.bitmap.shape[1], packed.tile_base.shape[0]
    if n and k:
        with device_guard(ivals):
            _unpack_kernel[(nt, kt)](ivals, packed.bitmap, packed.tile_base, out, n, k, kt,
                                     BLOCK_N=packed.tile_n, num_warps=4)
    return out.view(packed.values.dtype)


def check_packed(packed, name: str = "packed") -> PackedLevel:
    """``packed`` is a consistent :class:`PackedLevel` (shapes of bitmap and bases, dtypes, one
    device); else ELSAError naming what is wrong, with the sizes."""
    if not isinstance(packed, PackedLevel):
        raise ELSAError(f"{name}: expected a PackedLevel (elsa_codec.kernels.triton.pack_level), got {type(packed).__name__}")
    n, k = packed.shape
    tn = packed.tile_n
    n_pad, kt = -(-n // tn) * tn, -(-k // TILE_K_PACKED)
    want = {"bitmap": ((n_pad, kt, 2), torch.int32), "tile_base": ((n_pad // tn, kt), torch.int32)}
    for attr, (shape, dtype) in want.items():
        t = getattr(packed, attr)
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
            raise ELSAError(f"{name}.{attr}: expected a contiguous {dtype} tensor of shape {shape} for a [{n}, {k}] weight "
                            f"in {tn}x64 tiles, got {t.dtype} {tuple(t.shape)}")
        if t.device != packed.values.device:
            raise ELSAError(f"{name}.{attr}: on {t.device} but the values are on {packed.values.device}")
    if packed.values.dtype not in INT_VIEW or packed.values.dim() != 1:
        raise ELSAError(f"{name}.values: expected a 1-D float32/float16/bfloat16 tensor, got {packed.values.dtype} "
                        f"{tuple(packed.values.shape)}")
    return packed


@torch.library.custom_op("elsa_codec::unpack_level", mutates_args=())
def _unpack_op(values: torch.Tensor, bitmap: torch.Tensor, tile_base: torch.Tensor, n: int, k: int,
               tile_n: int, level: int) -> torch.Tensor:
    """Torch op behind :func:`unpack_level`."""
    p = PackedLevel(values, bitmap, tile_base, (n, k), tile_n, level)
    return _launch_unpack(p) if kernels_available(values.device) else unpack_level_reference(p)


@_unpack_op.register_fake
def _(values, bitmap, tile_base, n, k, tile_n, level):
    return values.new_empty((n, k))


def unpack_level(packed: PackedLevel) -> torch.Tensor:
    """The dense ``[out_features, in_features]`` level of a packed level (``where(code < t, W, 0)``,
    bit for bit), expanded by the Triton kernel on CUDA or under the interpreter, else by
    :func:`.packed.unpack_level_reference`.

    Raises:
        ELSAError: ``packed`` is not a consistent :class:`PackedLevel` (:func:`check_packed`).

    Example:
        >>> import torch
        >>> from elsa_codec.kernels.triton import pack_level
        >>> w = torch.randn(3, 5)
        >>> unpack_level(pack_level(w, 2, 1)).equal(w)  # level 2 of k = 1 keeps every weight
        True
    """
    check_packed(packed)
    if torch.compiler.is_compiling():
        n, k = packed.shape
        return _unpack_op(packed.values, packed.bitmap, packed.tile_base, n, k, packed.tile_n, packed.level)
    if kernels_available(packed.values.device):
        return _launch_unpack(packed)
    return unpack_level_reference(packed)
