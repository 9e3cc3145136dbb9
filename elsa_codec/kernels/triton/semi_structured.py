"""Optional: a decoded 2:4 level as a ``torch.sparse`` semi-structured tensor (sparse tensor cores).

docs/DESIGN.md, "Serving": a 2:4 level may be materialised with ``torch.sparse.to_sparse_semi_structured``
where the device supports it. This is a guarded wrapper, not a Triton kernel: decode the level
first (:func:`elsa_codec.kernels.triton.decode_level`, ELSA arXiv 2312.06872 section 2.2), then convert.
"""
from __future__ import annotations

import torch

from elsa_codec.errors import ELSAError

__all__ = ["semi_structured_supported", "to_semi_structured"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def semi_structured_supported(device=None) -> bool:
    """Whether ``torch.sparse.to_sparse_semi_structured`` can run on ``device`` (CUDA, compute
    capability 8.0 or newer, and this PyTorch build has it). Initialises CUDA only when asked about
    a CUDA device that exists."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 8


def to_semi_structured(decoded_weight: torch.Tensor):
    """Convert a decoded 2:4 level weight to a ``SparseSemiStructuredTensor``.

    Args:
        decoded_weight: `[out_features, in_features]` float16 / bfloat16 / float32 CUDA tensor in
            which every group of 4 consecutive weights along ``in_features`` holds at most 2
            non-zeros (e.g. ``decode_level(encoded, t, k)`` for a level with structure ``2:4``).
            PyTorch also requires minimum sizes (multiples of 64 / 128 depending on the dtype and
            backend); its error is re-raised as ELSAError.

    Returns:
        ``torch.sparse.SparseSemiStructuredTensor`` usable as ``F.linear(x, w_sparse)``'s weight.

    Raises:
        ELSAError: not a 2-D tensor, unsupported dtype, not 2:4 sparse (count of bad groups given),
            the device has no semi-structured sparsity support (CPU, compute capability < 8.0), or
            PyTorch rejects the shape.
    """
    if not isinstance(decoded_weight, torch.Tensor):
        raise ELSAError(f"decoded_weight: expected a torch.Tensor, got {type(decoded_weight).__name__}")
    if decoded_weight.dim() != 2:
        raise ELSAError(f"decoded_weight: expected a 2-D weight, got shape {tuple(decoded_weight.shape)}")
    if decoded_weight.dtype not in _DTYPES:
        raise ELSAError(f"decoded_weight: dtype {decoded_weight.dtype} not supported; expected float16, bfloat16 or float32")
    n, k = decoded_weight.shape
    if k % 4:
        raise ELSAError(f"decoded_weight: in_features={k} is not a multiple of 4 (shape {(n, k)}), cannot be 2:4")
    if not semi_structured_supported(decoded_weight.device):
        raise ELSAError(
            f"decoded_weight: semi-structured (2:4) sparsity needs a CUDA GPU of compute capability >= 8.0 "
            f"and torch.sparse.to_sparse_semi_structured; tensor is on {decoded_weight.device}"
        )
    groups = (decoded_weight.reshape(n, k // 4, 4) != 0).sum(-1)
    bad = int((groups > 2).sum())
    if bad:
        raise ELSAError(
            f"decoded_weight: {bad} of {n * (k // 4)} groups of 4 along in_features hold more than 2 non-zeros; not 2:4"
        )
    try:
        return torch.sparse.to_sparse_semi_structured(decoded_weight.contiguous())
    except (RuntimeError, ValueError) as e:  # shape limits, backend missing
        raise ELSAError(f"decoded_weight: to_sparse_semi_structured rejected shape {(n, k)} {decoded_weight.dtype}: {e}") from e
