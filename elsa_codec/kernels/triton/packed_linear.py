"""Packed level GEMM for small M: ``y = x @ W_t.T + bias`` reading only what level ``t`` keeps.

ELSA (Halvachi et al., arXiv 2312.06872, section 2.2) serves level ``t`` as ``where(code < t, W, 0)``.
At decode (M <= 32 rows) the product is bound by the weight's bytes. The fused decode-in-GEMM
(:mod:`.linear`) reads all of them; this kernel reads a :class:`~.packed.PackedLevel` instead
(the kept values, one bit per weight and one offset per tile, SpInfer-style): each program owns
``tile_n`` output columns, walks its share of the 64-wide K tiles, expands each tile in registers
(:func:`._packed_tile.expand_tile`: popcounts and a prefix sum over the tile's rows) and runs
``tl.dot`` with float32 accumulation. When the row tiles alone do not fill the GPU, K is split
(``SPLIT_K`` programs per column tile write float32 partials, summed after; bias added then).
Weight bytes per element: ``density * element_size + 1/8`` (bench/results/roofline/).

Layout of this file: the private ``@triton.jit`` kernel, the launcher (checks shapes, picks the
split), the torch op ``elsa_codec::packed_linear`` (fake registered: ``torch.compile`` traces it
as one node), the public :func:`packed_linear` and the reference :func:`packed_linear_reference`.
Inference only: no autograd formula (the serving layer routes calls that need gradients to the
fused kernel).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from elsa_codec.errors import ELSAError

from ._common import INT_VIEW, INTERPRET, device_guard, kernels_available
from ._dot import cast_out, dot_acc
from ._packed_tile import expand_tile
from .packed import PackedLevel, unpack_level_reference
from .packed_unpack import check_packed

__all__ = ["packed_linear", "packed_linear_reference", "PACKED_MAX_M", "PACKED_CONFIGS", "split_k_for", "packed_tile_rows",
           "default_tile_rows"]

#: Rows of ``x`` the packed kernel is built for (decode); larger M is compute bound: the fused kernel.
PACKED_MAX_M = 32
#: ``(BLOCK_M, tile_n, num_warps, num_stages)`` the launcher can pick, per dtype family (the
#: compile gate compiles each, bench/results/static-sm90/). Left out because they spilled (triton
#: 3.9, sm_90a): 16-bit 16x32 with 4 warps (8 B of stack per thread, K a multiple of 16); float32
#: (``input_precision="ieee"``, torch's default: FMA units) 16x64 and 32x64 (48-1368 B), 32x32 with
#: 4 warps (328 B) and with 8 warps when K is not a multiple of 16 (32 B). 128-row tiles run with
#: 8 warps: with 4, triton 3.6 spilled 16-184 B per thread at 255 registers (3.9 did not).
PACKED_CONFIGS = {
    "16-bit": [(16, 16, 4, 2), (32, 16, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 4, 2), (16, 128, 8, 2),
               (32, 128, 8, 2)],
    "float32": [(16, 16, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
}


def packed_tile_rows(dtype: torch.dtype) -> tuple:
    """The ``tile_n`` values the packed GEMM runs for ``dtype`` (:data:`PACKED_CONFIGS`)."""
    family = "float32" if dtype == torch.float32 else "16-bit"
    return tuple(sorted({tn for _, tn, _, _ in PACKED_CONFIGS[family]}))


def default_tile_rows(dtype: torch.dtype) -> int:
    """The ``tile_n`` :func:`~elsa_codec.kernels.triton.pack_level` should use for the GEMM: 64
    rows for float16 / bfloat16, 32 for float32."""
    return 32 if dtype == torch.float32 else 64


def _config(dtype: torch.dtype, m: int, tile_n: int) -> tuple:
    """The config for ``m`` rows and tiles of ``tile_n`` rows: ``BLOCK_M`` 16 up to 16 rows, else
    32, whichever of the two the tile height has."""
    family = "float32" if dtype == torch.float32 else "16-bit"
    fits = {c[0]: c for c in PACKED_CONFIGS[family] if c[1] == tile_n}
    for bm in ((16, 32) if m <= 16 else (32, 16)):
        if bm in fits:
            return fits[bm]
    raise ELSAError(f"packed: a {dtype} level packed in tiles of {tile_n} rows has no kernel config; pack it with "
                    f"tile_n in {packed_tile_rows(dtype)} (pack_level(..., tile_n=default_tile_rows(dtype)))")


@triton.jit
def _packed_linear_kernel(
    x_ptr, vals_ptr, bm_ptr, base_ptr, b_ptr, y_ptr,
    M, N, K, KT, TILES_PER_SPLIT,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over K tiles ``[pid_s * TILES_PER_SPLIT, ...)``;
    ``SPLIT``: store the float32 partial at ``y_ptr + pid_s * stride_ys`` (bias added later)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, 64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kt0 = pid_s * TILES_PER_SPLIT
    kt1 = tl.minimum(kt0 + TILES_PER_SPLIT, KT)
    for kt in range(kt0, kt1):
        kk = kt * 64 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(offs_m < M)[:, None] & (kk < K)[None, :], other=0.0)
        w = expand_tile(vals_ptr, bm_ptr, base_ptr, offs_n, kt, KT, pid_n, BLOCK_N).to(x.dtype, bitcast=True)
        acc = dot_acc(acc, x, w, UPCAST, IEEE)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:
        tl.store(y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        out = cast_out(acc, y_ptr.dtype.element_ty, ROUND_BF16)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, out, mask=mask)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off CUDA: the interpreter), looked up once."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def split_k_for(m_tiles: int, n_tiles: int, k_tiles: int, sms: int) -> int:
    """Split K so that about two programs run per SM (at most one split per K tile): ``n_tiles
    * m_tiles`` programs alone leave a 132-SM H200 idle for ``N = 4096`` (64 tiles of 64)."""
    programs = max(m_tiles * n_tiles, 1)
    want = max(1, min(k_tiles, math.ceil(2 * sms / programs)))
    per = math.ceil(k_tiles / want)
    return math.ceil(k_tiles / per) if k_tiles else 1


def _launch_packed(x: torch.Tensor, packed: PackedLevel, bias, *, split_k: int | None = None) -> torch.Tensor:
    """Run the kernel (inputs checked). ``[*lead, N]`` in ``x.dtype``."""
    n, k = packed.shape
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    if m == 0 or n == 0 or k == 0:
        y = torch.zeros((m, n), dtype=x.dtype, device=x.device)
        return (y + bias if bias is not None else y).view(*lead, n)
    bm, _, warps, stages = _config(x.dtype, m, packed.tile_n)
    kt, nt = packed.bitmap.shape[1], packed.tile_base.shape[0]
    mt = triton.cdiv(m, bm)
    split = split_k if split_k is not None else split_k_for(mt, nt, kt, _sm_count(x.device))
    per = triton.cdiv(kt, split)
    split = triton.cdiv(kt, per)
    out = torch.empty((split, m, n) if split > 1 else (m, n), dtype=torch.float32 if split > 1 else x.dtype, device=x.device)
    ys, ym, yn = (out.stride(0), out.stride(1), out.stride(2)) if split > 1 else (0, out.stride(0), out.stride(1))
    ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    with device_guard(x):
        _packed_linear_kernel[(nt, mt, split)](
            x2, packed.values.view(INT_VIEW[x.dtype]), packed.bitmap, packed.tile_base,
            bias if bias is not None else out, out,
            m, n, k, kt, per, x2.stride(0), x2.stride(1), ys, ym, yn,
            HAS_BIAS=bias is not None, SPLIT=split > 1, UPCAST=INTERPRET, IEEE=ieee,
            ROUND_BF16=INTERPRET and x.dtype == torch.bfloat16 and split == 1,
            BLOCK_M=bm, BLOCK_N=packed.tile_n, num_warps=warps, num_stages=stages)
    if split > 1:
        y = out.sum(0)
        if bias is not None:
            y += bias.to(torch.float32)
        out = y.to(x.dtype)
    return out.view(*lead, n)


@torch.library.custom_op("elsa_codec::packed_linear", mutates_args=())
def _packed_op(x: torch.Tensor, values: torch.Tensor, bitmap: torch.Tensor, tile_base: torch.Tensor, n: int, k: int,
               tile_n: int, level: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch op behind :func:`packed_linear` (inputs checked by the caller)."""
    p = PackedLevel(values, bitmap, tile_base, (n, k), tile_n, level)
    if kernels_available(x.device):
        return _launch_packed(x, p, bias)
    return F.linear(x, unpack_level_reference(p), bias).contiguous()


@_packed_op.register_fake
def _(x, values, bitmap, tile_base, n, k, tile_n, level, bias=None):
    return x.new_empty((*x.shape[:-1], n))


def _check_args(x, packed, bias) -> None:
    check_packed(packed)
    _config(packed.values.dtype, 1, packed.tile_n)
    n, k = packed.shape
    if not isinstance(x, torch.Tensor):
        raise ELSAError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ELSAError(f"x: shape {tuple(x.shape)} does not match the packed weight [{n}, {k}]: the last dimension "
                        f"must be in_features={k}")
    if x.dtype != packed.values.dtype:
        raise ELSAError(f"x: dtype {x.dtype} differs from the packed weight's dtype {packed.values.dtype}")
    if x.device != packed.values.device:
        raise ELSAError(f"x: on {x.device} but the packed weight is on {packed.values.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            what = type(bias).__name__ if not isinstance(bias, torch.Tensor) else f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
            raise ELSAError(f"bias: expected a ({n},) {x.dtype} tensor on {x.device}, got {what}")


def packed_linear(x: torch.Tensor, packed: PackedLevel, bias: torch.Tensor | None = None, *,
                  split_k: int | None = None) -> torch.Tensor:
    """``y = x @ W_t.T + bias`` from a packed level (:func:`~elsa_codec.kernels.triton.pack_level`).

    ELSA, arXiv 2312.06872, section 2.2; the packed layout after SpInfer (EuroSys 2025). On CUDA or
    under the Triton interpreter the Triton kernel reads the kept values and the bitmap only
    (float32 accumulation); elsewhere :func:`packed_linear_reference`. Built for ``M <= 32`` rows
    (:data:`PACKED_MAX_M`); any M is computed correctly.

    Args:
        x: ``[*, in_features]``, the packed level's dtype and device.
        packed: the :class:`~.packed.PackedLevel` of an ``[out_features, in_features]`` weight.
        bias: optional ``[out_features]``.
        split_k: programs per column tile along K (default: enough to fill the GPU, :func:`split_k_for`).

    Returns:
        ``[*, out_features]`` in ``x``'s dtype.

    Raises:
        ELSAError: a non-tensor ``x``, a wrong ``x`` / ``bias`` shape, dtype or device (the sizes
            given), an inconsistent ``packed``, a ``split_k`` that is not a positive int.

    Example:
        >>> import torch
        >>> from elsa_codec.kernels.triton import pack_level
        >>> w, x = torch.randn(4, 6), torch.randn(2, 6)
        >>> torch.allclose(packed_linear(x, pack_level(w, 2, 1)), x @ w.T, atol=1e-5)
        True
    """
    _check_args(x, packed, bias)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ELSAError(f"split_k must be a positive int, got {split_k!r}")
    n, k = packed.shape
    if torch.compiler.is_compiling():
        return _packed_op(x, packed.values, packed.bitmap, packed.tile_base, n, k, packed.tile_n, packed.level, bias)
    if kernels_available(x.device):
        return _launch_packed(x, packed, bias, split_k=split_k)
    return packed_linear_reference(x, packed, bias)


def packed_linear_reference(x: torch.Tensor, packed: PackedLevel, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch :func:`packed_linear`: ``F.linear(x, unpack_level_reference(packed), bias)``
    (same checks and errors)."""
    _check_args(x, packed, bias)
    return F.linear(x, unpack_level_reference(packed), bias)

