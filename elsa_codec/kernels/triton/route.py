"""Which CUDA path serves a level at a given M: the roofline model (weight bytes at peak bandwidth).

docs/DESIGN.md, "Serving"; bench/GPU_NOTES.md holds the predictions this encodes, to be confirmed
or refuted by bench/gpu_check.sh on an H100 / H200:

- the dense level: ``"cublas"`` (``F.linear`` on the stored tensor);
- ``M <= PACKED_MAX_M`` (decode), no gradient wanted: ``"packed"`` when the packed level
  (:mod:`.packed`: ``density * element_size + 1/8`` bytes per weight) reads at most
  :data:`PACKED_MARGIN` of what the fused kernel reads (every byte of the encoded weight, or only
  the 64x64 tiles the level touches: ``fused_fraction`` from :func:`.tile_table.tile_density`);
- otherwise ``"fused"``: the decode-in-GEMM (:mod:`.linear`), the zero-extra-memory path, with
  tile skipping for block levels. The 2:4 semi-structured backend is a separate, explicit choice
  (``module.backend = "semi-structured"``).
"""
from __future__ import annotations

import torch

from .packed import TILE_K_PACKED, packed_nbytes
from .packed_linear import PACKED_MAX_M, default_tile_rows

__all__ = ["cuda_route", "route_bytes", "PACKED_MARGIN"]

#: The packed path is taken when it reads at most this fraction of the fused path's weight bytes
#: (the expansion's popcounts and gathers cost instructions the fused kernel does not run;
#: a prediction until a GPU measures, bench/GPU_NOTES.md).
PACKED_MARGIN = 0.8


def route_bytes(n: int, k: int, density: float, dtype: torch.dtype, *, fused_fraction: float = 1.0,
                tile_n: int | None = None) -> dict:
    """Weight bytes each path reads for one ``[n, k]`` product at a level of ``density``:
    ``{"cublas": dense bytes, "fused": ..., "packed": ...}``."""
    e = torch.empty((), dtype=dtype).element_size()
    dense = n * k * e
    tiles = -(-n // 64) * -(-k // TILE_K_PACKED)
    return {"cublas": dense, "fused": fused_fraction * dense + tiles,
            "packed": packed_nbytes(n, k, density, e, tile_n or default_tile_rows(dtype))}


def cuda_route(n: int, k: int, m: int, density: float, dtype: torch.dtype, *, fused_fraction: float = 1.0,
               requires_grad: bool = False, allow_packed: bool = True) -> str:
    """``"cublas"``, ``"packed"`` or ``"fused"`` for ``m`` rows times a level of ``density`` of an
    ``[n, k]`` weight (module docstring for the rule).

    Example:
        >>> import torch
        >>> cuda_route(4096, 4096, 1, 0.1, torch.bfloat16), cuda_route(4096, 4096, 128, 0.1, torch.bfloat16)
        ('packed', 'fused')
        >>> cuda_route(4096, 4096, 1, 0.9, torch.bfloat16), cuda_route(4096, 4096, 1, 1.0, torch.bfloat16)
        ('fused', 'cublas')
    """
    if density >= 1.0:
        return "cublas"
    if requires_grad or not allow_packed or m > PACKED_MAX_M:
        return "fused"
    b = route_bytes(n, k, density, dtype, fused_fraction=fused_fraction)
    return "packed" if b["packed"] <= PACKED_MARGIN * b["fused"] else "fused"
