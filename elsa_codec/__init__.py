"""elsa-codec: one dense weight file that serves several nested sparse networks.

Implements ELSA (Halvachi, Peste, Alistarh, Lampert, arXiv 2312.06872): the level each weight
belongs to is stored in the low mantissa bits of the weight itself. Importing this package never
needs Triton nor initialises CUDA, and loads only what serving needs (format, one-shot, serving,
the kernels' Python side); the training names below load their modules on first use.

The layers, lowest first (docs/ARCHITECTURE.md): :mod:`~elsa_codec.format` (the code rule, the
metadata document, the file), :mod:`~elsa_codec.oneshot` (magnitude counters),
:mod:`~elsa_codec.kernels`, :mod:`~elsa_codec.serving` (the ELSA layers, swap, load, levels),
:mod:`~elsa_codec.training` (ELSA training, sparsifiers, integrations), then
:mod:`~elsa_codec.cli` and :mod:`~elsa_codec.examples`.
"""
from __future__ import annotations

import importlib

import wrapt

from .errors import ELSAError, ELSAFormatError, ELSATypeError
from .format.bits import (
    MAX_CODE_BITS,
    decode_codes,
    decode_counters,
    default_code_bits,
    encode_tensor,
    extract_level,
    level_mask,
    sqnr_db,
    ulp_error,
)
from .format.document import BN_PREFIX, ELSAMeta
from .format.encode import Counters, ELSAStateDict, counters_from_masks, encode, extract
from .format.file import load_counters, load_file, read_meta, save_counters, save_file
from .format.selection import SELECT_POLICIES, select_weights
from .format.structure import parse_structure
from .kernels.cpu.plans import clear_plans, refresh_plans, stored_plans
from .oneshot.activation import activation_counters
from .oneshot.magnitude import magnitude_counters
from .oneshot.masks import magnitude_mask
from .oneshot.stream import encode_file
from .serving.batch_norm import LevelBatchNorm1d, LevelBatchNorm2d, LevelBatchNorm3d
from .serving.chooser import LevelTable, choose_level
from .serving.conv import ELSAConv1d, ELSAConv2d
from .serving.cpu_plan import set_packed_cache_bytes
from .serving.embedding import ELSAEmbedding
from .serving.linear import ELSALinear
from .serving.swap import elsa_modules, elsa_state_dict, levels, load, set_level, set_resident, set_sparsity, swap_

__version__ = "0.1.0"

#: Names whose modules load on first use: training, sparsifiers, and the transformers Conv1D layer
#: (which imports transformers). ``import elsa_codec`` for serving never imports them.
_LAZY = {
    "ELSAConfig": "training.config",
    "DistillConfig": "training.distill",
    "LevelEmbedder": "training.embedder",
    "ELSAResult": "training.result",
    "Phase": "training.phases",
    "embed_levels": "training.run",
    "prune_gmp": "training.run",
    "recalibrate_bn": "training.bn",
    "GMPSchedule": "training.schedule",
    "gmp_sparsity": "training.schedule",
    "erk_densities": "training.schedule",
    "Sparsifier": "training.sparsifiers.base",
    "MagnitudeSparsifier": "training.sparsifiers.base",
    "EarlyBirdSparsifier": "training.sparsifiers",
    "L0Sparsifier": "training.sparsifiers",
    "LotteryTicketSparsifier": "training.sparsifiers",
    "PruningPipeline": "training.sparsifiers",
    "RandomSparsifier": "training.sparsifiers",
    "VariationalDropoutSparsifier": "training.sparsifiers",
    "label_smoothing": "training.sparsifiers",
    "sparsity_penalty": "training.sparsifiers",
    "zero_init_": "training.sparsifiers",
    "ELSATransformersConv1D": "serving.transformers_conv1d",
    "ELSAQuantizationConfig": "serving.hf",
    "convert_pretrained": "serving.hf",
    "pretrained_config": "serving.hf",
    "save_pretrained": "serving.hf",
}

#: Names removed in 0.2 (CHANGELOG.md), each with its replacement.
_REMOVED = {
    "ELSAConv1D": "elsa_codec.ELSATransformersConv1D (the transformers Conv1D layer; ELSAConv1d is nn.Conv1d)",
}

__all__ = [
    # errors
    "ELSAError", "ELSAFormatError", "ELSATypeError",
    # the code rule (format.bits)
    "MAX_CODE_BITS", "decode_codes", "decode_counters", "default_code_bits", "encode_tensor", "extract_level",
    "level_mask", "sqnr_db", "ulp_error",
    # encode / extract / the file (format)
    "BN_PREFIX", "Counters", "ELSAMeta", "ELSAStateDict", "counters_from_masks", "encode", "extract",
    "load_counters", "load_file", "read_meta", "save_counters", "save_file", "SELECT_POLICIES",
    "select_weights", "parse_structure",
    # one-shot
    "activation_counters", "magnitude_counters", "magnitude_mask", "encode_file",
    # serving
    "ELSAEmbedding", "ELSAConv1d", "ELSAConv2d", "ELSALinear", "LevelBatchNorm1d", "LevelBatchNorm2d",
    "LevelBatchNorm3d", "LevelTable", "choose_level", "clear_plans", "elsa_modules", "elsa_state_dict", "levels", "load", "set_level", "set_packed_cache_bytes", "set_resident", "set_sparsity", "stored_plans", "refresh_plans", "swap_",
    *_LAZY,
]


def _register_transformers(_module) -> None:
    """Post-import hook of ``transformers.quantizers.auto``: register ``quant_method: "elsa"``
    (:func:`elsa_codec.serving.hf.register`), so ``from_pretrained`` of an ELSA directory returns
    ELSA layers whichever of the two packages is imported first. While ``elsa_codec.serving.hf``
    itself is being imported (it imports transformers), its own last line registers instead."""
    import sys

    hf = sys.modules.get(f"{__name__}.serving.hf")
    if hf is not None and not hasattr(hf, "register"):
        return
    from .serving.hf import register

    register()


wrapt.register_post_import_hook(_register_transformers, "transformers.quantizers.auto")


def __getattr__(name: str):
    """Load a training / sparsifier / transformers name on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _REMOVED:
        raise AttributeError(f"elsa_codec.{name} was removed in 0.2: use {_REMOVED[name]}")
    raise AttributeError(f"module 'elsa_codec' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
