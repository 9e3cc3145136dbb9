"""Fused level GEMM: ``y = x @ W_t.T + bias`` straight from the one encoded weight.

ELSA (Halvachi et al., arXiv 2312.06872, section 2.2) keeps every level's network inside one dense
weight: weight ``i`` belongs to level ``t`` when its code (the ``k`` low bits of its bit pattern)
is ``< t``. docs/DESIGN.md, "Serving": on CUDA the kernel decodes each weight tile in registers and
multiplies (no decoded copy in memory); 64x64 tiles whose every code is ``>= t`` (read from
:func:`elsa_codec.kernels.triton.tile_table`) are neither loaded nor multiplied. Unstructured, N:M and
block levels all run through this one kernel. The dense level is the stored tensor itself and goes
to ``F.linear`` (cuBLAS / the CPU BLAS).

Layout of this file: the private ``@triton.jit`` kernel (plus its autotuned wrapper), the
launcher, the torch-op registration ``elsa_codec::linear`` (fake and autograd included), the
public :func:`elsa_linear` and the pure-PyTorch reference :func:`elsa_linear_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from elsa_codec.errors import ELSAError

from ._common import (
    INT32_LIMIT,
    INT_VIEW,
    INTERPRET,
    check_codec_args,
    device_guard,
    kernels_available,
    needs_autograd,
)
from ._dot import cast_out, dot_acc
from .decode import decode_level_reference
from .tile_table import TILE_K, TILE_N, check_tile_table

__all__ = ["elsa_linear", "elsa_linear_reference", "AUTOTUNE_CONFIGS", "INTERPRETER_CONFIG"]


# --------------------------------------------------------------------------------------------
# Triton kernel (private)
# --------------------------------------------------------------------------------------------
@triton.jit
def _accumulate_tile(acc, x_ptrs, w_ptrs, offs_m, offs_n, offs_k, k_left, M, N, level,
                     CODE_MASK: tl.constexpr, EVEN_K: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``acc += x_tile @ decode(w_tile)``; ``w_tile`` is `[BLOCK_K, BLOCK_N]` of bit patterns."""
    if EVEN_K:
        x = tl.load(x_ptrs, mask=(offs_m < M)[:, None], other=0.0)
        bits = tl.load(w_ptrs, mask=(offs_n < N)[None, :], other=0)
    else:
        x = tl.load(x_ptrs, mask=(offs_m < M)[:, None] & (offs_k < k_left)[None, :], other=0.0)
        bits = tl.load(w_ptrs, mask=(offs_k < k_left)[:, None] & (offs_n < N)[None, :], other=0)
    # Decode in registers: keep the bit pattern where code < level, +0.0 elsewhere.
    w = tl.where((bits & CODE_MASK) < level, bits, tl.zeros_like(bits)).to(x.dtype, bitcast=True)
    return dot_acc(acc, x, w, UPCAST, IEEE)


@triton.heuristics({
    "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
    "TT_R": lambda a: max(a["BLOCK_N"] // 64, 1),
    "TT_C": lambda a: max(a["BLOCK_K"] // 64, 1),
})
@triton.jit
def _elsa_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, tt_ptr,
    M, N, K, level,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    stride_tr, stride_tc, TT_ROWS, TT_COLS,
    M_BUCKET,  # autotune key only (power-of-two bucket of M)
    CODE_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_TABLE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    INT64: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, TT_R: tl.constexpr, TT_C: tl.constexpr,
):
    """One `[BLOCK_M, BLOCK_N]` output tile of ``y = x @ W_t.T (+ bias)``, fp32 accumulation.

    ``w_ptr`` points at the encoded weight's bit patterns (int16/int32 view of ``x``'s float type). With ``USE_TABLE`` the K loop skips (no load, no multiply) every step whose 64x64
    table tiles all have min code >= level. Block sizes are powers of two that divide 64 or are
    multiples of 64, so each step covers whole table tiles or lies inside one.
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks share the weight tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    tt_row0 = (pid_n * BLOCK_N) // 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        if USE_TABLE:
            tt_col0 = (kb * BLOCK_K) // 64
            if TT_R * TT_C == 1:
                tmin = tl.load(tt_ptr + tt_row0 * stride_tr + tt_col0 * stride_tc).to(tl.int32)
            else:
                rr = tt_row0 + tl.arange(0, TT_R)
                cc = tt_col0 + tl.arange(0, TT_C)
                tv = tl.load(tt_ptr + rr[:, None] * stride_tr + cc[None, :] * stride_tc,
                             mask=(rr < TT_ROWS)[:, None] & (cc < TT_COLS)[None, :], other=255)
                tmin = tl.min(tv.to(tl.int32))
            if tmin < level:
                acc = _accumulate_tile(acc, x_ptrs, w_ptrs, offs_m, offs_n, offs_k, k_left, M, N, level,
                                       CODE_MASK, EVEN_K, UPCAST, IEEE)
        else:
            acc = _accumulate_tile(acc, x_ptrs, w_ptrs, offs_m, offs_n, offs_k, k_left, M, N, level,
                                   CODE_MASK, EVEN_K, UPCAST, IEEE)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    out = cast_out(acc, y_ptr.dtype.element_ty, ROUND_BF16)
    tl.store(y_ptrs, out, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _cfg(bm, bn, bk, group_m, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


#: Autotune candidates for float16 / bfloat16 on H100/H200-class GPUs (tensor cores; float32 has
#: its own list, :data:`FP32_CONFIGS`). Every block size is a power of two dividing 64 or a
#: multiple of 64 (tile-table tiles). With a tile table only configs with BLOCK_N <= 64 and
#: BLOCK_K <= 64 are used, so that every K step covers a single 64x64 table tile and skipping has
#: the table's full granularity. Every config the launcher can pick passes the sm_90a compile gate
#: with triton 3.9 and 3.6 (``elsa bench static``: compiles, <= 255 registers, no spill, fits
#: shared memory, wgmma for tiles with BLOCK_M >= 64); bench/results/static-sm90/ has the figures.
_TENSOR_CORE_CONFIGS = [
    # M <= 16: weight streaming (GEMV-like), many narrow column blocks to fill the SMs.
    # 8 warps, not 4: with 4 warps (any num_stages) the no-bias EVEN_K kernel kept 16 B of stack
    # per thread (11 LDL/STL), float16 and bfloat16 (compile gate, triton 3.9).
    _cfg(16, 32, 256, 1, 8, 4),
    _cfg(16, 64, 128, 1, 4, 5),
    # 8 warps, not 4: with 4 warps ptxas spilled (255 registers + 24-32 B of stack per thread) in
    # every specialisation, float16 and bfloat16 (compile gate, triton 3.9).
    _cfg(16, 64, 256, 1, 8, 3),
    _cfg(16, 128, 128, 1, 4, 4),
    _cfg(16, 32, 64, 1, 4, 6),  # table-compatible
    _cfg(16, 64, 64, 1, 4, 6),  # table-compatible
    # 16 < M <= 64
    _cfg(32, 64, 128, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(32, 64, 64, 8, 4, 5),  # table-compatible; 64x64x64 (last in the list) serves here too
    # M > 64: compute bound.
    _cfg(128, 128, 64, 8, 8, 3),
    _cfg(128, 128, 64, 8, 4, 4),
    _cfg(128, 256, 64, 8, 8, 3),
    _cfg(256, 128, 64, 8, 8, 3),
    _cfg(128, 64, 64, 8, 4, 4),  # table-compatible
    _cfg(256, 64, 64, 8, 8, 3),  # table-compatible
    _cfg(64, 64, 64, 8, 4, 4),  # table-compatible; the fallback when every other config is pruned
]

#: float32 candidates (any M; float32 is not a performance target on Hopper). With
#: ``input_precision="ieee"`` (TF32 off: torch's default) the product runs on the FMA units with
#: the operand fragments in registers, and the compile gate found nearly every config above
#: spilling (e.g. 128x128x64: 10 KB of stack per thread; 16x64x64: 360 B); with TF32 several did
#: too (16x32x256 and 32x64x128 with triton 3.9; 16x32x64 and 128x64x64 with triton 3.6). These
#: small-K tiles compile clean in every specialisation, both precisions, both triton versions.
FP32_CONFIGS = [
    _cfg(16, 32, 16, 1, 4, 4),
    _cfg(16, 64, 16, 1, 4, 4),
    _cfg(32, 64, 16, 8, 4, 4),
    _cfg(64, 64, 16, 8, 8, 4),
]

AUTOTUNE_CONFIGS = _TENSOR_CORE_CONFIGS + FP32_CONFIGS

#: The single fixed configuration used under the Triton interpreter and when no autotuning is
#: wanted (small blocks keep interpreted programs cheap).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4}

_SMEM_BUDGET = 200 * 1024  # bytes of shared memory a config may use (H100/H200: 227 KiB)
#: Row strides (``K``) that are not multiples of 16 elements defeat vectorised and asynchronous
#: copies: the tiles then pass through registers, and the compile gate found configs holding more
#: than this many tile elements per thread (``(BM*BN + BM*BK + BK*BN) / threads``) spilling there
#: (e.g. 128x64x64 with 4 warps, 160: 392 B of stack; 32x64x128, 112: 32 B with triton 3.6).
_UNALIGNED_TILE_ELEMENTS = 96


def _config_key(c) -> tuple:
    kw = c.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["GROUP_M"], c.num_warps, c.num_stages


_FP32_KEYS = frozenset(_config_key(c) for c in FP32_CONFIGS)


def _rows_aligned(named_args) -> bool:
    """Whether ``K`` and the row strides of ``x`` and ``w`` are multiples of 16 elements (what
    Triton's divisibility specialisation needs for 16-byte vector copies). A transposed weight
    (``stride_wn == 1``, ``ELSATransformersConv1D``'s ``W.t()``) counts as unaligned: the pruner keeps it to
    the small tiles, which the compile gate checks in that layout (``wt-*``)."""
    return all(int(named_args.get(n, 0)) % 16 == 0 for n in ("K", "stride_xm", "stride_wn"))


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that suit the call (each rule keeps the compile gate's verdict true):

    - float32: only :data:`FP32_CONFIGS` (and those only there); with a transposed weight
      (``stride_wn == 1``) only their 16-row tiles;
    - float16 / bfloat16: BLOCK_M suits the M bucket, the pipeline fits shared memory, and with
      unaligned rows (see :func:`_rows_aligned`) at most ``_UNALIGNED_TILE_ELEMENTS`` tile
      elements per thread;
    - with a tile table, BLOCK_N and BLOCK_K do not exceed the 64x64 table tiles.
    """
    mb = named_args["M_BUCKET"]
    elt = named_args["x_ptr"].element_size()
    use_table = kwargs.get("USE_TABLE", False)
    fp32 = elt == 4
    aligned = _rows_aligned(named_args)
    w_transposed = int(named_args.get("stride_wn", 0)) == 1
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (_config_key(c) in _FP32_KEYS) != fp32:
            continue
        if fp32 and w_transposed and bm > 16:
            # transposed weight (ELSATransformersConv1D): 32x64x16 and 64x64x16 with a tile table spilled 8 B
            # per thread with IEEE precision (compile gate, triton 3.9, layout wt-evenk)
            continue
        if use_table and (bn > TILE_N or bk > TILE_K):
            continue
        if not fp32:
            if mb <= 16 and bm != 16:
                continue
            if 16 < mb <= 64 and not 32 <= bm <= 64:
                continue
            if mb > 64 and bm < 64:
                continue
            if (bm * bk + bk * bn) * elt * c.num_stages > _SMEM_BUDGET:
                continue
            if not aligned and (bm * bn + bm * bk + bk * bn) > _UNALIGNED_TILE_ELEMENTS * 32 * c.num_warps:
                continue
        kept.append(c)
    if kept:
        return kept
    return [FP32_CONFIGS[0] if fp32 else _TENSOR_CORE_CONFIGS[-1]]


_elsa_linear_kernel_tuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    # stride_xm / stride_wn equal K for contiguous inputs (no extra tuning); they are in the key
    # because the pruner looks at their alignment.
    key=["M_BUCKET", "N", "K", "stride_xm", "stride_wn", "CODE_MASK", "HAS_BIAS", "USE_TABLE", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_elsa_linear_kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _check_block_config(cfg: dict) -> None:
    for name, tile in (("BLOCK_N", TILE_N), ("BLOCK_K", TILE_K)):
        b = cfg[name]
        if b < 1 or b & (b - 1) or not (tile % b == 0 or b % tile == 0):
            raise ELSAError(f"{name}={b} must be a power of two dividing {tile} or a multiple of {tile}")


def _launch_linear(x: torch.Tensor, encoded: torch.Tensor, level: int, code_bits: int,
                   bias: torch.Tensor | None, tile_table: torch.Tensor | None, *,
                   _config: dict | None = None, _force_int64: bool = False) -> torch.Tensor:
    """Run the kernel (inputs already checked). Returns `[*lead, N]` in ``x.dtype``, contiguous."""
    n, k = encoded.shape
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*lead, n)
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return y.view(*lead, n)

    pad = 256  # largest block size: masked-off lanes stay within int32 too
    extents = (
        (m + pad) * x2.stride(0) + (k + pad) * x2.stride(1),
        (n + pad) * encoded.stride(0) + (k + pad) * encoded.stride(1),
        (m + pad) * n + n + pad,
    )
    int64 = _force_int64 or max(extents) > INT32_LIMIT
    use_table = tile_table is not None
    tt = tile_table if use_table else y
    tt_strides = tile_table.stride() if use_table else (0, 0)
    tt_shape = tile_table.shape if use_table else (0, 0)
    dtype = x.dtype
    ieee = dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    args = (
        x2, encoded.view(INT_VIEW[dtype]), bias if bias is not None else y, y, tt,
        m, n, k, level,
        x2.stride(0), x2.stride(1), encoded.stride(0), encoded.stride(1), y.stride(0), y.stride(1),
        tt_strides[0], tt_strides[1], tt_shape[0], tt_shape[1],
        min(triton.next_power_of_2(m), 4096),
    )
    meta = dict(CODE_MASK=(1 << code_bits) - 1, HAS_BIAS=bias is not None,
                USE_TABLE=use_table, UPCAST=INTERPRET, IEEE=ieee, INT64=int64,
                ROUND_BF16=INTERPRET and dtype == torch.bfloat16)
    with device_guard(x):
        if _config is None and not INTERPRET and x.is_cuda:
            def grid(meta):
                return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

            _elsa_linear_kernel_tuned[grid](*args, **meta)
        else:
            cfg = dict(INTERPRETER_CONFIG, **(_config or {}))
            _check_block_config(cfg)
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
            _elsa_linear_kernel[grid](*args, **meta, **cfg)
    return y.view(*lead, n)


# --------------------------------------------------------------------------------------------
# torch op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("elsa_codec::linear", mutates_args=())
def _linear_op(x: torch.Tensor, encoded: torch.Tensor, level: int, code_bits: int,
               bias: torch.Tensor | None = None, tile_table: torch.Tensor | None = None) -> torch.Tensor:
    """Torch op behind :func:`elsa_linear` (sparse levels; inputs checked by the caller)."""
    if kernels_available(x.device):
        return _launch_linear(x, encoded, level, code_bits, bias, tile_table)
    return _reference_impl(x, encoded, level, code_bits, bias).contiguous()


@_linear_op.register_fake
def _(x, encoded, level, code_bits, bias=None, tile_table=None):
    return x.new_empty((*x.shape[:-1], encoded.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, encoded, level, code_bits, bias, _ = inputs
    ctx.save_for_backward(x, encoded)
    ctx.level, ctx.code_bits, ctx.has_bias = level, code_bits, bias is not None


def _linear_backward(ctx, gy):
    x, encoded = ctx.saved_tensors
    w_t = decode_level_reference(encoded, ctx.level, ctx.code_bits)
    n, k = encoded.shape
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (gy @ w_t).to(x.dtype)
    if ctx.needs_input_grad[1]:
        keep = (encoded.view(INT_VIEW[encoded.dtype]) & ((1 << ctx.code_bits) - 1)) < ctx.level
        full = gy.reshape(-1, n).t() @ x.reshape(-1, k)
        gw = torch.where(keep, full, torch.zeros((), dtype=full.dtype, device=full.device)).to(encoded.dtype)
    if ctx.has_bias and ctx.needs_input_grad[4]:
        gb = gy.reshape(-1, n).sum(0)
    return gx, gw, None, None, gb, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def _check_linear_args(x, encoded, level, code_bits, bias, tile_table, num_levels) -> tuple[int, bool]:
    t, dense = check_codec_args(encoded, level, code_bits, num_levels)
    if encoded.dim() != 2:
        raise ELSAError(f"encoded: expected a 2-D weight [out_features, in_features], got shape {tuple(encoded.shape)}")
    n, k = encoded.shape
    if not isinstance(x, torch.Tensor):
        raise ELSAError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ELSAError(
            f"x: shape {tuple(x.shape)} does not match the weight [{n}, {k}]: the last dimension must be in_features={k}"
        )
    if x.dtype != encoded.dtype:
        raise ELSAError(f"x: dtype {x.dtype} differs from the encoded weight's dtype {encoded.dtype}")
    if x.device != encoded.device:
        raise ELSAError(f"x: on {x.device} but the encoded weight is on {encoded.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ELSAError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n,):
            raise ELSAError(f"bias: shape {tuple(bias.shape)} does not match out_features={n}: expected ({n},)")
        if bias.dtype != x.dtype:
            raise ELSAError(f"bias: dtype {bias.dtype} differs from x's dtype {x.dtype}")
        if bias.device != x.device:
            raise ELSAError(f"bias: on {bias.device} but x is on {x.device}")
    if tile_table is not None:
        check_tile_table(tile_table, n, k, encoded.device)
    return t, dense


def elsa_linear(x: torch.Tensor, encoded: torch.Tensor, level, code_bits: int, bias: torch.Tensor | None = None,
                *, tile_table: torch.Tensor | None = None, num_levels: int | None = None) -> torch.Tensor:
    """``y = x @ W_t.T + bias`` with ``W_t = where(code < t, encoded, 0)`` decoded on the fly.

    docs/DESIGN.md, "Serving"; ELSA, arXiv 2312.06872, section 2.2. On CUDA (or under the Triton
    interpreter) a fused Triton GEMM decodes each weight tile in registers (no decoded copy in
    memory) and accumulates in float32; with ``tile_table`` the 64x64 tiles whose min code is
    ``>= t`` are neither loaded nor multiplied. The dense level (``T+1``, or ``2**k`` without
    ``num_levels``) calls ``F.linear`` on the stored tensor. On a plain CPU it runs
    :func:`elsa_linear_reference`.

    Args:
        x: `[*, in_features]` input (any leading dims, any strides; a non-viewable layout is
            copied), same dtype and device as ``encoded``.
        encoded: `[out_features, in_features]` float32 / float16 / bfloat16 encoded weight (any
            strides).
        level: ``t``, an int in ``1..2**k`` (``1..T+1`` with ``num_levels``), or ``"dense"``
            (with ``num_levels``).
        code_bits: ``k``, in ``1..MAX_CODE_BITS[encoded.dtype]`` (8 / 4 / 3).
        bias: optional `[out_features]`, same dtype and device as ``x``.
        tile_table: optional `[cdiv(out_features, 64), cdiv(in_features, 64)]` uint8 table from
            :func:`elsa_codec.kernels.triton.tile_table` (computed once per weight and ``code_bits``).
            Without it no tile is skipped (every tile is decoded and masked). It must describe
            ``encoded``: a stale table silently skips wrong tiles.
        num_levels: ``T`` (optional): range check, dense level ``T+1`` and the alias ``"dense"``.

    Returns:
        `[*, out_features]` tensor in ``x``'s dtype (contiguous from the kernel).

    Raises:
        ELSAError: a non-tensor argument, unsupported dtype, dtype mismatch between ``x``,
            ``encoded`` and ``bias``, devices differ, ``encoded`` not 2-D, ``x``'s last dimension
            is not in_features, wrong ``bias`` or ``tile_table`` shape/dtype, ``code_bits`` or
            ``level`` out of range. Messages give the actual sizes.

    Under ``torch.compile`` a sparse level traces to ``torch.ops.elsa_codec.linear`` (one opaque
    node, fake implementation registered); eager calls that autograd must record also go through
    that op (gradients for ``x``, ``encoded`` (masked to the level) and ``bias``). Other eager calls
    launch the kernel directly (no dispatcher overhead).
    """
    t, dense = _check_linear_args(x, encoded, level, code_bits, bias, tile_table, num_levels)
    if dense:
        return F.linear(x, encoded, bias)
    if torch.compiler.is_compiling() or needs_autograd(x, encoded, bias):
        return _linear_op(x, encoded, t, code_bits, bias, tile_table)
    if kernels_available(x.device):
        return _launch_linear(x, encoded, t, code_bits, bias, tile_table)
    return _reference_impl(x, encoded, t, code_bits, bias)


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def _reference_impl(x, encoded, level, code_bits, bias):
    return F.linear(x, decode_level_reference(encoded, level, code_bits), bias)


def elsa_linear_reference(x: torch.Tensor, encoded: torch.Tensor, level, code_bits: int,
                          bias: torch.Tensor | None = None, *, tile_table: torch.Tensor | None = None,
                          num_levels: int | None = None) -> torch.Tensor:
    """Pure-PyTorch :func:`elsa_linear`: ``F.linear(x, extract_level(encoded, t, k), bias)``.

    Same arguments, checks and errors as :func:`elsa_linear` (``tile_table`` is checked, not
    needed: skipping never changes the result). `[*, in_features]` x `[out_features,
    in_features]` -> `[*, out_features]` in ``x``'s dtype. Materialises the decoded level weight
    (the CPU path caches it in the serving layer).
    """
    t, dense = _check_linear_args(x, encoded, level, code_bits, bias, tile_table, num_levels)
    if dense:
        return F.linear(x, encoded, bias)
    return _reference_impl(x, encoded, t, code_bits, bias)
