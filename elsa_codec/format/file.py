"""ELSA checkpoint files: safetensors with a versioned metadata document (docs/FORMAT.md).

Writes are crash-safe (:mod:`elsa_codec.format.atomic`: flushed temporaries renamed over the
target; shards under new names and the index swapped last): a failed or killed run leaves the
previous file or checkpoint loadable and never overwrites the input. Reads check the document, the tensor list and a CRC-32 of
every tensor, so a truncated or byte-flipped file is an error, never a silently wrong model.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import mmap as _mmap
import os
import re
import zlib
from typing import Mapping

import torch

from ..checks import check_encoded, check_path, check_shard_size, check_target, file_kind
from ..errors import ELSAError, ELSAFormatError, ELSATypeError
from . import jsonio
from .atomic import atomic, commit_shards, shard_names
from .document import _RECORD_DTYPES as _RECORD_TORCH
from .document import _SPARSITY_TOL, BN_PREFIX, BN_STATS, ELSAMeta
from .encode import Counters, ELSAStateDict
from .selection import tie_groups

__all__ = [
    "save_file",
    "load_file",
    "read_meta",
    "save_counters",
    "load_counters",
    "write_plain",
]

_META_KEY = "elsa"
_CRC_KEY = "elsa_checksums"
_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _crc(t: torch.Tensor) -> str:
    b = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return f"{zlib.crc32(memoryview(b)) & 0xFFFFFFFF:08x}"


_HEADER_KEY = "elsa_header_sha256"
#: ``__metadata__`` keys of an ELSA file. Files written before the header checksum (the golden
#: file) hold only the first three; any other key there means a corrupted key name.
_KNOWN_KEYS = ("format", _META_KEY, _CRC_KEY, _HEADER_KEY)


def header_checksum(metadata: Mapping[str, str], entries: Mapping[str, tuple]) -> str:
    """SHA-256 (hex) of the canonical form of a header: the ``__metadata__`` strings (without the
    checksum itself) and every tensor's ``(dtype, shape)`` (``entries``: ``name -> (dtype, shape)``,
    dtype the safetensors code ``"F32"``). Data offsets are not part of it: the per-tensor CRC-32s
    check what they point to."""
    canon = {
        "metadata": {k: v for k, v in metadata.items() if k != _HEADER_KEY},
        "tensors": {n: [str(d), [int(x) for x in s]] for n, (d, s) in entries.items()},
    }
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def st_dtype(t: torch.Tensor, name: str) -> str:
    """The safetensors dtype code of ``t`` (``"F32"``); ELSAError naming ``name`` if none."""
    if t.dtype not in _DTYPES:
        raise ELSAError(f"{name}: dtype {t.dtype} cannot be written to a safetensors file")
    return _DTYPES[t.dtype]


_ITEM = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def data_order(entries: Mapping[str, tuple]) -> list:
    """The order of the tensors' bytes in the file: widest dtype first, then by name (as
    safetensors lays them out, so every tensor is aligned to its element size).
    ``entries``: ``name -> (dtype code, shape)``."""
    return sorted(entries, key=lambda n: (-_ITEM[entries[n][0]], n))


def header_bytes(entries: Mapping[str, tuple], metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a safetensors file: 8-byte little-endian length, then the header JSON.

    ``entries``: ``name -> (dtype code, shape)``; the data offsets follow :func:`data_order`.
    ``metadata`` gets the header checksum (:func:`header_checksum`). The JSON has sorted keys and
    compact separators, padded with spaces to a multiple of 8 bytes: the same input gives the same
    bytes in every process (safetensors' own writer orders ``__metadata__`` by a hash map).
    """
    md = {str(k): str(v) for k, v in metadata.items()}
    md[_HEADER_KEY] = header_checksum(md, entries)
    header, off = {"__metadata__": md}, 0
    for n in data_order(entries):
        d, s = entries[n]
        nb = _ITEM[d] * math.prod(s)
        header[n] = {"dtype": d, "shape": [int(x) for x in s], "data_offsets": [off, off + nb]}
        off += nb
    hb = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return len(hb).to_bytes(8, "little") + hb


def write_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (CPU, contiguous) and ``metadata`` as a safetensors file at ``path``
    (not atomic: call inside :func:`~elsa_codec.format.atomic.atomic`), byte-reproducible (:func:`header_bytes`)."""
    entries = {n: (st_dtype(t, n), list(t.shape)) for n, t in tensors.items()}
    with open(path, "wb") as f:
        f.write(header_bytes(entries, metadata))
        for n in data_order(entries):
            t = tensors[n]
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def file_metadata(doc: str, crcs: Mapping[str, str]) -> dict:
    """The ``__metadata__`` of an ELSA file (before its header checksum): the document and the
    per-tensor CRC-32 table (sorted, compact)."""
    return {"format": "pt", _META_KEY: doc, _CRC_KEY: json.dumps(dict(crcs), sort_keys=True, separators=(",", ":"))}


def _check_name(name) -> None:
    """A tensor name a safetensors file can hold: a ``str`` that encodes as UTF-8 (a lone
    surrogate, as Python decodes a non-UTF-8 file name, does not), without the reserved prefix."""
    if not isinstance(name, str):
        raise ELSAError(f"{name!r}: tensor names must be strings, got {type(name).__name__}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ELSAError(f"{name!r}: the tensor name is not valid Unicode ({e.reason} at position {e.start}: a lone "
                        "surrogate, e.g. a non-UTF-8 file name decoded by Python); a safetensors name must be UTF-8") from None
    if name.startswith(BN_PREFIX):
        raise ELSAError(f"{name}: tensor names must not start with the reserved prefix {BN_PREFIX!r}")


def _check_records(encoded: ELSAStateDict) -> None:
    """Every encoded tensor still has the dtype and shape its record says (a tensor cast,
    reshaped or replaced after encoding lost its codes' meaning); ELSAError naming it."""
    for name, ti in encoded.meta.tensors.items():
        if name in encoded.meta.tied or name not in encoded:
            continue
        t = encoded[name]
        if not isinstance(t, torch.Tensor):
            continue
        want = _RECORD_TORCH.get(ti.dtype)
        if t.dtype != want or list(t.shape) != list(ti.shape):
            raise ELSAError(
                f"{name}: the encoded tensor is {t.dtype} {list(t.shape)} but its record says {ti.dtype} {list(ti.shape)}: "
                "it was cast, reshaped or replaced after encoding, so its low bits are no longer its codes; "
                "encode the original weights again (elsa_codec.encode) instead of editing the encoded dict")


def _flat_tensors(encoded: ELSAStateDict) -> dict:
    out = {}
    for name, t in encoded.items():
        _check_name(name)
        if not isinstance(t, torch.Tensor):
            raise ELSAError(f"{name}: expected a tensor, got {type(t).__name__}")
        out[name] = t
    _check_records(encoded)
    for lvl, per in encoded.bn_stats.items():
        for mod, stats in per.items():
            for s, v in stats.items():
                out[f"{BN_PREFIX}{lvl}.{mod}.{s}"] = v
    # A tied tensor (the same tensor under several names) is stored once; the others become
    # aliases in the document's "tied" map. safetensors refuses any other shared storage: give
    # each remaining tensor its own contiguous memory.
    tied = {}
    for group in tie_groups({n: t for n, t in out.items() if not n.startswith(BN_PREFIX)}):
        for alias in group[1:]:
            tied[alias] = group[0]
            del out[alias]
    seen = set()
    for name, t in out.items():
        t = t.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        elif key is not None:
            seen.add(key)
        out[name] = t
    return out, tied


def save_file(encoded: ELSAStateDict, path: str, *, max_shard_size=None) -> None:
    """Write an :class:`ELSAStateDict` to a safetensors file (or shards plus an index), crash-safely.

    Args:
        encoded: from :func:`elsa_codec.encode`, :func:`load_file` or ``elsa_state_dict(model)``.
        path: ``*.safetensors``; or ``*.safetensors.index.json`` (or ``max_shard_size`` given) for
            shards ``{stem}-00001-of-0000N-{suffix}.safetensors`` beside an index file (the suffix
            is derived from the content: :func:`elsa_codec.format.atomic.shard_names`). Missing
            folders are created (the ``elsa`` CLI refuses them instead: a typo). A symlink there
            is replaced by the new file, not followed.
        max_shard_size: bytes per shard (a positive int, or ``"2GB"``, ``"500MB"``, ``"1GiB"``);
            implies sharding.

    The header's ``__metadata__`` holds the versioned JSON document under ``"elsa"`` and CRC-32s of
    every tensor under ``"elsa_checksums"``; per-level batch-norm statistics are stored as extra
    tensors ``__elsa_bn__.{level}.{module}.{stat}`` (docs/FORMAT.md).

    The bytes depend only on the content: the same state dict gives the same file in every
    process and on every machine (sorted header, fixed JSON formatting; :func:`header_bytes`).

    Crash safety (:mod:`elsa_codec.format.atomic`): a failure (disk full, an exception) or a kill
    at any point leaves the previous file, or the previous sharded checkpoint, loadable. A
    sharded write never renames a shard over one the current index uses: the index is swapped
    last, then the previous index's shards are removed.

    Raises:
        ELSAError: not an ELSAStateDict (``ELSATypeError``), a path that is not a path or is a
            directory, FIFO, device or socket, a bad ``max_shard_size``, a tensor name using the
            reserved prefix or not encodable as UTF-8, an encoded tensor whose dtype or shape no
            longer matches its record (cast after encoding). All before anything is written.

    Example:
        >>> import torch, tempfile, os, elsa_codec as ec
        >>> sd = {"w": torch.randn(8, 8)}
        >>> enc = ec.encode(sd, ec.magnitude_counters(sd, [0.5]))
        >>> ec.save_file(enc, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
    """
    check_encoded(encoded, "encoded", "save_file")
    path = check_path(path, "path", "save_file", order="save_file(encoded, path)")
    check_target(path, what="save_file: path")
    limit = check_shard_size(max_shard_size)
    tensors, tied = _flat_tensors(encoded)
    doc = dataclasses.replace(encoded.meta, tied=tied).to_json()  # what the file stores once
    crcs = {n: _crc(t) for n, t in tensors.items()}
    sharded = max_shard_size is not None or str(path).endswith(".index.json")
    if not sharded:
        with atomic(path) as tmp:
            write_tensors(tmp, tensors, file_metadata(doc, crcs))
        return
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    index_path = path if str(path).endswith(".index.json") else str(path) + ".index.json"
    write_sharded(index_path, list(tensors), sizes, limit if limit is not None else 5 * 10**9, doc, crcs,
                  lambda tmp, g: write_tensors(tmp, {n: tensors[n] for n in g}, file_metadata(doc, {n: crcs[n] for n in g})))


def write_sharded(index_path: str, names: list, sizes: Mapping[str, int], limit: int, doc: str, crcs: Mapping[str, str],
                  write_shard, check_name=None) -> None:
    """Write ``names`` as shards of at most ``limit`` bytes (:func:`shard_groups`, named by
    :func:`~elsa_codec.format.atomic.shard_names`) and the index at ``index_path``, crash-safely
    (:func:`~elsa_codec.format.atomic.commit_shards`). ``write_shard(tmp, [names])`` writes one
    shard's file; ``check_name(path)`` (optional) vets each shard path before any work."""
    groups = shard_groups(names, sizes, limit)
    files = shard_names(index_stem(index_path), groups, doc + json.dumps(dict(crcs), sort_keys=True))
    if check_name is not None:
        folder = os.path.dirname(os.path.abspath(index_path))
        for f in files:
            check_name(os.path.join(folder, f))
    writers = {f: (lambda tmp, g=g: write_shard(tmp, g)) for f, g in zip(files, groups)}
    weight_map = {n: f for f, g in zip(files, groups) for n in g}
    commit_shards(index_path, writers, lambda tmp: write_index(tmp, weight_map, sum(sizes.values()), doc, crcs),
                  lambda: used_shards(index_path), orphan_shard(index_path))


def shard_groups(names: list, sizes: Mapping[str, int], limit: int) -> list:
    """``[[names]]``: consecutive ``names`` per shard while their bytes (``sizes``) stay within
    ``limit`` (a tensor larger than ``limit`` gets a shard of its own)."""
    groups, cur, size = [], [], 0
    for n in names:
        if cur and size + sizes[n] > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += sizes[n]
    return groups + ([cur] if cur else [])


def index_stem(index_path: str) -> str:
    """The shard stem of an index: ``model`` for ``model.safetensors.index.json``."""
    base = os.path.basename(index_path)[: -len(".index.json")]
    return base[: -len(".safetensors")] if base.endswith(".safetensors") else base


def used_shards(index_path: str) -> set:
    """The shard file names the index at ``index_path`` uses now (empty if it is absent or
    unreadable: then no old shard is removed)."""
    try:
        return set(_read_index(index_path)["weight_map"].values())
    except ELSAFormatError:
        return set()


def orphan_shard(index_path: str):
    """Predicate: a file name is a shard this index's writer names (:func:`shard_names`), so one
    the index does not use is left by a write killed before its commit."""
    pat = re.compile(re.escape(index_stem(index_path)) + r"-\d{5}-of-\d{5}-[0-9a-f]{16}\.safetensors")
    return lambda name: pat.fullmatch(name) is not None


def write_index(path: str, weight_map: Mapping[str, str], total_size: int, doc: str, crcs: Mapping[str, str]) -> None:
    """Write a ``*.safetensors.index.json`` (not atomic: call inside :func:`~elsa_codec.format.atomic.atomic`): sorted keys,
    the document, every checksum and the index's own checksum (:func:`index_checksum`)."""
    md = {"total_size": int(total_size), **file_metadata(doc, crcs)}
    del md["format"]
    index = {"metadata": md, "weight_map": dict(sorted(weight_map.items()))}
    index["metadata"][_HEADER_KEY] = index_checksum(index)
    with open(path, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.write("\n")


def index_checksum(index: Mapping) -> str:
    """SHA-256 (hex) of an index's canonical form: its metadata (without this checksum) and weight map."""
    md = {k: v for k, v in dict(index.get("metadata", {})).items() if k != _HEADER_KEY}
    canon = json.dumps({"metadata": md, "weight_map": index.get("weight_map")}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


_READ_ITEM = {**_ITEM, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_CODES = {v: k for k, v in _DTYPES.items()}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _TORCH_CODES[_code] = getattr(torch, _name)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the header's JSON
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_SAVE_HINT = "load it with torch.load and write it with safetensors (safetensors.torch.save_file) or `elsa encode`"


def _not_regular(st: os.stat_result, what: str) -> str | None:
    """Why a file of this ``stat`` is not readable as ``what`` (None for a regular file)."""
    kind = file_kind(st.st_mode)
    if kind is None:
        return None
    if kind == "a directory":
        return f"is a directory, not {what}"
    return f"is {kind}, not a regular file ({what} is read from a regular file)"


def stat_identity(st: os.stat_result) -> tuple:
    """``(st_dev, st_ino, st_size, st_mtime_ns)``: what tells a file from its replacement or a
    rewrite (:class:`_SafetensorsFile`, ``elsa_codec.load(..., mmap=True)``)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _os_error(path: str, e: OSError) -> ELSAFormatError:
    """The ELSAFormatError for an OSError of opening or reading ``path``."""
    if e.errno == errno.ELOOP:
        return ELSAFormatError(f"{path}: symlink loop (too many levels of symbolic links)")
    if e.errno == errno.ENOENT:
        dangling = os.path.islink(path)
        return ELSAFormatError(f"{path}: no such file" + (" (a dangling symlink)" if dangling else ""))
    return ELSAFormatError(f"{path}: cannot read the file ({e.strerror or e})")


def _open_regular(path: str, what: str = "a safetensors file") -> tuple:
    """``(fd, fstat)`` of ``path`` opened once, read-only: refused before opening (``os.stat``:
    never blocks on a FIFO) and again on the descriptor if it is not a regular file."""
    try:
        why = _not_regular(os.stat(path), what)
        if why is not None:
            raise ELSAFormatError(f"{path}: {why}")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _os_error(path, e) from None
    st = os.fstat(fd)
    why = _not_regular(st, what)
    if why is not None:
        os.close(fd)
        raise ELSAFormatError(f"{path}: {why}")
    return fd, st


def _pread(fd: int, buf, offset: int) -> int:
    """Fill ``buf`` (a writable buffer) from ``fd`` at ``offset``; the bytes read (fewer at EOF)."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def _magic(path: str, head: bytes) -> None:
    """Refuse a torch.save file (zip or pickle) by its first bytes (only for a file that does not
    start as a safetensors file: a header of 0x380 bytes also starts with 0x80 0x03)."""
    if head[:4] == _ZIP_MAGIC:
        raise ELSAFormatError(f"{path}: is a torch.save zip file, not a safetensors file: {_TORCH_SAVE_HINT}")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ELSAFormatError(f"{path}: is a pickle (torch.save legacy format), not a safetensors file: {_TORCH_SAVE_HINT}")


def _header_json(path: str, fd: int, size: int) -> tuple:
    """``(header object, data start)`` of the safetensors file open as ``fd`` (``size`` bytes)."""
    if size < 8:
        raise ELSAFormatError(f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte header size)")
    head = bytearray(9)
    _pread(fd, head, 0)
    n = int.from_bytes(head[:8], "little")
    if n > size - 8 or head[8:9] != b"{":  # not a safetensors header: say what the file is, if known
        _magic(path, bytes(head))
    if n > _MAX_HEADER:
        raise ELSAFormatError(f"{path}: not a readable safetensors file (header size {n} bytes is over the 100 MB limit: corrupted)")
    if n > size - 8:
        raise ELSAFormatError(f"{path}: truncated file (header of {n} bytes, the file holds {size - 8} after its size)")
    raw = bytearray(n)
    if _pread(fd, raw, 8) < n:
        raise ELSAFormatError(f"{path}: truncated file (the file shrank while it was read)")
    try:
        header = jsonio.loads(bytes(raw))
    except jsonio.DuplicateKeyError as e:
        what = f"tensor {e.key!r} is named twice" if isinstance(e.value, dict) else f"key {e.key!r} is repeated"
        raise ELSAFormatError(f"{path}: not a readable safetensors file ({what} in the header)") from None
    except ValueError as e:
        raise ELSAFormatError(f"{path}: not a readable safetensors file (malformed header: {e})") from None
    if not isinstance(header, dict):
        raise ELSAFormatError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    return header, 8 + n


def _entry(path: str, name: str, e) -> tuple:
    """``(dtype code, shape, start, end)`` of a header entry, each field checked."""
    bad = f"{path}: not a readable safetensors file (tensor {name!r}"
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise ELSAFormatError(f"{bad}: its entry is not an object of dtype, shape, data_offsets)")
    code, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
    if code not in _READ_ITEM:
        raise ELSAFormatError(f"{bad}: unknown dtype {code!r})")
    ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)  # noqa: E731
    if not ints(shape):
        raise ELSAFormatError(f"{bad}: shape {shape!r} is not a list of sizes)")
    if not ints(offs) or len(offs) != 2 or offs[1] < offs[0]:
        raise ELSAFormatError(f"{bad}: data_offsets {offs!r} are not [start, end])")
    if offs[1] - offs[0] != _READ_ITEM[code] * math.prod(shape):
        raise ELSAFormatError(f"{bad}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, its {code} shape {shape} needs {_READ_ITEM[code] * math.prod(shape)})")
    return code, [int(x) for x in shape], offs[0], offs[1]


def _entries(path: str, header: dict, data: int) -> tuple:
    """``(metadata or None, {name: entry})`` of a parsed header whose tensors' bytes must tile the
    ``data`` bytes after it exactly (as safetensors requires)."""
    md = header.pop("__metadata__", None)
    if md is not None and not (isinstance(md, dict) and all(isinstance(v, str) for v in md.values())):
        raise ELSAFormatError(f"{path}: not a readable safetensors file (__metadata__ is not an object of strings)")
    entries = {n: _entry(path, n, e) for n, e in header.items()}
    end = 0
    for n in sorted(entries, key=lambda n: (entries[n][2], entries[n][3])):
        if entries[n][2] != end:
            raise ELSAFormatError(f"{path}: not a readable safetensors file (tensor {n!r}: data_offsets start at {entries[n][2]}, expected {end})")
        end = entries[n][3]
    if end > data:
        raise ELSAFormatError(f"{path}: truncated file (the header describes {end} data bytes, the file holds {data})")
    if end < data:
        raise ELSAFormatError(f"{path}: not a readable safetensors file ({data - end} bytes after the last tensor's data)")
    return md, entries


class _Slice:
    def __init__(self, entry: tuple):
        self._e = entry

    def get_dtype(self) -> str:
        return self._e[0]

    def get_shape(self) -> list:
        return list(self._e[1])


class _SafetensorsFile:
    """A safetensors file opened ONCE: the header is parsed from the descriptor and every tensor is
    read from that same descriptor (an owned copy) or, with ``mmap``, from one private mapping of
    it; a concurrent atomic replace of the path gives the old file or the new one, never a
    mixture. The ``safe_open`` API the readers use: ``keys``, ``metadata``, ``get_slice``,
    ``get_tensor``; ``identity`` is ``(st_dev, st_ino, st_size, st_mtime_ns)`` at the open."""

    def __init__(self, path: str, *, mmap: bool = False):
        self.path = path
        fd, st = _open_regular(path)
        try:
            header, self._base = _header_json(path, fd, st.st_size)
            self._md, self._entries = _entries(path, header, st.st_size - self._base)
            self._mm = _mmap.mmap(fd, 0, access=_mmap.ACCESS_COPY) if mmap else None
        except BaseException:
            os.close(fd)
            raise
        self.identity = stat_identity(st)
        self._fd = None if mmap else fd
        if mmap:
            os.close(fd)

    def keys(self) -> list:
        return sorted(self._entries)

    def metadata(self):
        return None if self._md is None else dict(self._md)

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self._entries[name])

    def get_tensor(self, name: str) -> torch.Tensor:
        code, shape, a, b = self._entries[name]
        dt = _TORCH_CODES.get(code)
        if dt is None:
            raise ELSAFormatError(f"{self.path}: tensor {name!r}: dtype {code} cannot be read by this torch")
        if b == a:
            return torch.empty(shape, dtype=dt)
        if self._mm is not None:
            t = torch.frombuffer(self._mm, dtype=torch.uint8, count=b - a, offset=self._base + a)
            t = t.clone() if t.data_ptr() % _READ_ITEM[code] else t  # a view of the map unless misaligned
            return t.view(dt).reshape(shape)
        if self._fd is None:
            raise ELSAFormatError(f"{self.path}: the file was closed before tensor {name!r} was read")
        buf = torch.empty(b - a, dtype=torch.uint8)
        if _pread(self._fd, buf.numpy(), self._base + a) < b - a:
            raise ELSAFormatError(f"{self.path}: truncated file (tensor {name!r} ends past the file's end: it shrank while read)")
        return buf.view(dt).reshape(shape)

    def close(self) -> None:
        """Close the descriptor (tensors already read, and a mapping, stay valid)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    __del__ = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_safetensors(path: str, *, check_header: bool = True, mmap: bool = False) -> _SafetensorsFile:
    """``path`` opened once (:class:`_SafetensorsFile`), its header checked (:func:`_check_header`);
    every failure is an ELSAFormatError naming the file: what it is if not a safetensors file
    (a directory, FIFO, device, symlink loop, torch.save zip or pickle), else what is wrong."""
    f = _SafetensorsFile(path, mmap=mmap)
    if check_header:
        try:
            _check_header(f, path)
        except BaseException:
            f.close()
            raise
    return f


def _check_header(f, path: str) -> None:
    """Verify the header checksum (:func:`header_checksum`) of an opened file. A file without one
    is accepted only if it could have been written before checksums existed (an ELSA file then
    holds no metadata key but ``format``, ``elsa``, ``elsa_checksums``)."""
    md = f.metadata() or {}
    want = md.get(_HEADER_KEY)
    if want is None:
        extra = sorted(set(md) - set(_KNOWN_KEYS))
        if _META_KEY in md and extra:
            raise ELSAFormatError(f"{path}: header has no checksum and an unknown metadata key {extra[0]!r} (corrupted header)")
        return
    entries = {}
    for n in f.keys():
        sl = f.get_slice(n)
        entries[n] = (sl.get_dtype(), sl.get_shape())
    if header_checksum(md, entries) != want:
        raise ELSAFormatError(
            f"{path}: the header (metadata document, checksum table or tensor list) fails its SHA-256 check (file corrupted)"
        )


def _shards(path: str):
    """[(shard_path, [names] or None)] and the index metadata (or None) for a file or an index.

    An index must be a JSON object without duplicated keys, its ``weight_map`` an object of file
    names in the index's folder, its ``metadata`` (if any) an object passing its checksum
    (:func:`index_checksum`)."""
    if not str(path).endswith(".index.json"):
        return [(path, None)], None
    index = _read_index(path)
    wm, md = index["weight_map"], index.get("metadata", {})
    want = md.get(_HEADER_KEY)
    if want is None and _META_KEY in md and set(md) - {"total_size", _META_KEY, _CRC_KEY}:
        raise ELSAFormatError(f"{path}: index has no checksum and unknown metadata keys (corrupted)")
    if want is not None and index_checksum(index) != want:
        raise ELSAFormatError(f"{path}: the index (metadata, checksums or weight map) fails its SHA-256 check (file corrupted)")
    for s in wm.values():
        if os.path.basename(s) != s or s in ("", ".", ".."):
            raise ELSAFormatError(f"{path}: weight_map names a shard {s!r} outside the index's folder")
    folder = os.path.dirname(os.path.abspath(path))
    by_shard = {}
    for n, s in wm.items():
        by_shard.setdefault(s, []).append(n)
    return [(os.path.join(folder, s), ns) for s, ns in by_shard.items()], md


def _read_index(path: str) -> dict:
    """The JSON object of an index file with an object ``weight_map`` of file names and an object
    ``metadata`` (if any); ELSAFormatError naming the file otherwise."""
    fd, st = _open_regular(path, "an index file")
    try:
        raw = bytearray(st.st_size)
        _pread(fd, raw, 0)  # read once, from the descriptor checked above
    finally:
        os.close(fd)
    try:
        index = jsonio.loads(bytes(raw))
        if not isinstance(index, dict):
            raise TypeError("not a JSON object")
        wm = index["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(s, str) for s in wm.values()):
            raise TypeError("weight_map is not an object of file names")
        if not isinstance(index.get("metadata", {}), dict):
            raise TypeError("metadata is not an object")
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise ELSAFormatError(f"{path}: malformed index file ({e})") from None
    return index


def read_meta(path: str) -> ELSAMeta:
    """Read and validate only the metadata document of a file or index (no tensor data): the
    header or index checksum, then :meth:`ELSAMeta.from_json`'s checks of the document.

    Raises:
        ELSAFormatError: missing or malformed document, unknown version, unreadable file.
    """
    path = check_path(path, "path", "read_meta")
    shards, imeta = _shards(path)
    if imeta is not None:
        return _doc_meta(path, imeta)
    with _open_safetensors(shards[0][0]) as f:  # the header only: no tensor is read
        return _doc_meta(path, f.metadata() or {})


def _doc_meta(path: str, md: Mapping) -> ELSAMeta:
    """The checked document of a file's (or index's) metadata ``md``."""
    if _META_KEY not in md:
        raise ELSAFormatError(f"{path}: not an ELSA checkpoint (no '{_META_KEY}' metadata document); make one with `elsa encode`")
    return ELSAMeta.from_json(md[_META_KEY], source=path)


def load_file(path: str, *, device="cpu", verify_checksums: bool = True, mmap: bool = False) -> ELSAStateDict:
    """Read an ELSA checkpoint (a ``.safetensors`` file or a ``.safetensors.index.json``).

    Every meaningful byte is checked (docs/FORMAT.md, "Readers must refuse"): the header (or
    index) checksum, the document (:meth:`ELSAMeta.from_json`), the shards against their index,
    the tensors against their records, the tied aliases and the batch-norm statistics; with
    ``verify_checksums`` (the default) also each tensor's CRC-32 and, per encoded tensor, one
    count of its codes: every code ``<= T``, each level's measured sparsity equal to its record,
    each structured level's mask holding its structure (:func:`_check_codes`).

    Each file is opened once (an index read once, then each shard once): its header, checks and
    tensors all come from that one descriptor, so a file atomically replaced meanwhile gives the
    old content or the new one, never a mixture.

    Args:
        path: the file or index.
        device: where the tensors go (read on the CPU, checked, then moved).
        verify_checksums: also check the CRC-32s and the codes (the default).
        mmap: tensors are views of one private memory map of each file (pages read on demand)
            instead of memory the result owns (the default: read and checked once, later changes
            to the file cannot reach them). A mapped tensor reads the file again whenever its
            pages were handed back: a file changed in place later changes it, a truncated one
            raises SIGBUS on access.

    Returns:
        :class:`ELSAStateDict`: the tensors under their names (batch-norm statistics stripped into
        ``.bn_stats``), ``.meta`` the parsed document.

    Raises:
        ELSAFormatError: missing, truncated or corrupted file (names the file and what is
            corrupt: the tensor, the field, the level), a format version from the future.
    """
    path = check_path(path, "path", "load_file", order="load_file(path)")
    return _load(path, device=device, verify_checksums=verify_checksums, mmap=mmap)[0]


def _load(path: str, *, device="cpu", verify_checksums: bool = True, mmap: bool = False) -> tuple:
    """``(ELSAStateDict, [(file, identity)])`` of :func:`load_file` (``path`` checked): each file
    read with its ``(st_dev, st_ino, st_size, st_mtime_ns)`` at the open."""
    meta, tensors, crcs, sources = _read_consistent(path, mmap)
    if verify_checksums:
        _check_crcs(path, tensors, crcs)
    _restore_tied(path, tensors, meta)
    plain, bn = _split_bn(path, tensors, meta)
    _check_shapes(path, plain, meta)
    if verify_checksums:
        _check_codes(path, plain, meta)
    if device != "cpu":
        plain = {n: t.to(device) for n, t in plain.items()}
    return ELSAStateDict(plain, meta, bn), sources


def _identity(path: str):
    try:
        return stat_identity(os.stat(path))
    except OSError:
        return None


#: Reads of a sharded checkpoint retried when its index was replaced while they ran.
_INDEX_RETRIES = 5


def _read_consistent(path: str, mmap: bool) -> tuple:
    """:func:`_read_shards` of ``path``. Shards are never replaced by a commit
    (:func:`elsa_codec.format.atomic.commit_shards`), but an index swapped while its shards are
    read may have had its old shards removed: a read that fails while the index's identity changed
    is retried on the new index, so a concurrent re-encode gives the old checkpoint or the new one."""
    for attempt in range(_INDEX_RETRIES + 1):
        before = _identity(path) if str(path).endswith(".index.json") else None
        try:
            shards, imeta = _shards(path)
            return _read_shards(path, shards, imeta, mmap)
        except ELSAFormatError:
            if before is None or attempt == _INDEX_RETRIES or _identity(path) == before:
                raise


def _read_shards(path: str, shards: list, imeta, mmap: bool = False) -> tuple:
    """``(meta, tensors, crcs, [(shard, identity)])`` of every shard, each opened once; the
    document is the index's (``imeta``) or the file's. With an index each shard must hold exactly
    the tensors the index maps to it and the index's document, and the index's total size and
    checksum table must match the shards."""
    meta = _doc_meta(path, imeta) if imeta is not None else None
    tensors, crcs, sources = {}, {}, []
    for shard, names in shards:
        with _open_safetensors(shard, mmap=mmap) as f:
            md = f.metadata() or {}
            if meta is None:
                meta = _doc_meta(path, md)
            crcs.update(_shard_table(path, shard, f, md, names, imeta))
            for n in f.keys():
                tensors[n] = f.get_tensor(n)
            sources.append((shard, f.identity))
    if imeta is not None:
        _check_index(path, imeta, tensors, crcs)
    return meta, tensors, crcs, sources


def _shard_table(path: str, shard: str, f, md: Mapping, names, imeta) -> dict:
    """The checksum table of one opened shard (``{}`` if none), checked against its tensors and,
    with an index, against the index's names and document."""
    held = f.keys()
    if imeta is not None:
        if md.get(_META_KEY) != imeta.get(_META_KEY):
            raise ELSAFormatError(f"{shard}: its metadata document differs from the one of its index {path}")
        if sorted(held) != sorted(names):
            odd = sorted(set(held) ^ set(names))[0]
            raise ELSAFormatError(f"{shard}: tensor {odd!r} is in the shard or in the index {path} but not in both")
    table = _crc_table(shard, md)
    if table is not None and sorted(table) != sorted(held):
        raise ELSAFormatError(f"{shard}: the checksum table lists other tensors than the file holds")
    return table or {}


def _crc_table(path: str, md: Mapping) -> dict | None:
    """The ``elsa_checksums`` table of a file's metadata (None if absent): an object of tensor
    names to 8 lowercase hex digits."""
    if _CRC_KEY not in md:
        return None
    try:
        table = jsonio.loads(md[_CRC_KEY])
    except (TypeError, ValueError) as e:
        raise ELSAFormatError(f"{path}: malformed checksum table ({e})") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) and re.fullmatch(r"[0-9a-f]{8}", v) for v in table.values()):
        raise ELSAFormatError(f"{path}: malformed checksum table (not an object of 8-hex-digit CRC-32s)")
    return table


def _check_index(path: str, imeta: Mapping, tensors: Mapping, crcs: Mapping) -> None:
    """An index's ``total_size`` is the bytes of its tensors and its checksum table the shards'."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if imeta.get("total_size") != total or isinstance(imeta.get("total_size"), bool):
        raise ELSAFormatError(f"{path}: total_size is {imeta.get('total_size')!r}, the shards hold {total} bytes")
    if _CRC_KEY in imeta and _crc_table(path, imeta) != dict(crcs):
        raise ELSAFormatError(f"{path}: the index's checksum table differs from its shards' tables")


def _check_crcs(path: str, tensors: Mapping, crcs: Mapping) -> None:
    """Each tensor's CRC-32 equals its checksum table entry."""
    for n, t in tensors.items():
        want = crcs.get(n)
        if want is None:
            raise ELSAFormatError(f"{path}: tensor {n!r} has no checksum in the metadata")
        if _crc(t) != want:
            raise ELSAFormatError(f"{path}: tensor {n!r} fails its CRC-32 check (file corrupted)")


def _restore_tied(path: str, tensors: dict, meta: ELSAMeta) -> None:
    """Put each tied alias back as its stored target (one tensor under both names); an encoded
    alias must have its target's record."""
    for alias, target in meta.tied.items():
        if alias in tensors or target not in tensors:
            why = "is also stored" if alias in tensors else f"points to {target!r}, which the file does not hold"
            raise ELSAFormatError(f"{path}: tied tensor {alias!r} {why}")
        if meta.tensors.get(alias) != meta.tensors.get(target):
            raise ELSAFormatError(f"{path}: tied tensor {alias!r} and its target {target!r} have different records in the metadata")
        tensors[alias] = tensors[target]  # one tensor under both names, as in the model


_BN_NAME = re.compile(r"([1-9][0-9]*)\.(.+)\.([a-z_]+)")


def _split_bn(path: str, tensors: Mapping, meta: ELSAMeta) -> tuple:
    """``(plain, bn_stats)``: the ``__elsa_bn__.{level}.{module}.{stat}`` tensors parsed into
    ``{level: {module: {stat: tensor}}}``, checked by :func:`_check_bn`."""
    plain, bn = {}, {}
    for n, t in tensors.items():
        if not n.startswith(BN_PREFIX):
            plain[n] = t
            continue
        m = _BN_NAME.fullmatch(n[len(BN_PREFIX) :])
        if m is None or m.group(3) not in BN_STATS:
            raise ELSAFormatError(f"{path}: malformed batch-norm statistics name {n!r}")
        bn.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = t
    _check_bn(path, bn, meta)
    return plain, bn


def _check_bn(path: str, bn: Mapping, meta: ELSAMeta) -> None:
    """Batch-norm statistics cover levels ``1..T+1``, each level the same modules, statistics,
    dtypes and shapes, the modules those the document's ``bn_modules`` lists."""
    T = meta.num_levels
    if not bn and not meta.bn_modules:
        return
    if sorted(bn) != list(range(1, T + 2)):
        raise ELSAFormatError(f"{path}: batch-norm statistics for levels {sorted(bn)}, expected 1..{T + 1}")
    layout = {t: {m: {s: (v.dtype, tuple(v.shape)) for s, v in st.items()} for m, st in per.items()} for t, per in bn.items()}
    for t, lay in layout.items():
        if lay != layout[1]:
            raise ELSAFormatError(f"{path}: batch-norm statistics of level {t} differ in modules, statistics or shapes from level 1's")
    if sorted(layout[1]) != sorted(meta.bn_modules):
        raise ELSAFormatError(f"{path}: batch-norm statistics are for modules {sorted(layout[1])}, the metadata lists {sorted(meta.bn_modules)}")


def _check_shapes(path: str, plain: Mapping, meta: ELSAMeta) -> None:
    """Each encoded tensor is in the file with its record's shape and dtype."""
    for n, info in meta.tensors.items():
        if n not in plain:
            raise ELSAFormatError(f"{path}: encoded tensor {n!r} is listed in the metadata but missing from the file")
        t = plain[n]
        if list(t.shape) != list(info.shape) or str(t.dtype).replace("torch.", "") != info.dtype:
            raise ELSAFormatError(
                f"{path}: tensor {n!r} is {tuple(t.shape)} {t.dtype} but the metadata says {tuple(info.shape)} {info.dtype}"
            )


def _check_codes(path: str, plain: Mapping, meta: ELSAMeta) -> None:
    """Per encoded tensor, its codes (:func:`elsa_codec.format.bits.decode_codes`) counted once per
    level: every code is ``<= T``, each level's measured sparsity equals the record, and each
    structured level's mask (``code < t``; its transpose for a ``transposed`` weight) holds the
    structure (:func:`elsa_codec.format.structure.mask_structure_ok`). A lie about ``k``, a sparsity or a
    structure changes what the file serves, so it is refused here."""
    from .bits import decode_codes, kept_counts
    from .structure import mask_structure_ok

    T, k = meta.num_levels, meta.code_bits
    for n, ti in meta.tensors.items():
        if n in meta.tied:
            continue  # its target's tensor and record, checked under the target's name
        codes = decode_codes(plain[n], k)
        flat = codes.reshape(-1).numpy()
        kept = kept_counts(codes, T, k)
        if kept[T] != flat.size:
            raise ELSAFormatError(f"{path}: {n}: code {int(flat.max())} is out of range 0..{T} (T={T}): corrupted tensor or wrong code_bits")
        size = max(flat.size, 1)
        for t, (rec, kv) in enumerate(zip(ti.sparsity, kept), start=1):
            got = 1.0 - float(kv) / size  # as encode measures it (codec._tensor_info)
            if abs(rec - got) > _SPARSITY_TOL:
                raise ELSAFormatError(f"{path}: {n}: level {t} sparsity recorded {rec:.6f}, measured {got:.6f}")
        for t, lv in enumerate(meta.levels, start=1):
            if lv.structure != "unstructured":
                mask = torch.from_numpy(flat < t).reshape(codes.shape)
                # an empty weight has no group to break; Conv1D is stored [in, out]
                if mask.numel() and not mask_structure_ok(mask.t() if ti.transposed else mask, lv.structure):
                    raise ELSAFormatError(f"{path}: {n}: level {t}'s mask breaks its structure {lv.structure}")


def save_counters(counters: Counters, path: str) -> None:
    """Write :class:`Counters` (uint8 tensors) to a safetensors file, atomically, with T and the
    level structures in the metadata. Read back with :func:`load_counters` or ``elsa encode --counters``."""
    from .encode import counter_dtype

    if not isinstance(counters, Counters):
        raise ELSATypeError(f"save_counters: counters must be a Counters (from magnitude_counters, counters_from_masks or training), got {type(counters).__name__}")
    path = check_path(path, "path", "save_counters", order="save_counters(counters, path)")
    t = {n: c.to(counter_dtype(counters.num_levels)).contiguous() for n, c in counters.items()}
    head = {"num_levels": counters.num_levels, "structures": counters.structures}
    if getattr(counters, "transposed", None):
        head["transposed"] = sorted(counters.transposed)
    md = {"elsa_counters": json.dumps(head)}
    with atomic(path) as tmp:
        write_tensors(tmp, t, md)


def load_counters(path: str) -> Counters:
    """Read a counters file written by :func:`save_counters`.

    Raises:
        ELSAFormatError: unreadable file or no counters metadata.
    """
    path = check_path(path, "path", "load_counters")
    with _open_safetensors(path) as f:  # opened once: header and tensors from one descriptor
        T, structs, transposed = _counters_header(f, path)
        return Counters({n: f.get_tensor(n) for n in f.keys()}, T, structs, transposed)


def _counters_header(f, path: str) -> tuple:
    try:
        d = jsonio.loads((f.metadata() or {})["elsa_counters"])
        return int(d["num_levels"]), list(d["structures"]), set(d.get("transposed", []))
    except (KeyError, ValueError, TypeError):
        raise ELSAFormatError(f"{path}: not an ELSA counters file (no 'elsa_counters' metadata)") from None


def write_plain(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write a plain safetensors file (any loader reads it), atomically."""
    flat = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    with atomic(path) as tmp:
        write_tensors(tmp, flat, dict(metadata or {"format": "pt"}))
