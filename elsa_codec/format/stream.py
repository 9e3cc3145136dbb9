"""Streaming encode of a safetensors checkpoint into an ELSA file, chunk by chunk.

Memory: the input is read from a memory map of the file (file-backed pages, not anonymous
memory; each tensor's pages are dropped from the mapping once it is written), and every tensor is
counted, encoded, checksummed and written in flat chunks of ``codec._STAT_CHUNK`` (4M) elements:
unstructured magnitude levels come from histograms of ``|w|``'s bit patterns
(:mod:`elsa_codec.oneshot.stream_counters`), N:M levels per block of whole rows. The anonymous memory
above the import floor is then a few chunks (tens of MB) whatever the tensor or checkpoint size,
once glibc returns freed chunks at once (:func:`limit_heap_retention`, which ``elsa encode``
calls; bench/results/stream-memory/). Block levels (``block:RxC``) rank tiles over the whole tensor:
their counters are computed in memory as :func:`elsa_codec.magnitude_counters` does (about 3x
the tensor while they are computed, then 1 byte per element).

The output is byte-identical to ``save_file(encode(sd, magnitude_counters(sd, levels, ...)))``
of the same state dict (tests/format/test_stream.py): the statistics accumulate over the same
``_STAT_CHUNK`` chunks as :func:`elsa_codec.format.encode._tensor_info`, and the header comes from the
same writer (:func:`elsa_codec.format.file.header_bytes`).

Parallel shards (``jobs=N``): the shards of a sharded input are independent, so N worker processes
(``spawn``) encode one shard each (global thresholds are computed first, in this process, and
passed to them). Every shard's encoded tensors go to a temporary part file beside the output
(named like :func:`elsa_codec.format.atomic.atomic`'s temporaries, so a killed run's parts are removed by the
next write of the same output); this process then writes the header and copies the tensors from
the parts in the file's data order (``os.copy_file_range``), and removes the parts, on success or
error. The output does not depend on N.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import mmap
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Iterator, Mapping

import torch

from ..checks import check_not_input, check_path, check_shard_size, check_target
from ..errors import ELSAError, ELSAFormatError
from ..progress import progress_bar
from .atomic import atomic, new_temporary, release_temporary
from .bits import check_code_bits, default_code_bits, encode_tensor, ulp_error
from .document import ELSAMeta, TensorInfo, _make_meta
from .encode import _STAT_CHUNK, Counters, check_counter_structures
from .file import (
    _DTYPES,
    _ITEM,
    _counters_header,
    _open_safetensors,
    _shards,
    data_order,
    file_metadata,
    header_bytes,
    write_sharded,
)
from .structure import parse_structure

__all__ = ["encode_stream", "limit_heap_retention"]

_FLOAT_CODES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INT_CODES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
#: Flat elements per chunk: the statistics' chunk of ``_tensor_info`` (so the floats agree).
CHUNK = _STAT_CHUNK
_COPY_BYTES = 1 << 24
_SUB = 1 << 18  # elements per slice of the elementwise temporaries


# ----------------------------------------------------------------------------- reading the input


class _MappedFile:
    """A safetensors file read through a private memory map (file-backed pages, no copies).

    Args:
        path: the file; its header is checked as :func:`elsa_codec.format.file._open_safetensors` does.

    Raises:
        ELSAFormatError: unreadable, truncated or corrupted file (names it).
    """

    def __init__(self, path: str):
        self.path = path
        # opened once: the header is parsed and checked from the descriptor that is mapped
        f = _open_safetensors(path, mmap=True)
        self._names = f.keys()
        self._header = {n: {"dtype": c, "shape": s, "data_offsets": [a, b]} for n, (c, s, a, b) in f._entries.items()}
        self._mm, self._base = f._mm, f._base

    def keys(self) -> list:
        """Tensor names, in safetensors' order (sorted)."""
        return list(self._names)

    def _entry(self, name: str) -> dict:
        try:
            return self._header[name]
        except KeyError:
            raise ELSAFormatError(f"{self.path}: no tensor {name!r} (named in the index)") from None

    def code(self, name: str) -> str:
        """The safetensors dtype code (``"F32"``)."""
        return self._entry(name)["dtype"]

    def shape(self, name: str) -> list:
        return list(self._entry(name)["shape"])

    def _range(self, name: str) -> tuple:
        a, b = self._entry(name)["data_offsets"]
        return self._base + a, self._base + b

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes (a view of the map)."""
        a, b = self._range(name)
        return memoryview(self._mm)[a:b] if b > a else memoryview(b"")

    def flat(self, name: str) -> torch.Tensor:
        """The tensor as a flat tensor of its own dtype, a view of the map (a copy only if misaligned).

        Raises:
            ELSAError: the dtype is not a float or integer dtype torch reads (names the tensor).
        """
        code = self.code(name)
        dt = _FLOAT_CODES.get(code) or _INT_CODES.get(code)
        if dt is None:
            raise ELSAError(f"{name}: dtype {code} cannot be read as a tensor here")
        a, b = self._range(name)
        if b <= a:
            return torch.empty(0, dtype=dt)
        t = torch.frombuffer(self._mm, dtype=torch.uint8, count=b - a, offset=a).view(dt)
        return t if t.data_ptr() % t.element_size() == 0 else t.clone()

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this mapping (re-read from the page cache if used again)."""
        a, b = self._range(name)
        page = mmap.PAGESIZE
        lo, hi = -(-a // page) * page, b // page * page
        if self._mm is not None and hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def chunks(self, name: str, convert: torch.dtype | None = None):
        """The tensor's flat chunks of :data:`CHUNK` elements, converted; pages released at the end."""
        yield from chunked(self.flat(name), CHUNK, convert)
        self.release(name)


def limit_heap_retention(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more by its own ``mmap``.

    Freed chunk temporaries then go back to the system at once. By default glibc raises its mmap
    threshold (up to 32 MB) each time a large block is freed, after which the 4M-element chunks'
    temporaries come from the heap and stay resident when freed: 2x the live chunks on a
    bfloat16 checkpoint (bench/results/stream-memory/). Process-wide (``mallopt(M_MMAP_THRESHOLD)``,
    which also stops the raising): ``elsa encode`` and the ``jobs`` workers call it; a program
    calling :func:`encode_file` may. Returns whether it applied (False off glibc).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- what to encode


@dataclasses.dataclass
class _Plan:
    """Everything a worker needs besides its shard (picklable)."""

    T: int
    k: int
    structs: list  # the structure of each level 1..T
    dtype: torch.dtype | None
    selected: set
    source: object = None  # the level source (oneshot.stream.MagnitudeLevels), when no counters are given
    counters_path: str | None = None  # or
    counters: Mapping | None = None  # in-memory counters of the selected tensors
    transposed: set = dataclasses.field(default_factory=set)

    def convert(self, code: str) -> torch.dtype | None:
        """The dtype a tensor of safetensors ``code`` is converted to (None: kept)."""
        return _convert(self.dtype, code)


def _convert(dtype: torch.dtype | None, code: str) -> torch.dtype | None:
    """``dtype`` for a floating safetensors ``code`` when a conversion is asked, else None."""
    return dtype if dtype is not None and code in _FLOAT_CODES else None


def _out_entry(src: _MappedFile, name: str, dtype) -> tuple:
    """``(output dtype code, shape)``; ELSAError for a dtype the writer does not know."""
    code = src.code(name)
    if dtype is not None and code in _FLOAT_CODES:
        code = _DTYPES[dtype]
    if code not in _ITEM:
        raise ELSAError(f"{name}: dtype {code} cannot be written to an ELSA file")
    return code, src.shape(name)


def _counters_plan(counters, where, in_path):
    """``(T, structures, selected names, transposed, counters path or mapping)``."""
    if isinstance(counters, str):
        cf = _MappedFile(counters)
        T, structs, transposed = _counters_header(_open_safetensors(counters), counters)
        sel, src = cf.keys(), counters
    else:
        T, structs, sel = counters.num_levels, list(counters.structures), list(counters)
        transposed, src = set(getattr(counters, "transposed", ())), counters
    for n in sel:
        if n not in where:
            raise ELSAError(f"{n}: counters given for a tensor that is not in {in_path}")
    if len(structs) != T:
        raise ELSAError(f"{in_path}: the counters list {len(structs)} structures for {T} levels")
    return T, [str(parse_structure(s)) for s in structs], sel, transposed, src


# ----------------------------------------------------------------------------- one tensor


class _Stats:
    """:func:`elsa_codec.format.encode._tensor_info` accumulated over its own ``_STAT_CHUNK`` chunks
    (the same floats): level counts, largest ulp error, signal and noise energies.

    The norms are taken over whole chunks, as there (a float64 sum depends on how it is cut);
    the elementwise temporaries are made in slices of :data:`_SUB` elements into one float32
    buffer, which keeps the statistics at one chunk of float32 (16 MB) instead of four."""

    def __init__(self, T: int):
        self.T = T
        self.counts = torch.zeros(T + 2, dtype=torch.int64)
        self.max_ulp, self.signal, self.noise = 0.0, 0.0, 0.0
        self._diff = None

    def add(self, xs: torch.Tensor, ys: torch.Tensor, c: torch.Tensor) -> None:
        """One chunk: original ``xs``, encoded ``ys``, counters ``c`` (flat, aligned to the chunks)."""
        self.counts += torch.bincount(c if c.dtype == torch.uint8 else c.to(torch.int64), minlength=self.T + 2)[: self.T + 2]
        n = xs.numel()
        if self._diff is None or self._diff.numel() < n:
            self._diff = torch.empty(n, dtype=torch.float32)
        diff = self._diff[:n]
        for a in range(0, n, _SUB):  # elementwise: the same values as on the whole chunk
            x, y = xs[a : a + _SUB], ys[a : a + _SUB]
            self.max_ulp = max(self.max_ulp, float(ulp_error(x, y).max()))
            torch.sub(y.to(torch.float32), x.to(torch.float32), out=diff[a : a + _SUB])
        self.signal += float(torch.linalg.vector_norm(xs, dtype=torch.float64)) ** 2
        self.noise += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2

    def info(self, shape: list, dtype: torch.dtype, transposed: bool) -> TensorInfo:
        """The tensor's record, as ``_tensor_info`` computes it."""
        n = _numel(shape)
        kept = torch.cumsum(self.counts[1 : self.T + 2], 0)[: self.T]
        sp = [1.0 - float(kv) / max(n, 1) for kv in kept]
        s, e = self.signal, self.noise
        sq = float("inf") if e == 0.0 else (float("-inf") if s == 0.0 else 10.0 * math.log10(s / e))
        return TensorInfo(shape=list(shape), dtype=str(dtype).replace("torch.", ""), sparsity=sp, max_ulp=self.max_ulp,
                          sqnr_db=sq, transposed=transposed)


def _counter_fn(plan: _Plan, src: _MappedFile, name: str, conv, cfile):
    """``fn(start, stop, chunk) -> counters`` (flat, ``1..T+1``) of one selected tensor: the given
    counters, or the plan's level source (:class:`elsa_codec.oneshot.stream.MagnitudeLevels`)."""
    shape = src.shape(name)
    if plan.source is None:
        c = _given_counters(plan, cfile, name, shape)
        return lambda s, e, ch: c[s:e]
    return plan.source.counter_fn(src, name, conv, CHUNK)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _given_counters(plan: _Plan, cfile, name: str, shape: list) -> torch.Tensor:
    """The flat counters of ``name`` from the counters file (a map view) or mapping, checked.

    Raises:
        ELSAError: another shape, or values outside ``1..T+1`` (names the tensor).
    """
    if cfile is not None:
        cshape, c = cfile.shape(name), cfile.flat(name)
    else:
        c = plan.counters[name]
        cshape, c = list(c.shape), c.reshape(-1)
    if list(cshape) != list(shape):
        raise ELSAError(f"{name}: counters have shape {tuple(cshape)} but the tensor has shape {tuple(shape)}")
    if c.is_floating_point():
        raise ELSAError(f"{name}: counters must be an integer tensor, got dtype {c.dtype}")
    if c.numel():
        lo = min(int(ch.min()) for ch in chunked(c, CHUNK))
        hi = max(int(ch.max()) for ch in chunked(c, CHUNK))
        if lo < 1 or hi > plan.T + 1:
            raise ELSAError(f"{name}: counters must lie in 1..{plan.T + 1}, got {lo}..{hi}")
        check_counter_structures(name, c.reshape(shape), plan.structs, name in plan.transposed)
    return c


def _encode_one(out, src: _MappedFile, name: str, plan: _Plan, cfile) -> tuple:
    """Encode (or copy) one tensor into the open binary file ``out``, chunk by chunk.

    Returns:
        ``(bytes written, CRC-32 hex, TensorInfo or None)``.

    Raises:
        ELSAError: dtype without code bits for T, non-finite weights, bad counters (names the tensor).
    """
    code = src.code(name)
    conv = plan.convert(code)
    if name not in plan.selected:
        return _copy_one(out, src, name, conv) + (None,)
    dt = conv or _FLOAT_CODES.get(code) or _INT_CODES.get(code)
    check_code_bits(dt, plan.k, plan.T, name=name)
    counters = _counter_fn(plan, src, name, conv, cfile)
    stats, crc, nbytes, s = _Stats(plan.T), 0, 0, 0
    for xs in src.chunks(name, conv):
        c = counters(s, s + xs.numel(), xs)
        y = encode_tensor(xs, c - 1, plan.k, name=name)
        stats.add(xs, y, c)
        b = y.view(torch.uint8).numpy()
        crc = zlib.crc32(b, crc)
        out.write(b)
        nbytes += b.nbytes
        s += xs.numel()
        del c, y, b, xs
    return nbytes, f"{crc & 0xFFFFFFFF:08x}", stats.info(src.shape(name), dt, name in plan.transposed)


def _copy_one(out, src: _MappedFile, name: str, conv) -> tuple:
    """Copy (converting floats to ``conv``) a tensor that is not encoded: ``(bytes, CRC-32 hex)``."""
    crc, nbytes = 0, 0
    if conv is None:
        raw = src.raw(name)
        for a in range(0, len(raw), _COPY_BYTES):
            crc = zlib.crc32(raw[a : a + _COPY_BYTES], crc)
            out.write(raw[a : a + _COPY_BYTES])
        nbytes = len(raw)
        raw.release()
        src.release(name)
    else:
        for xs in src.chunks(name, conv):
            b = xs.contiguous().view(torch.uint8).numpy()
            crc = zlib.crc32(b, crc)
            out.write(b)
            nbytes += b.nbytes
    return nbytes, f"{crc & 0xFFFFFFFF:08x}"


# ----------------------------------------------------------------------------- one shard (a worker)


@dataclasses.dataclass
class _ShardJob:
    """One input shard's work: its tensors (in the output's data order) into one part file."""

    shard: str
    names: list  # in the output's data order
    part: str  # temporary file for the encoded bytes
    plan: _Plan
    threads: int | None = None


def _encode_shard(job: _ShardJob, tick=None) -> dict:
    """Encode one input shard's tensors into ``job.part`` (a worker's entry point).

    Returns:
        ``{name: (part path, offset, bytes, CRC-32 hex, TensorInfo or None)}``.
    """
    if job.threads:  # a worker process
        torch.set_num_threads(job.threads)
        limit_heap_retention()
    src = _MappedFile(job.shard)
    cfile = _MappedFile(job.plan.counters_path) if job.plan.counters_path else None
    res = {}
    with open(job.part, "wb") as out:
        for n in job.names:
            off = out.tell()
            nbytes, crc, info = _encode_one(out, src, n, job.plan, cfile)
            res[n] = (job.part, off, nbytes, crc, info)
            if tick is not None:
                tick()
    return res


def _run_jobs(jobs: list, workers: int, progress: bool) -> dict:
    """Run the shard jobs here (``workers <= 1``) or in ``workers`` spawned processes."""
    out = {}
    if workers <= 1 or len(jobs) <= 1:
        with progress_bar(total=sum(len(j.names) for j in jobs), desc="encode", unit="tensor", enabled=progress) as bar:
            for job in jobs:
                out.update(_encode_shard(job, bar.update))
        return out
    threads = max(1, torch.get_num_threads() // workers)
    ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futs = [ex.submit(_encode_shard, dataclasses.replace(j, threads=threads)) for j in jobs]
        with progress_bar(total=len(jobs), desc="encode", unit="shard", enabled=progress) as bar:
            for fut in as_completed(futs):
                out.update(fut.result())
                bar.update()
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    return out


# ----------------------------------------------------------------------------- writing the output


@contextlib.contextmanager
def _part_files(out_path: str, count: int):
    """``count`` temporary files beside ``out_path``, removed on exit (success or error).

    Named like :func:`elsa_codec.format.atomic.atomic`'s temporaries of ``out_path`` (its stale-file cleanup
    removes them if this process is killed) and registered as in use meanwhile.
    """
    paths = []
    try:
        for _ in range(count):
            paths.append(new_temporary(out_path))
        yield paths
    finally:
        for p in paths:
            release_temporary(p)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` (in the kernel if it can)."""
    while count > 0:
        try:
            done = os.copy_file_range(src_fd, dst_fd, count, offset)
        except (AttributeError, OSError):
            done = os.write(dst_fd, os.pread(src_fd, min(count, _COPY_BYTES), offset))
        if done <= 0:
            raise ELSAError(f"short copy from a temporary part file ({count} bytes left)")
        offset += done
        count -= done


def _write_body(tmp: str, entries: dict, doc: str, res: dict) -> None:
    """Write one safetensors file of ``entries`` into the temporary ``tmp``: header, then the
    parts' tensors."""
    crcs = {n: res[n][3] for n in entries}
    fds = {}
    dst = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        head = header_bytes(entries, file_metadata(doc, crcs))
        while head:
            head = head[os.write(dst, head):]
        for n in data_order(entries):
            part, off, nbytes = res[n][:3]
            if part not in fds:
                fds[part] = os.open(part, os.O_RDONLY)
            _copy_range(fds[part], dst, off, nbytes)
    finally:
        os.close(dst)
        for fd in fds.values():
            os.close(fd)


def _write_file(path: str, entries: dict, doc: str, res: dict) -> None:
    """Write one safetensors file of ``entries`` crash-safely (:func:`~elsa_codec.format.atomic.atomic`)."""
    with atomic(path) as tmp:
        _write_body(tmp, entries, doc, res)


def _write_sharded(index_path: str, names: list, entries: dict, doc: str, res: dict, limit: int, inputs: list) -> None:
    """Write shards and the index as ``save_file(..., index_path, max_shard_size=limit)`` does
    (same names, same bytes: :func:`elsa_codec.format.file.write_sharded`)."""
    sizes = {n: _ITEM[entries[n][0]] * _numel(entries[n][1]) for n in names}
    write_sharded(index_path, names, sizes, limit, doc, {n: res[n][3] for n in names},
                  lambda tmp, g: _write_body(tmp, {n: entries[n] for n in g}, doc, res),
                  check_name=lambda p: check_not_input(p, inputs))


# ----------------------------------------------------------------------------- the entry point


def encode_stream(
    in_path: str,
    out_path: str,
    *,
    counters: str | Counters | None = None,
    source=None,
    dtype: torch.dtype | None = None,
    code_bits: int | None = None,
    progress: bool = True,
    jobs: int = 1,
    max_shard_size=None,
) -> ELSAMeta:
    """Encode a safetensors checkpoint from disk, chunk by chunk, into an ELSA file, with the given
    ``counters`` (a counters file or :class:`Counters`) or the counters a level ``source`` makes
    (:class:`elsa_codec.oneshot.stream.MagnitudeLevels`: ``select(files, where, dtype, in_path)``,
    ``num_levels``, ``structures``, ``counter_fn(src, name, conv, chunk)``).

    The user-facing call is :func:`elsa_codec.encode_file`, which documents the arguments, the
    memory and the output; this is its format-layer half (reading, encoding, writing).

    Raises:
        ELSAError / ELSAFormatError: as :func:`elsa_codec.encode_file`.
    """
    in_path = check_path(in_path, "in_path", "encode_file", order="encode_file(in_path, out_path, levels=...)")
    out_path = check_path(out_path, "out_path", "encode_file", order="encode_file(in_path, out_path, levels=...)")
    if (source is None) == (counters is None):
        raise ELSAError("give exactly one of levels= (magnitude levels) or counters= (a counters file)")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ELSAError(f"jobs must be a positive int, got {jobs!r}")
    shards, _ = _shards(in_path)
    inputs = [in_path] + [s for s, _ in shards]
    check_not_input(out_path, inputs)
    check_target(out_path, what="out_path")
    files = {s: _MappedFile(s) for s, _ in shards}
    where = _where(in_path, shards, files)
    entries = {n: _out_entry(files[s], n, dtype) for n, s in where.items()}
    plan = _make_plan(files, where, source, counters, dtype, code_bits, in_path)
    sharded = max_shard_size is not None or str(out_path).endswith(".index.json")
    target = out_path if not sharded or str(out_path).endswith(".index.json") else str(out_path) + ".index.json"
    with _part_files(target, len(files)) as parts:  # named as the target's temporaries: a killed run's are removed
        meta, res = _encode_parts(files, where, entries, plan, parts, jobs, progress)
        doc = meta.to_json()
        if sharded:
            limit = check_shard_size(max_shard_size) if max_shard_size is not None else 5 * 10**9
            _write_sharded(target, list(where), entries, doc, res, limit, inputs)
        else:
            _write_file(out_path, entries, doc, res)
    return meta


def _where(in_path: str, shards: list, files: dict) -> dict:
    """``{tensor name: shard path}`` of the input; an index's ``weight_map`` must list exactly
    the tensors of each shard (a tensor in a shard but not in the map would be dropped)."""
    where = {}
    for shard, ns in shards:
        have = files[shard].keys()
        if ns is not None:
            extra, missing = sorted(set(have) - set(ns)), sorted(set(ns) - set(have))
            if extra:
                raise ELSAFormatError(f"{in_path}: shard {os.path.basename(shard)} holds tensor {extra[0]!r} that the index's "
                                      f"weight_map does not list ({len(extra)} such): it would be dropped; fix the index "
                                      "(list every tensor of every shard)")
            if missing:
                raise ELSAFormatError(f"{in_path}: the weight_map puts tensor {missing[0]!r} in shard "
                                      f"{os.path.basename(shard)}, which does not hold it ({len(missing)} such)")
        for n in ns if ns is not None else have:
            where[n] = shard
    return where


def _encode_parts(files, where, entries, plan, parts, jobs, progress) -> tuple:
    """Encode every shard into its part file (``jobs`` workers); ``(meta, name -> the workers' result)``."""
    order = data_order(entries)
    jobs_list = [_shard_job(s, [n for n in order if where[n] == s], part, plan) for s, part in zip(files, parts)]
    jobs_list.sort(key=lambda j: -os.path.getsize(j.shard))  # the largest shards first
    res = _run_jobs(jobs_list, jobs, progress)
    infos = {n: res[n][4] for n in where if res[n][4] is not None}  # in checkpoint order
    return _make_meta(plan.T, plan.k, plan.structs, infos, {}), res


def _shard_job(shard: str, names: list, part: str, plan: _Plan) -> _ShardJob:
    """A shard's job; an in-memory counters mapping is cut to the shard's tensors (workers get a copy)."""
    if plan.counters is not None:
        plan = dataclasses.replace(plan, counters={n: plan.counters[n] for n in names if n in plan.counters})
    return _ShardJob(shard, names, part, plan)


def _make_plan(files, where, source, counters, dtype, code_bits, in_path) -> _Plan:
    """The :class:`_Plan` of an encode (selection, T, k, and the counters or their source)."""
    if counters is not None:
        T, structs, sel, transposed, src = _counters_plan(counters, where, in_path)
        is_path = isinstance(src, str)
        plan = _Plan(T, 0, structs, dtype, set(sel), counters_path=src if is_path else None,
                     counters=None if is_path else {n: src[n] for n in sel}, transposed=transposed)
    else:
        sel = source.select(files, where, dtype, in_path)
        plan = _Plan(source.num_levels, 0, list(source.structures), dtype, set(sel), source=source,
                     transposed=set(getattr(source, "transposed", ())) & set(sel))
    plan.k = default_code_bits(plan.T) if code_bits is None else code_bits
    for n in sel:  # before any work: the output dtype of every encoded tensor holds k bits and T levels
        code = files[where[n]].code(n)
        check_code_bits(plan.convert(code) or _FLOAT_CODES.get(code) or _INT_CODES.get(code), plan.k, plan.T, name=n)
    return plan


def chunked(flat: torch.Tensor, size: int, convert: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``flat`` of ``size`` elements, each converted to ``convert`` if given."""
    for s in range(0, flat.numel(), size):
        ch = flat[s : s + size]
        yield ch.to(convert) if convert is not None else ch
