"""Triton kernels for serving ELSA levels (docs/DESIGN.md, "Serving"; arXiv 2312.06872, section 2.2).

One op per module, each with its pure-PyTorch reference beside it:

- :mod:`.decode`: :func:`decode_level`, :func:`decode_counters` (torch ops
  ``elsa_codec::decode_level``, ``elsa_codec::decode_counters``).
- :mod:`.linear`: :func:`elsa_linear`, the fused level GEMM (torch op ``elsa_codec::linear``).
- :mod:`.tile_table`: :func:`tile_table`, the per-64x64-tile minimum-code table used to skip empty
  tiles.
- :mod:`.semi_structured`: :func:`to_semi_structured` (2:4 via ``torch.sparse``, guarded).
- :mod:`.packed`: :func:`pack_level`, the packed level (kept values, a bitmap per tile) and
  :func:`unpack_level_reference`; :mod:`.packed_unpack`: :func:`unpack_level` (torch op
  ``elsa_codec::unpack_level``); :mod:`.packed_linear`: :func:`packed_linear`, the packed level
  GEMM for small M (torch op ``elsa_codec::packed_linear``).
- :mod:`.route`: :func:`cuda_route`, which path serves a level at a given M (roofline model).

Importing this package imports Triton but never initialises CUDA. The kernels run on CUDA tensors,
or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before this package is
imported); elsewhere the public functions fall back to the references (see
:func:`kernels_available`).
"""
from ._common import INTERPRET, kernels_available
from .decode import decode_counters, decode_counters_reference, decode_level, decode_level_reference
from .linear import elsa_linear, elsa_linear_reference
from .packed import PackedLevel, pack_level, packed_nbytes, unpack_level_reference
from .packed_linear import PACKED_MAX_M, default_tile_rows, packed_linear, packed_linear_reference
from .packed_unpack import unpack_level
from .route import GpuModel, cuda_route
from .semi_structured import semi_structured_supported, to_semi_structured
from .tile_table import TILE_K, TILE_N, tile_density, tile_table, tile_table_reference, tile_table_shape

__all__ = [
    "INTERPRET",
    "TILE_N",
    "TILE_K",
    "kernels_available",
    "decode_level",
    "decode_counters",
    "elsa_linear",
    "tile_table",
    "tile_table_shape",
    "tile_density",
    "to_semi_structured",
    "semi_structured_supported",
    "decode_level_reference",
    "decode_counters_reference",
    "elsa_linear_reference",
    "tile_table_reference",
    "PackedLevel",
    "PACKED_MAX_M",
    "pack_level",
    "packed_nbytes",
    "unpack_level",
    "unpack_level_reference",
    "packed_linear",
    "packed_linear_reference",
    "default_tile_rows",
    "cuda_route",
    "GpuModel",
]
