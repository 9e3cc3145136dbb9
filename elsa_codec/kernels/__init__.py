"""The kernels: each op with its pure-PyTorch reference beside it.

- :mod:`.triton`: the fused level GEMM, decode, the tile table, the semi-structured (2:4) level
  (importing it imports Triton; nothing else here does);
- :mod:`.cpu`: the packed CPU levels (csr, bitmask, bsr) and their C++ kernels
  (``elsa_cpu.cpp``, built on first use by :mod:`elsa_codec.native`).

Importing this package needs no Triton.
"""
