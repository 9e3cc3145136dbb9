"""Which CUDA path serves a level at a given M: a roofline model of bytes and instructions.

docs/DESIGN.md, "Serving"; bench/GPU_NOTES.md, "Packed levels", holds the predictions this model
encodes, to be confirmed or refuted by bench/gpu_check.sh on an H100 / H200 (no GPU has run it):

- the dense level: ``"cublas"`` (``F.linear`` on the stored tensor);
- ``M <= PACKED_MAX_M`` (decode), no gradient wanted: ``"packed"`` when the packed kernel's
  predicted time is at most :data:`PACKED_MARGIN` of the fused kernel's. The packed time is the
  larger of its bytes (:mod:`.packed`: ``density * element_size + 1/8`` per weight) at the copy
  bandwidth and its tile expansion, which issues the same integer work at every position whatever
  the density (:attr:`GpuModel.expand_clocks_per_tile`, counted in its sm_90a SASS);
- otherwise ``"fused"``: the decode-in-GEMM (:mod:`.linear`), the zero-extra-memory path, with
  tile skipping for block levels (``fused_fraction``: the 64x64 tiles it reads). The 2:4
  semi-structured backend is a separate, explicit choice (``module.backend = "semi-structured"``).

With the H200 model below the expansion (about 7.8 us for 4096 x 4096) is never below the fused
kernel's byte floor (7.8 us), so the router picks the fused kernel at every level: the packed
path runs when forced (``module.backend = "triton-packed"``, or :func:`.packed_linear` itself) until
a GPU measures it and the model's constants are replaced by the measurement.
"""
from __future__ import annotations

import dataclasses

import torch

from .packed import TILE_K_PACKED, packed_nbytes
from .packed_linear import PACKED_MAX_M, default_tile_rows

__all__ = ["GpuModel", "H200", "cuda_route", "route_bytes", "route_times", "PACKED_MARGIN"]

#: The packed path is taken when its predicted time is at most this fraction of the fused path's.
PACKED_MARGIN = 0.8


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """What the router assumes of a GPU.

    Attributes:
        bandwidth: copy bandwidth, bytes/s.
        sms: streaming multiprocessors.
        clock_hz: SM clock, Hz.
        expand_clocks_per_tile: clocks one SM spends expanding one 64 x 64 packed tile (the
            integer ALU bound of the kernel's inner loop: about 245 integer warp-instructions x 4
            warps at 16 lanes per SM sub-partition, sm_90a SASS of ``packed_linear``, triton 3.9;
            bench/GPU_NOTES.md). A prediction until a GPU measures.
    """

    bandwidth: float
    sms: int
    clock_hz: float
    expand_clocks_per_tile: float = 500.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"GpuModel.{f.name} must be a positive number, got {v!r}")


#: H200 (the model's default): 4.3 TB/s, 132 SMs, 1.98 GHz.
H200 = GpuModel(bandwidth=4.3e12, sms=132, clock_hz=1.98e9)


def route_bytes(n: int, k: int, density: float, dtype: torch.dtype, *, fused_fraction: float = 1.0,
                tile_n: int | None = None) -> dict:
    """Weight bytes each path reads for one ``[n, k]`` product at a level of ``density``:
    ``{"cublas": dense bytes, "fused": ..., "packed": ...}``."""
    e = torch.empty((), dtype=dtype).element_size()
    dense = n * k * e
    tiles = -(-n // 64) * -(-k // TILE_K_PACKED)
    return {"cublas": dense, "fused": fused_fraction * dense + tiles,
            "packed": packed_nbytes(n, k, density, e, tile_n or default_tile_rows(dtype))}


def route_times(n: int, k: int, density: float, dtype: torch.dtype, *, fused_fraction: float = 1.0,
                model: GpuModel = H200) -> dict:
    """Predicted seconds of each path at decode sizes (weight-bound): ``{"cublas", "fused",
    "packed", "packed_bytes_s", "packed_expand_s"}``."""
    b = route_bytes(n, k, density, dtype, fused_fraction=fused_fraction)
    n_pad = -(-n // 64) * 64
    tiles = (n_pad // 64) * -(-k // TILE_K_PACKED)  # 64 x 64 tiles
    expand = tiles * model.expand_clocks_per_tile / (model.sms * model.clock_hz)
    packed_bytes = b["packed"] / model.bandwidth
    return {"cublas": b["cublas"] / model.bandwidth, "fused": b["fused"] / model.bandwidth,
            "packed": max(packed_bytes, expand), "packed_bytes_s": packed_bytes, "packed_expand_s": expand}


def cuda_route(n: int, k: int, m: int, density: float, dtype: torch.dtype, *, fused_fraction: float = 1.0,
               requires_grad: bool = False, allow_packed: bool = True, model: GpuModel = H200) -> str:
    """``"cublas"``, ``"packed"`` or ``"fused"`` for ``m`` rows times a level of ``density`` of an
    ``[n, k]`` weight (module docstring for the rule).

    Example:
        >>> import torch
        >>> cuda_route(4096, 4096, 1, 0.1, torch.bfloat16), cuda_route(4096, 4096, 1, 1.0, torch.bfloat16)
        ('fused', 'cublas')
        >>> fast = GpuModel(4.3e12, 132, 1.98e9, expand_clocks_per_tile=50)  # if a GPU measured this
        >>> cuda_route(4096, 4096, 1, 0.1, torch.bfloat16, model=fast), cuda_route(4096, 4096, 64, 0.1, torch.bfloat16)
        ('packed', 'fused')
    """
    if density >= 1.0:
        return "cublas"
    if requires_grad or not allow_packed or m > PACKED_MAX_M:
        return "fused"
    t = route_times(n, k, density, dtype, fused_fraction=fused_fraction, model=model)
    return "packed" if t["packed"] <= PACKED_MARGIN * t["fused"] else "fused"
