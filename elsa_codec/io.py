"""ELSA checkpoint files: safetensors with a versioned metadata document (docs/FORMAT.md).

Writes are atomic (temp file in the same folder, then rename): a failed run leaves no partial
file and never overwrites the input. Reads check the document, the tensor list and a CRC-32 of
every tensor, so a truncated or byte-flipped file is an error, never a silently wrong model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import zlib
from contextlib import contextmanager
from typing import Iterable, Mapping

import torch

from .bits import check_code_bits, default_code_bits, encode_tensor
from .codec import (
    BN_PREFIX,
    Counters,
    ELSAMeta,
    ELSAStateDict,
    _make_meta,
    _tensor_info,
    global_thresholds,
    parse_levels,
    select_tensors,
    tensor_magnitude_counters,
)
from .errors import ELSAError, ELSAFormatError
from .select import tie_groups

__all__ = [
    "save_file",
    "load_file",
    "read_meta",
    "encode_file",
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


@contextmanager
def _atomic(path: str, suffix: str = ".tmp"):
    """Yield a temp path beside ``path``; rename it over ``path`` on success, delete it on failure."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=d)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_out_path(path: str, inputs: Iterable[str] = ()) -> None:
    for p in inputs:
        if p and os.path.exists(p) and os.path.exists(path) and os.path.samefile(p, path):
            raise ELSAError(f"output {path!r} is the input file: refusing to overwrite it")


def _flat_tensors(encoded: ELSAStateDict) -> dict:
    if getattr(encoded, "meta", None) is None:
        raise ELSAError("save_file needs an ELSAStateDict (from encode or load_file), got a plain mapping")
    out = {}
    for name, t in encoded.items():
        if name.startswith(BN_PREFIX):
            raise ELSAError(f"{name}: tensor names must not start with the reserved prefix {BN_PREFIX!r}")
        if not isinstance(t, torch.Tensor):
            raise ELSAError(f"{name}: expected a tensor, got {type(t).__name__}")
        out[name] = t
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


def _parse_size(s) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", str(s), re.I)
    if not m:
        raise ELSAError(f"bad shard size {s!r}: expected bytes or e.g. '2GB', '500MB'")
    unit = m.group(2).upper().replace("I", "").replace("B", "")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit])


def save_file(encoded: ELSAStateDict, path: str, *, max_shard_size=None) -> None:
    """Write an :class:`ELSAStateDict` to a safetensors file (or shards plus an index), atomically.

    Args:
        encoded: from :func:`elsa_codec.encode`, :func:`load_file` or ``elsa_state_dict(model)``.
        path: ``*.safetensors``; or ``*.safetensors.index.json`` (or ``max_shard_size`` given) for
            the usual shards ``{stem}-00001-of-0000N.safetensors`` beside an index file.
        max_shard_size: bytes per shard (int, or ``"2GB"``); implies sharding.

    The header's ``__metadata__`` holds the versioned JSON document under ``"elsa"`` and CRC-32s of
    every tensor under ``"elsa_checksums"``; per-level batch-norm statistics are stored as extra
    tensors ``__elsa_bn__.{level}.{module}.{stat}`` (docs/FORMAT.md).

    Raises:
        ELSAError: not an ELSAStateDict, or a tensor name using the reserved prefix.
    """
    from safetensors.torch import save_file as st_save

    tensors, tied = _flat_tensors(encoded)
    doc = dataclasses.replace(encoded.meta, tied=tied).to_json()  # what the file stores once
    crcs = {n: _crc(t) for n, t in tensors.items()}
    sharded = max_shard_size is not None or str(path).endswith(".index.json")
    if not sharded:
        with _atomic(path) as tmp:
            st_save(tensors, tmp, metadata={"format": "pt", _META_KEY: doc, _CRC_KEY: json.dumps(crcs)})
        return
    limit = _parse_size(max_shard_size) if max_shard_size is not None else 5 * 10**9
    groups, cur, size = [], [], 0
    for n, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and size + nb > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nb
    if cur:
        groups.append(cur)
    index_path = path if str(path).endswith(".index.json") else str(path) + ".index.json"
    base = os.path.basename(index_path)[: -len(".index.json")]
    stem = base[: -len(".safetensors")] if base.endswith(".safetensors") else base
    folder = os.path.dirname(os.path.abspath(index_path))
    weight_map = {}
    written = []
    try:
        for i, names in enumerate(groups, start=1):
            shard = f"{stem}-{i:05d}-of-{len(groups):05d}.safetensors"
            sub = {n: tensors[n] for n in names}
            with _atomic(os.path.join(folder, shard)) as tmp:
                st_save(sub, tmp, metadata={"format": "pt", _META_KEY: doc, _CRC_KEY: json.dumps({n: crcs[n] for n in names})})
            written.append(os.path.join(folder, shard))
            weight_map.update({n: shard for n in names})
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()), _META_KEY: doc, _CRC_KEY: json.dumps(crcs)},
            "weight_map": weight_map,
        }
        with _atomic(index_path) as tmp:
            with open(tmp, "w") as f:
                json.dump(index, f, indent=1)
    except BaseException:
        for p in written:
            if os.path.exists(p):
                os.unlink(p)
        raise


def _open_safetensors(path: str):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise ELSAFormatError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size < 8:
        raise ELSAFormatError(f"{path}: truncated file ({size} bytes; a safetensors file starts with an 8-byte header size)")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for malformed headers / truncation
        raise ELSAFormatError(f"{path}: not a readable safetensors file (truncated or corrupted?): {e}") from None


def _shards(path: str):
    """[(shard_path, [names] or None)] and the index metadata (or None) for a file or an index."""
    if str(path).endswith(".index.json"):
        try:
            with open(path) as f:
                index = json.load(f)
            wm = index["weight_map"]
        except FileNotFoundError:
            raise ELSAFormatError(f"{path}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ELSAFormatError(f"{path}: malformed index file ({e})") from None
        folder = os.path.dirname(os.path.abspath(path))
        by_shard = {}
        for n, s in wm.items():
            by_shard.setdefault(s, []).append(n)
        return [(os.path.join(folder, s), ns) for s, ns in by_shard.items()], index.get("metadata", {})
    return [(path, None)], None


def read_meta(path: str) -> ELSAMeta:
    """Read and validate only the metadata document of a file or index (no tensor data).

    Raises:
        ELSAFormatError: missing or malformed document, unknown version, unreadable file.
    """
    shards, imeta = _shards(path)
    md = imeta if imeta is not None else (_open_safetensors(shards[0][0]).metadata() or {})
    if _META_KEY not in md:
        raise ELSAFormatError(f"{path}: not an ELSA checkpoint (no '{_META_KEY}' metadata document); make one with `elsa encode`")
    return ELSAMeta.from_json(md[_META_KEY], source=path)


def load_file(path: str, *, device="cpu", verify_checksums: bool = True) -> ELSAStateDict:
    """Read an ELSA checkpoint (a ``.safetensors`` file or a ``.safetensors.index.json``).

    Returns:
        :class:`ELSAStateDict`: the tensors under their names (batch-norm statistics stripped into
        ``.bn_stats``), ``.meta`` the parsed document.

    Raises:
        ELSAFormatError: missing file, truncated or corrupted file (CRC mismatch names the
            tensor), missing or malformed metadata, a format version from the future, tensors
            listed in the document but absent or of another shape/dtype.
    """
    meta = read_meta(path)
    shards, imeta = _shards(path)
    tensors, crcs = {}, {}
    for shard, names in shards:
        f = _open_safetensors(shard)
        md = f.metadata() or {}
        try:
            crcs.update(json.loads(md.get(_CRC_KEY, "{}")))
        except ValueError:
            raise ELSAFormatError(f"{shard}: malformed checksum table") from None
        for n in names if names is not None else f.keys():
            try:
                tensors[n] = f.get_tensor(n)
            except Exception as e:
                raise ELSAFormatError(f"{shard}: cannot read tensor {n!r} (truncated or corrupted?): {e}") from None
    if verify_checksums:
        for n, t in tensors.items():
            want = crcs.get(n)
            if want is None:
                raise ELSAFormatError(f"{path}: tensor {n!r} has no checksum in the metadata")
            if _crc(t) != want:
                raise ELSAFormatError(f"{path}: tensor {n!r} fails its CRC-32 check (file corrupted)")
    plain, bn = {}, {}
    for alias, target in meta.tied.items():
        if alias in tensors or target not in tensors:
            why = "is also stored" if alias in tensors else f"points to {target!r}, which the file does not hold"
            raise ELSAFormatError(f"{path}: tied tensor {alias!r} {why}")
        tensors[alias] = tensors[target]  # one tensor under both names, as in the model
    for n, t in tensors.items():
        if n.startswith(BN_PREFIX):
            rest = n[len(BN_PREFIX) :]
            lvl, _, modstat = rest.partition(".")
            mod, _, stat = modstat.rpartition(".")
            if not lvl.isdigit() or not mod:
                raise ELSAFormatError(f"{path}: malformed batch-norm statistics name {n!r}")
            bn.setdefault(int(lvl), {}).setdefault(mod, {})[stat] = t
        else:
            plain[n] = t
    for n, info in meta.tensors.items():
        if n not in plain:
            raise ELSAFormatError(f"{path}: encoded tensor {n!r} is listed in the metadata but missing from the file")
        t = plain[n]
        if list(t.shape) != list(info.shape) or str(t.dtype).replace("torch.", "") != info.dtype:
            raise ELSAFormatError(
                f"{path}: tensor {n!r} is {tuple(t.shape)} {t.dtype} but the metadata says {tuple(info.shape)} {info.dtype}"
            )
    if bn and sorted(bn) != list(range(1, meta.num_levels + 2)):
        raise ELSAFormatError(f"{path}: batch-norm statistics for levels {sorted(bn)}, expected 1..{meta.num_levels + 1}")
    if device != "cpu":
        plain = {n: t.to(device) for n, t in plain.items()}
    return ELSAStateDict(plain, meta, bn)


def save_counters(counters: Counters, path: str) -> None:
    """Write :class:`Counters` (uint8 tensors) to a safetensors file, atomically, with T and the
    level structures in the metadata. Read back with :func:`load_counters` or ``elsa encode --counters``."""
    from safetensors.torch import save_file as st_save

    t = {n: c.to(torch.uint8).contiguous() for n, c in counters.items()}
    head = {"num_levels": counters.num_levels, "structures": counters.structures}
    if getattr(counters, "transposed", None):
        head["transposed"] = sorted(counters.transposed)
    md = {"elsa_counters": json.dumps(head)}
    with _atomic(path) as tmp:
        st_save(t, tmp, metadata=md)


def load_counters(path: str) -> Counters:
    """Read a counters file written by :func:`save_counters`.

    Raises:
        ELSAFormatError: unreadable file or no counters metadata.
    """
    f = _open_safetensors(path)
    T, structs, transposed = _counters_header(f, path)
    return Counters({n: f.get_tensor(n) for n in f.keys()}, T, structs, transposed)


def _counters_header(f, path: str) -> tuple:
    try:
        d = json.loads((f.metadata() or {})["elsa_counters"])
        return int(d["num_levels"]), list(d["structures"]), set(d.get("transposed", []))
    except (KeyError, ValueError, TypeError):
        raise ELSAFormatError(f"{path}: not an ELSA counters file (no 'elsa_counters' metadata)") from None


def write_plain(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write a plain safetensors file (any loader reads it), atomically."""
    from safetensors.torch import save_file as st_save

    flat = {n: t.detach().cpu().contiguous().clone() for n, t in tensors.items()}
    with _atomic(path) as tmp:
        st_save(flat, tmp, metadata=dict(metadata or {"format": "pt"}))


# ----------------------------------------------------------------------------------------------
# Streaming encode: tensor by tensor, peak memory near the largest tensor.


def encode_file(
    in_path: str,
    out_path: str,
    *,
    levels=None,
    counters: str | Counters | None = None,
    structure: str = "unstructured",
    distribution: str = "uniform",
    dtype: torch.dtype | None = None,
    code_bits: int | None = None,
    names=None,
    progress: bool = True,
) -> ELSAMeta:
    """Encode a safetensors checkpoint from disk, tensor by tensor, into an ELSA file.

    Peak memory stays near the largest tensor (plus one global-distribution pass over
    magnitudes' histogram), not the checkpoint. The output is written atomically and never over
    the input.

    Args:
        in_path: ``*.safetensors`` or ``*.safetensors.index.json``.
        out_path: the ELSA file (``*.safetensors``).
        levels: magnitude levels, sparsest first (``[0.9, 0.75, 0.5]`` or ``["1:4", "2:4"]``);
            exclusive with ``counters``.
        counters: a counters file (:func:`save_counters`) or :class:`Counters`, e.g. from training.
        structure, distribution, names: as :func:`elsa_codec.magnitude_counters`.
        dtype: convert floating tensors to this dtype first (e.g. ``torch.bfloat16``).
        code_bits: k (default from T).

    Returns:
        The written :class:`ELSAMeta`.

    Raises:
        ELSAError / ELSAFormatError: as :func:`elsa_codec.encode` and :func:`load_file`.
    """
    from tqdm.auto import tqdm

    if (levels is None) == (counters is None):
        raise ELSAError("give exactly one of levels= (magnitude levels) or counters= (a counters file)")
    _check_out_path(out_path, [in_path])
    shards, _ = _shards(in_path)
    handles = {}
    where = {}
    for shard, ns in shards:
        f = _open_safetensors(shard)
        handles[shard] = f
        for n in ns if ns is not None else f.keys():
            where[n] = shard
    all_names = list(where)

    def get(n):
        t = handles[where[n]].get_tensor(n)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    if counters is not None:
        if isinstance(counters, str):  # read the counters file tensor by tensor, too
            cf = _open_safetensors(counters)
            T, structs, transposed = _counters_header(cf, counters)
            sel = list(cf.keys())
            get_counters = cf.get_tensor
        else:
            T, structs, sel = counters.num_levels, list(counters.structures), list(counters)
            transposed = set(getattr(counters, "transposed", ()))
            get_counters = counters.__getitem__
        for n in sel:
            if n not in where:
                raise ELSAError(f"{n}: counters given for a tensor that is not in {in_path}")
        specs = None
    else:
        specs = parse_levels(levels, structure, distribution)
        sps = [s for s, _ in specs]
        T, structs, transposed = len(specs), [str(st) for _, st in specs], set()
        # shape-and-dtype stand-ins, so that selecting tensors reads no tensor data
        stand_ins = {}
        for n in all_names:
            sl = handles[where[n]].get_slice(n)
            kind = torch.float32 if sl.get_dtype() in ("F32", "F16", "BF16", "F64") else torch.int8
            stand_ins[n] = torch.empty([0] * len(sl.get_shape()), dtype=kind)
        sel = select_tensors(names, stand_ins, get, in_path)
        thr = global_thresholds(get, sel, sps) if distribution == "global" and specs[0][1].kind != "nm" else None
    k = default_code_bits(T) if code_bits is None else code_bits

    infos = {}
    header = {}
    crcs = {}
    offset = 0
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out_path)) or ".") as data:
        it = tqdm(all_names, desc="encode", unit="tensor", disable=not progress)
        for n in it:
            x = get(n)
            if n in sel:
                check_code_bits(x.dtype, k, T, name=n)
                if specs is None:
                    c = get_counters(n)
                    if c.shape != x.shape:
                        raise ELSAError(f"{n}: counters have shape {tuple(c.shape)} but the tensor has shape {tuple(x.shape)}")
                    if c.numel() and (int(c.min()) < 1 or int(c.max()) > T + 1):
                        raise ELSAError(f"{n}: counters must lie in 1..{T + 1}, got {int(c.min())}..{int(c.max())}")
                else:
                    c = tensor_magnitude_counters(x, specs, thr, name=n)
                y = encode_tensor(x, c - 1, k, name=n)
                infos[n] = dataclasses.replace(_tensor_info(x, y, c, T), transposed=n in transposed)
                x = y
                del c, y
            x = x.contiguous()
            if x.dtype not in _DTYPES:
                raise ELSAError(f"{n}: dtype {x.dtype} cannot be written")
            buf = x.reshape(-1).view(torch.uint8).numpy() if x.numel() else b""  # a view: no copy
            data.write(buf)
            nbytes = x.numel() * x.element_size()
            header[n] = {"dtype": _DTYPES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + nbytes]}
            crcs[n] = f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"
            offset += nbytes
            del x, buf  # free this tensor before reading the next one
        meta = _make_meta(T, k, structs, infos, {})
        header["__metadata__"] = {"format": "pt", _META_KEY: meta.to_json(), _CRC_KEY: json.dumps(crcs)}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * ((8 - len(hb) % 8) % 8)
        data.seek(0)
        with _atomic(out_path) as tmp:
            with open(tmp, "wb") as out:
                out.write(len(hb).to_bytes(8, "little"))
                out.write(hb)
                while True:
                    chunk = data.read(1 << 24)
                    if not chunk:
                        break
                    out.write(chunk)
    return meta
