"""``acc += x @ w`` with float32 accumulation and the output cast, shared by the GEMM kernels (private)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_acc(acc, x, w, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """``tl.dot(x, w, acc)``; ``UPCAST``: multiply in float32 (the Triton interpreter has no
    bfloat16 arithmetic); ``IEEE``: ``input_precision="ieee"`` (float32 without TF32, torch's default)."""
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if IEEE:
        acc = tl.dot(x, w, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def cast_out(acc, out_ty: tl.constexpr, ROUND_BF16: tl.constexpr):
    """The float32 accumulator as ``out_ty``; ``ROUND_BF16``: round to nearest even on the bit
    pattern (the Triton interpreter truncates float32 -> bfloat16)."""
    if ROUND_BF16:
        ub = acc.to(tl.int32, bitcast=True)
        ub = ub + 0x7FFF + ((ub >> 16) & 1)
        out = (ub >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = acc.to(out_ty)
    return out
