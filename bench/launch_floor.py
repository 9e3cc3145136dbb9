"""The least time the GPU grid's timer reports for one kernel: an empty Triton launch.

``bench/gpu_grid.py`` times this kernel, which is one ``tl.store`` of an int32 per program, with
one program per SM. It uses the same timer as its other rows, with CUDA graphs and without, and
writes the result as the ``launch-floor`` rows of ``grid.csv``. A fused level GEMM cannot be
measured below this figure, however few tiles it reads. The block:64x64 target at M = 1 (docs/DESIGN.md,
"Performance targets": ``<= 1.3 x density x dense``) asks for about 1 us at density 0.1 on a
4096x4096 weight, so this row tells whether a miss there is the kernel's fault or the launch's
(bench/GPU_NOTES.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _one_store_kernel(out_ptr):
    """Each program writes 0 to ``out_ptr[program_id]``: `[programs]` int32; nothing is read."""
    tl.store(out_ptr + tl.program_id(0), 0)


def one_store(out: torch.Tensor) -> torch.Tensor:
    """Launch :func:`_one_store_kernel` with ``out.numel()`` programs. ``out``: `[programs]` int32,
    contiguous, overwritten with zeros (in place) and returned.

    Raises:
        ValueError: ``out`` is not a contiguous 1-D int32 tensor with at least one element.
    """
    if out.dtype != torch.int32 or out.dim() != 1 or not out.is_contiguous() or out.numel() < 1:
        raise ValueError(f"one_store: out must be a contiguous 1-D int32 tensor with >= 1 element, got "
                         f"{tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()})")
    _one_store_kernel[(out.numel(),)](out)
    return out
