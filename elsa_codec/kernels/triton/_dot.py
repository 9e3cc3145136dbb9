"""``acc += x @ w`` with float32 accumulation, shared by the GEMM kernels (private)."""
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
