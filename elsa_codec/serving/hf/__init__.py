"""Hugging Face integration: an ELSA checkpoint is a transformers model directory.

- :class:`~.config.ELSAQuantizationConfig` (``quant_method: "elsa"``) and
  :class:`~.quantizer.ELSAHfQuantizer`, registered with transformers' public API
  (``register_quantization_config`` / ``register_quantizer``) by :func:`register`;
  ``import elsa_codec`` calls it once transformers' quantizers are imported (a post-import hook:
  importing elsa_codec alone never imports transformers). ``from_pretrained`` of an ELSA
  directory then returns ELSA layers.
- :func:`~.convert.convert_pretrained` (``elsa convert``), :func:`~.pretrained.save_pretrained`,
  :func:`~.pretrained.pretrained_config` (the level to serve at load),
  :func:`~.pretrained.dequantize_`.

Importing this package imports transformers. ELSA: Halvachi et al., arXiv 2312.06872.
"""
from __future__ import annotations

from .config import QUANT_METHOD, ELSAQuantizationConfig
from .convert import convert_pretrained
from .pretrained import dequantize_, pretrained_config, save_pretrained
from .quantizer import ELSAHfQuantizer

__all__ = ["QUANT_METHOD", "ELSAQuantizationConfig", "ELSAHfQuantizer", "convert_pretrained", "dequantize_", "pretrained_config",
           "register", "save_pretrained"]


def register() -> None:
    """Register ``quant_method: "elsa"`` with transformers (idempotent; public API only).

    Example::

        >>> from elsa_codec.serving.hf import register
        >>> register()
    """
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ELSAQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ELSAHfQuantizer)


register()
