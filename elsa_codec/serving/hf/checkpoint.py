"""The files of an ELSA Hugging Face directory: where the weights are, their document, the layout.

A directory written by ``elsa convert`` or :func:`elsa_codec.save_pretrained` holds
``config.json`` (with ``quantization_config``, :mod:`.config`), the weights as
``model.safetensors``, or as shards ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json`` when they exceed the shard size (default 5 GB, as
transformers v4), each an ELSA file (docs/FORMAT.md), and the tokenizer and generation files.
"""
from __future__ import annotations

import os
import re

from ...checks import check_shard_size
from ...errors import ELSAError, ELSAFormatError
from ...format.document import ELSAMeta
from ...format.file import _shards, read_meta

__all__ = ["WEIGHTS_NAME", "INDEX_NAME", "DEFAULT_SHARD_SIZE", "weights_path", "elsa_weights", "layout_path", "stale_weight_files",
           "architecture_class", "check_out_dir"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Bytes a shard may hold before the weights are split (``max_shard_size`` default).
DEFAULT_SHARD_SIZE = "5GB"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}(?:-[0-9a-f]{16})?\.safetensors")


def weights_path(folder: str) -> str | None:
    """The weights of a model directory: its index if it has one, else ``model.safetensors``; None if neither."""
    for name in (INDEX_NAME, WEIGHTS_NAME):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def elsa_weights(folder: str, *, what: str = "from_pretrained") -> tuple[str, ELSAMeta]:
    """``(path, document)`` of the ELSA weights in ``folder``, every shard present; no tensor read.

    Raises:
        ELSAFormatError: no safetensors weights; weights that are not ELSA-encoded (a plain
            checkpoint whose ``config.json`` claims ``quant_method: "elsa"``); a missing shard; a
            corrupted header, index or document.
    """
    path = weights_path(folder)
    if path is None:
        raise ELSAFormatError(f"{what}: {folder} holds neither {INDEX_NAME} nor {WEIGHTS_NAME} (an ELSA model directory "
                              "stores its weights as safetensors; write it with `elsa convert` or elsa_codec.save_pretrained)")
    try:
        meta = read_meta(path)
    except ELSAFormatError as e:
        if "not an ELSA checkpoint" in str(e):
            raise ELSAFormatError(
                f"{what}: {folder}/config.json says quant_method 'elsa' but {os.path.basename(path)} holds plain weights "
                "(no ELSA document): encode them with `elsa convert`, or remove quantization_config from config.json") from None
        raise
    shards, _ = _shards(path)
    for shard, _names in shards:
        if not os.path.isfile(shard):
            raise ELSAFormatError(f"{what}: shard {os.path.basename(shard)} listed in {os.path.basename(path)} is missing from {folder}")
    return path, meta


def layout_path(folder: str, total_bytes: int, max_shard_size=None) -> tuple[str, int | None]:
    """``(path, shard limit or None)`` to write ``total_bytes`` of weights to: one
    ``model.safetensors`` when they fit in ``max_shard_size`` (default :data:`DEFAULT_SHARD_SIZE`),
    else the index and its shards (transformers' rule, so a model written twice gets one layout)."""
    limit = check_shard_size(DEFAULT_SHARD_SIZE if max_shard_size is None else max_shard_size)
    if total_bytes <= limit:
        return os.path.join(folder, WEIGHTS_NAME), None
    return os.path.join(folder, INDEX_NAME), limit


def stale_weight_files(folder: str, keep: set) -> list:
    """Weight files of an earlier checkpoint in ``folder`` (``model.safetensors``, the index, its
    shards) that the new one (the names in ``keep``) does not use."""
    out = []
    for n in sorted(os.listdir(folder)):
        if n in keep:
            continue
        if n in (WEIGHTS_NAME, INDEX_NAME) or _SHARD.fullmatch(n):
            out.append(os.path.join(folder, n))
    return out


def architecture_class(config, what: str):
    """The transformers model class ``config.architectures`` names (whose parameter names are the
    checkpoint's).

    Raises:
        ELSAError: no architecture recorded, or one transformers does not have.
    """
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        raise ELSAError(f"{what}: config.json names no transformers architecture ({arch!r}); save the model with "
                        "save_pretrained, which records it")
    return cls


def check_out_dir(out_dir, what: str, *, source: str | None = None) -> str:
    """``out_dir`` as a path: a directory or nothing yet (created), never ``source``.

    Raises:
        ELSAError: not a path; an existing non-directory; the source directory itself.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ELSAError(f"{what}: the output directory must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ELSAError(f"{what}: {out_dir} exists and is not a directory")
    if source is not None and os.path.isdir(out_dir) and os.path.samefile(out_dir, source):
        raise ELSAError(f"{what}: the output directory is the input directory {source}; write to a new directory")
    return out_dir
