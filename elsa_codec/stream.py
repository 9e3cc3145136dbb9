"""Streaming encode of a safetensors checkpoint into an ELSA file, tensor by tensor.

Peak memory stays near the largest tensor, not the checkpoint; the output is byte-identical to
``save_file(encode(...))`` of the same input (the same header writer, :func:`elsa_codec.io.header_bytes`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import zlib

import torch

from .bits import check_code_bits, default_code_bits, encode_tensor
from .codec import _make_meta, _tensor_info, global_thresholds, parse_levels, select_tensors, tensor_magnitude_counters
from .errors import ELSAError
from .codec import Counters
from .io import _DTYPES, _atomic, _check_out_path, _counters_header, _open_safetensors, _shards, data_order, file_metadata, header_bytes, st_dtype

__all__ = ["encode_file"]

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
    crcs = {}
    entries = {}
    for n in all_names:  # the output's dtype and shape of every tensor, before reading any data
        sl = handles[where[n]].get_slice(n)
        code = sl.get_dtype()
        if dtype is not None and code in ("F32", "F16", "BF16", "F64"):
            code = _DTYPES[dtype]
        entries[n] = (code, list(sl.get_shape()))
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(out_path)) or ".") as data:
        it = tqdm(data_order(entries), desc="encode", unit="tensor", disable=not progress)
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
            st_dtype(x, n)
            buf = x.reshape(-1).view(torch.uint8).numpy() if x.numel() else b""  # a view: no copy
            data.write(buf)
            crcs[n] = f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"
            del x, buf  # free this tensor before reading the next one
        infos = {n: infos[n] for n in all_names if n in infos}  # the document lists them in checkpoint order
        meta = _make_meta(T, k, structs, infos, {})
        data.seek(0)
        with _atomic(out_path) as tmp:
            with open(tmp, "wb") as out:
                out.write(header_bytes(entries, file_metadata(meta.to_json(), crcs)))
                while True:
                    chunk = data.read(1 << 24)
                    if not chunk:
                        break
                    out.write(chunk)
    return meta
