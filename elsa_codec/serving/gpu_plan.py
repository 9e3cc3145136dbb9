"""The packed GPU level of an :class:`~elsa_codec.serving.linear.ELSALinear` (issue 33; docs/DESIGN.md, "Serving").

On CUDA (or under the Triton interpreter with a forced ``"triton"`` backend) a sparse level is
served by the fused decode-in-GEMM, which reads every byte of the encoded weight. At a level
switch, :func:`refresh_gpu_packed` packs the level for the packed GEMM
(:func:`elsa_codec.kernels.triton.pack_level`: kept values + a bitmap per tile, kept beside the
weight, its bytes in ``extra_repr``) when the backend is ``"triton-packed"``, or when it is
``"auto"`` and the router (:func:`elsa_codec.kernels.triton.cuda_route`: bytes and the expansion's
instructions) predicts the packed kernel faster for decode-sized calls (``M <= 32``).
``"triton"`` forced keeps the fused kernel only (no memory beside the encoded weight).
:func:`gpu_packed_for` then gives the packed level to calls of at most 32 rows that need no
gradient; every other call runs the fused kernel.
"""
from __future__ import annotations

import torch

__all__ = ["refresh_gpu_packed", "gpu_packed_for"]


def _key(module) -> tuple:
    w = module.weight
    return (module.level, w.device, w.dtype, w.data_ptr(), w._version, module.code_bits)


def refresh_gpu_packed(module, kernels) -> None:
    """At a level switch: pack the current level for the packed GEMM when the backend is
    ``"triton-packed"`` or the auto router picks it for ``M = 1``; else drop any packed level
    (``module._gpu_packed``)."""
    t, w = module.level, module.weight
    request = module.backend_request
    if request not in ("auto", "triton-packed") or t > module.num_levels or w.dim() != 2:
        module._gpu_packed = None
        return
    key = _key(module)
    if module._gpu_packed is not None and module._gpu_packed[0] == key:
        return
    n, k = w.shape
    density = 1.0 - float(module.sparsities[t - 1])
    fused = kernels.tile_density(module.tile_table(), t)
    if request == "auto" and kernels.cuda_route(n, k, 1, density, w.dtype, fused_fraction=fused) != "packed":
        module._gpu_packed = None
        return
    with torch.no_grad():
        packed = kernels.pack_level(w.detach(), t, module.code_bits, tile_n=kernels.default_tile_rows(w.dtype))
    module._gpu_packed = (key, packed)


def gpu_packed_for(module, x: torch.Tensor, kernels):
    """The packed level for this call (``x`` of at most ``PACKED_MAX_M`` rows, no gradient
    wanted, the level packed for the current weight), else None (the fused kernel)."""
    entry = module._gpu_packed
    if entry is None or entry[0] != _key(module):
        return None
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if rows > kernels.PACKED_MAX_M:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad
                                    or (module.bias is not None and module.bias.requires_grad)):
        return None
    return entry[1]
