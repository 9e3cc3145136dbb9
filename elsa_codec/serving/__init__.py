"""The serving layer: ELSA modules that hold ONE encoded weight and serve any level.

- :mod:`.base`: :class:`ELSAModule`, the level state and the paths (dense, reference, sparse-cpu,
  triton, semi-structured);
- :mod:`.linear`, :mod:`.conv`, :mod:`.embedding`, :mod:`.transformers_conv1d`: the layers;
- :mod:`.batch_norm`: per-level batch-norm statistics;
- :mod:`.swap`: :func:`swap_`, :func:`load`, :func:`set_level`, :func:`levels`, :func:`set_sparsity`.
"""
