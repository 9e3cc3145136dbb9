"""Level decoding: ``W_t = where((bits & (2**k - 1)) < t, W, 0)`` and the counters ``N = code + 1``.

ELSA (Halvachi et al., arXiv 2312.06872, section 2.2) stores each weight's code ``c = N - 1`` (``N``
the first level containing it) in the ``k`` lowest bits of its IEEE-754 bit pattern; docs/DESIGN.md,
"The code rule" and "Serving". The kernels move bit patterns only (no float arithmetic), so the
result is bit-exact for float32, float16 and bfloat16, on a GPU and under the Triton interpreter.

Layout of this file: the private ``@triton.jit`` kernels, their launchers, the torch-op
registrations (``elsa_codec::decode_level``, ``elsa_codec::decode_counters``), the public functions
and the pure-PyTorch references (:func:`decode_level_reference`, :func:`decode_counters_reference`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elsa_codec.format.bits import check_code_bits
from elsa_codec.format.bits import decode_counters as _bits_decode_counters
from elsa_codec.format.bits import extract_level as _bits_extract_level

from ._common import (
    INT32_LIMIT,
    INT_VIEW,
    INTERPRET,
    check_codec_args,
    check_tensor,
    device_guard,
    kernels_available,
    needs_autograd,
)

__all__ = ["decode_level", "decode_counters", "decode_level_reference", "decode_counters_reference"]


# --------------------------------------------------------------------------------------------
# Triton kernels (private)
# --------------------------------------------------------------------------------------------
@triton.jit
def _decode_level_kernel(src_ptr, dst_ptr, n_elements, level, CODE_MASK: tl.constexpr,
                         BLOCK: tl.constexpr, INT64: tl.constexpr):
    """``dst[i] = src[i] if (src[i] & CODE_MASK) < level else 0`` on integer bit patterns."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    bits = tl.load(src_ptr + offs, mask=inb, other=0)
    out = tl.where((bits & CODE_MASK) < level, bits, tl.zeros_like(bits))
    tl.store(dst_ptr + offs, out, mask=inb)


@triton.jit
def _decode_counters_kernel(src_ptr, dst_ptr, n_elements, CODE_MASK: tl.constexpr,
                            BLOCK: tl.constexpr, INT64: tl.constexpr):
    """``dst[i] = uint8((src[i] & CODE_MASK) + 1)`` (wraps to 0 for code 255)."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n_elements
    bits = tl.load(src_ptr + offs, mask=inb, other=0)
    counters = ((bits & CODE_MASK).to(tl.int32) + 1) & 0xFF
    tl.store(dst_ptr + offs, counters.to(tl.uint8), mask=inb)


# --------------------------------------------------------------------------------------------
# Launchers (no argument checks beyond what the kernel needs: the public functions check)
# --------------------------------------------------------------------------------------------
def _block_size(element_size: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: 16 KiB read per program on a GPU, 1024 elements when interpreted."""
    if INTERPRET:
        return 1024, 4
    return (16384 // element_size), 8


def _launch_decode_level(encoded: torch.Tensor, level: int, code_bits: int, *, _force_int64: bool = False) -> torch.Tensor:
    src = encoded.contiguous()
    out = torch.empty_like(src, memory_format=torch.contiguous_format)
    n = src.numel()
    if n == 0:
        return out
    block, warps = _block_size(src.element_size())
    int_dtype = INT_VIEW[src.dtype]
    grid = (triton.cdiv(n, block),)
    with device_guard(src):
        _decode_level_kernel[grid](
            src.view(int_dtype), out.view(int_dtype), n, level,
            CODE_MASK=(1 << code_bits) - 1, BLOCK=block, INT64=_force_int64 or n + block > INT32_LIMIT,
            num_warps=warps,
        )
    return out


def _launch_decode_counters(encoded: torch.Tensor, code_bits: int, *, _force_int64: bool = False) -> torch.Tensor:
    src = encoded.contiguous()
    out = torch.empty(src.shape, dtype=torch.uint8, device=src.device)
    n = src.numel()
    if n == 0:
        return out
    block, warps = _block_size(src.element_size())
    grid = (triton.cdiv(n, block),)
    with device_guard(src):
        _decode_counters_kernel[grid](
            src.view(INT_VIEW[src.dtype]), out, n,
            CODE_MASK=(1 << code_bits) - 1, BLOCK=block, INT64=_force_int64 or n + block > INT32_LIMIT,
            num_warps=warps,
        )
    return out


# --------------------------------------------------------------------------------------------
# torch ops (so that torch.compile / export trace them as single opaque nodes)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("elsa_codec::decode_level", mutates_args=())
def _decode_level_op(encoded: torch.Tensor, level: int, code_bits: int) -> torch.Tensor:
    """Torch op behind :func:`decode_level`; always returns a new contiguous tensor."""
    if kernels_available(encoded.device):
        return _launch_decode_level(encoded, level, code_bits)
    return decode_level_reference(encoded, level, code_bits).contiguous()


@_decode_level_op.register_fake
def _(encoded, level, code_bits):
    return torch.empty_like(encoded, memory_format=torch.contiguous_format)


def _decode_level_setup(ctx, inputs, output):
    encoded, level, code_bits = inputs
    ctx.save_for_backward(encoded)
    ctx.level, ctx.code_bits = level, code_bits


def _decode_level_backward(ctx, grad):
    (encoded,) = ctx.saved_tensors
    keep = (encoded.contiguous().view(INT_VIEW[encoded.dtype]) & ((1 << ctx.code_bits) - 1)) < ctx.level
    return torch.where(keep, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None, None


_decode_level_op.register_autograd(_decode_level_backward, setup_context=_decode_level_setup)


@torch.library.custom_op("elsa_codec::decode_counters", mutates_args=())
def _decode_counters_op(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Torch op behind :func:`decode_counters`."""
    if kernels_available(encoded.device):
        return _launch_decode_counters(encoded, code_bits)
    return decode_counters_reference(encoded, code_bits)


@_decode_counters_op.register_fake
def _(encoded, code_bits):
    return torch.empty(encoded.shape, dtype=torch.uint8, device=encoded.device)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def decode_level(encoded: torch.Tensor, level, code_bits: int, num_levels: int | None = None) -> torch.Tensor:
    """The weight of level ``t``: ``where((bits & (2**k - 1)) < t, encoded, 0)``.

    docs/DESIGN.md, "The code rule"; ELSA, arXiv 2312.06872, section 2.2. Bit-exact: kept weights keep
    their bit pattern (code bits included), dropped ones become ``+0.0``.

    Args:
        encoded: `[*]` (any shape, 0-d included) float32 / float16 / bfloat16 encoded weight, on a
            CUDA device (Triton kernel) or the CPU (Triton interpreter when ``TRITON_INTERPRET=1``,
            else the PyTorch reference). Non-contiguous inputs are made contiguous first (one
            copy); the result is always contiguous.
        level: ``t``, an int in ``1..2**k`` (``1..T+1`` with ``num_levels``), or ``"dense"``
            (needs ``num_levels``).
        code_bits: ``k``, in ``1..MAX_CODE_BITS[encoded.dtype]`` (8 / 4 / 3).
        num_levels: ``T`` (optional): range check and the dense level ``T+1``.

    Returns:
        `[*]` tensor, same shape, dtype and device as ``encoded``. The dense level (``T+1``, or
        ``2**k`` without ``num_levels``) returns ``encoded`` itself (no decoding, no copy); every
        other level a new contiguous tensor.

    Raises:
        ELSAError: not a tensor, unsupported dtype, ``code_bits`` out of range for the dtype,
            ``level`` not an int / out of range.

    Under ``torch.compile`` it traces to the op ``torch.ops.elsa_codec.decode_level``; that op is
    also used in eager mode when autograd must record the call (gradient: ``grad`` where kept, 0
    elsewhere).
    """
    t, dense = check_codec_args(encoded, level, code_bits, num_levels)
    if dense:
        return encoded
    if torch.compiler.is_compiling() or needs_autograd(encoded):
        return _decode_level_op(encoded, t, code_bits)
    if kernels_available(encoded.device):
        return _launch_decode_level(encoded, t, code_bits)
    return decode_level_reference(encoded, t, code_bits).contiguous()


def decode_counters(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The counters ``N = code + 1`` of every weight (the first level containing it; ELSA's N(T)).

    docs/DESIGN.md, "Terms"; ELSA, arXiv 2312.06872, section 2.2.

    Args:
        encoded: `[*]` float32 / float16 / bfloat16 encoded tensor, any shape; non-contiguous
            inputs are made contiguous first. CUDA (Triton), or CPU (interpreter or reference).
        code_bits: ``k``, in ``1..MAX_CODE_BITS[encoded.dtype]``.

    Returns:
        `[*]` uint8 tensor of the same shape (contiguous), values ``1..2**k``; int16 when
        ``k = 8`` (float32 with up to 255 levels: the counter 256 does not fit a byte), exactly as
        :func:`elsa_codec.format.bits.decode_counters`.

    Raises:
        ELSAError: not a tensor, unsupported dtype, ``code_bits`` out of range for the dtype.
    """
    check_tensor(encoded, "encoded")
    check_code_bits(encoded.dtype, code_bits, name="encoded")
    if torch.compiler.is_compiling():
        out = _decode_counters_op(encoded, code_bits)
    elif kernels_available(encoded.device):
        out = _launch_decode_counters(encoded, code_bits)
    else:
        return decode_counters_reference(encoded, code_bits)
    if code_bits == 8:  # the kernel's uint8 counter 256 wrapped to 0
        out = out.to(torch.int16).masked_fill_(out == 0, 256)
    return out


# --------------------------------------------------------------------------------------------
# References (pure PyTorch; the CPU path and the tests' oracle)
# --------------------------------------------------------------------------------------------
def decode_level_reference(encoded: torch.Tensor, level, code_bits: int, num_levels: int | None = None) -> torch.Tensor:
    """Pure-PyTorch :func:`decode_level` (:func:`elsa_codec.format.bits.extract_level`).

    Args/returns as :func:`decode_level` (`[*]` in, `[*]` out, same dtype), except that the result
    keeps ``encoded``'s layout. The dense level returns ``encoded`` itself.
    """
    t, dense = check_codec_args(encoded, level, code_bits, num_levels)
    if dense:
        return encoded
    return _bits_extract_level(encoded, t, code_bits)


def decode_counters_reference(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Pure-PyTorch :func:`decode_counters` (:func:`elsa_codec.format.bits.decode_counters`): `[*]` uint8
    (int16 for ``k = 8``)."""
    check_tensor(encoded, "encoded")
    return _bits_decode_counters(encoded, code_bits)
