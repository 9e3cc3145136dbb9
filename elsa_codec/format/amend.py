"""Give an ELSA checkpoint on disk a new metadata document with the same tensors:
:func:`write_quality` (the quality report ``elsa convert`` measures once the file exists).

The tensors' bytes are copied as they are (``copy_file_range`` where the kernel has it), their
CRC-32s kept; the header (document, header checksum) is written anew, crash-safely: a single file
by an atomic rename, shards and index as :func:`elsa_codec.save_file` writes them.
"""
from __future__ import annotations

import json
import os

from ..errors import ELSAError
from .atomic import atomic
from .document import ELSAMeta, _json_quality
from .file import (
    _ITEM,
    _open_safetensors,
    _read_index,
    _shards,
    data_order,
    file_metadata,
    header_bytes,
    read_meta,
    write_sharded,
)
from .stream import _copy_range

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
    if str(path).endswith(".index.json"):
        _rewrite_shards(path, doc, max_shard_size or 5 * 10**9)
    else:
        with atomic(path) as tmp:
            _copy_file(tmp, {n: path for n in _open_safetensors(path).keys()}, doc)
    return ELSAMeta.from_json(doc, source=path)


def _copy_file(tmp: str, where: dict, doc: str) -> None:
    """Write ``tmp``: a new header (``doc``, the tensors' own CRC-32s), then each tensor's bytes
    copied from the file ``where[name]``."""
    files = {p: _open_safetensors(p) for p in set(where.values())}
    tables = {p: json.loads(f.metadata()["elsa_checksums"]) for p, f in files.items()}
    entries = {n: tuple(files[p]._entries[n][:2]) for n, p in where.items()}
    crcs = {n: tables[p][n] for n, p in where.items()}
    dst = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    srcs = {}
    try:
        head = header_bytes(entries, file_metadata(doc, crcs))
        while head:
            head = head[os.write(dst, head):]
        for n in data_order(entries):
            f = files[where[n]]
            _, _, a, b = f._entries[n]
            if where[n] not in srcs:
                srcs[where[n]] = os.open(where[n], os.O_RDONLY)
            _copy_range(srcs[where[n]], dst, f._base + a, b - a)
    finally:
        os.close(dst)
        for fd in srcs.values():
            os.close(fd)
        for f in files.values():
            f.close()


def _rewrite_shards(index_path: str, doc: str, limit: int) -> None:
    crcs = json.loads(_read_index(index_path)["metadata"]["elsa_checksums"])
    where = {}
    for shard, names in _shards(index_path)[0]:
        for n in names:
            where[n] = shard
    names = list(where)
    sizes = {}
    for shard in set(where.values()):
        f = _open_safetensors(shard)
        for n in f.keys():
            code, shape, a, b = f._entries[n]
            sizes[n] = b - a if _ITEM.get(code) else 0
        f.close()
    write_sharded(index_path, names, sizes, limit, doc, crcs,
                  lambda tmp, g: _copy_file(tmp, {n: where[n] for n in g}, doc))
