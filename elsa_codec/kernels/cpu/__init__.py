"""CPU kernels: a sparse level packed at ``set_level`` (:mod:`.packed`) and served by the C++
kernels in ``elsa_cpu.cpp`` (AVX2 / AVX-512, built on first use by :mod:`elsa_codec.native`)."""
