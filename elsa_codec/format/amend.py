"""Give an ELSA checkpoint on disk a new metadata document with the same tensors:
:func:`write_quality` (the quality report ``elsa convert`` measures once the file exists).

The tensors' bytes are copied as they are (``copy_file_range`` where the kernel has it), their
CRC-32s kept; the header (document, header checksum) is written anew, crash-safely: a single file
by an atomic rename, shards and index as :func:`elsa_codec.save_file` writes them.
"""
from __future__ import annotations

import json

from ..errors import ELSAError
from .document import ELSAMeta, _json_quality
from .file import _open_safetensors, _shards, read_meta
from .stream import _write_file, _write_sharded

__all__ = ["write_quality"]


def write_quality(path: str, quality: dict | None, *, max_shard_size: int | None = None) -> ELSAMeta:
    """Replace the quality report of the ELSA checkpoint ``path`` (``*.safetensors`` or
    ``*.safetensors.index.json``); the tensors stay byte for byte.

    Args:
        path: the checkpoint (read and checked as :func:`elsa_codec.read_meta` does).
        quality: the report (docs/FORMAT.md, "quality"; version 3), or None to remove it.
        max_shard_size: for shards, the bytes per shard of the new grouping (default 5 GB).

    Returns:
        The new :class:`~elsa_codec.format.document.ELSAMeta`.

    Raises:
        ELSAError: a report that does not fit the document (levels ``1..T+1``, cosine in
            [-1, 1], perplexity > 0). ELSAFormatError: as :func:`elsa_codec.read_meta`.
    """
    meta = read_meta(path)
    if quality is not None:
        try:
            _json_quality(json.loads(json.dumps(quality)), meta.num_levels)
        except (KeyError, TypeError, ValueError) as e:
            raise ELSAError(f"{path}: the quality report does not fit the checkpoint ({e})") from None
    meta.quality = quality
    doc = meta.to_json()
    entries, res = _stored(path)
    if str(path).endswith(".index.json"):
        _write_sharded(path, list(entries), entries, doc, res, max_shard_size or 5 * 10**9, inputs=[])
    else:
        _write_file(path, entries, doc, res)
    return ELSAMeta.from_json(doc, source=path)


def _stored(path: str) -> tuple:
    """``(entries, res)`` of the checkpoint's tensors in the streaming writer's terms
    (:func:`elsa_codec.format.stream.encode_stream`): ``{name: (dtype code, shape)}`` and
    ``{name: (file, byte offset, byte count, CRC-32)}``, each tensor read from where it lies."""
    entries, res = {}, {}
    for shard, names in _shards(path)[0]:
        with _open_safetensors(shard) as f:
            crcs = json.loads(f.metadata()["elsa_checksums"])
            for n in names if names is not None else f.keys():
                code, shape, a, b = f._entries[n]
                entries[n] = (code, shape)
                res[n] = (shard, f._base + a, b - a, crcs[n])
    return entries, res
