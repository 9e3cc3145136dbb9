"""Packed sparse levels on the CPU: the formats, the packer and the product (``sparse-cpu`` backend).

ELSA (Halvachi et al., arXiv 2312.06872), section 2.2: level ``t`` of an encoded weight keeps the
weights whose code (the ``k`` low mantissa bits) is below ``t``, with their exact bits. On a CPU at
batch 1 a product is a weight stream, so a sparse level pays only if fewer bytes are read:
:func:`pack_level` reads the encoded weight once and writes only the kept weights in one of three
layouts (kernels in ``elsa_codec/kernels/cpu/elsa_cpu.cpp``, built by :mod:`elsa_codec.native`):

- ``"csr"``: kept values + 16-bit column indices (32-bit when ``in_features > 65535``), each row
  padded to a multiple of 8 entries; the product gathers 8 inputs per step. Best below ~35% density.
  A level of :class:`~elsa_codec.kernels.cpu.nested.NestedLevels` (every sparse level in one packed
  form, :func:`~elsa_codec.kernels.cpu.nested.pack_nested`) is a csr level of several segments:
  its ``rowptr`` is 2-D `[t, N + 1]`, row ``n`` being the entries ``rowptr[g, n] .. rowptr[g, n + 1]
  - 1`` of every segment ``g < t``.
- ``"bitmask"``: kept values + 1 bit per weight; the product compresses 8 inputs per mask byte with
  one permute. Fewest bytes above ~35% density (2:4 levels, 50% levels).
- ``"bsr"``: ``block:RxC`` levels with ``R >= 8``: the kept blocks, dense, column by column.
- ``"nm"``: ``N:M`` levels: ``n`` entries per group of ``m`` columns (value + 1-byte offset in the
  group), no row pointers; groups keeping fewer are padded with value 0.

Every format is exact for any mask it can hold (``nm`` only N:M masks); which one serves a level,
and for which batch sizes, is decided by :mod:`elsa_codec.kernels.cpu.planner` (by measuring).
:func:`sparse_linear` computes ``x @ W_t^T + b`` from the packed level, accumulating in float32:
M = 1 streams the packed weight against x; M > 1 runs register-blocked kernels on x cut into
panels of 16-64 columns (AVX-512 where the CPU has it, AVX2 else; ``elsa_cpu_mm.cpp``).
:func:`pack_level_reference` / :func:`sparse_linear_reference` are the pure-PyTorch references.
"""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ELSAError
from ...format.bits import bits_view, check_code_bits

__all__ = [
    "FORMATS",
    "PackedLevel",
    "csr_from_bitmask",
    "pack_level",
    "pack_level_reference",
    "panel_width",
    "panels",
    "sparse_linear",
    "sparse_linear_reference",
    "unpack",
    "unpack_reference",
]

#: The packed layouts (see the module docstring).
FORMATS = ("csr", "bitmask", "bsr", "nm")
_DT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PAD = 8  # values / indices read past the last entry by the 8-lane loads


@dataclasses.dataclass
class PackedLevel:
    """One level of one weight `[out_features, in_features]`, packed for the CPU kernels.

    Attributes:
        format: ``"csr"``, ``"bitmask"`` or ``"bsr"``.
        shape: ``(out_features, in_features)`` of the weight.
        dtype: the weight's dtype (values keep their exact bits).
        level: the level ``t`` packed.
        nnz: kept weights (stored entries for ``bsr``, padding excluded for ``csr``).
        tensors: the format's arrays: ``rowptr`` int64 `[N + 1]`, ``col`` uint16/int32 `[nnz]`,
            ``val`` `[nnz + 8]` (csr; a level of a nested csr: ``rowptr`` int64 `[t, N + 1]`, one row
            of starts per segment, see the module docstring); ``rowptr``, ``mask`` uint8 `[N, ceil(K / 8)]`, ``val``
            (bitmask); ``browptr`` int64 `[ceil(N / R) + 1]`, ``bcol`` int32 `[blocks]`, ``bval``
            `[blocks * C * R8 + 8]` (bsr, ``R8`` = R rounded up to 8).
            ``idx`` uint8 `[N, E]`, ``val`` `[N * E + 8]` (nm, ``E = ceil(K / m) * n``).
        block: ``(R, C)`` for ``bsr``.
        group: ``(n, m)`` for ``nm``.
    """

    format: str
    shape: tuple
    dtype: torch.dtype
    level: int
    nnz: int
    tensors: dict
    block: tuple = (0, 0)
    group: tuple = (0, 0)

    def arrays(self) -> tuple:
        """The format's arrays as the kernels take them, after the leading sizes (``csr``: rowptr,
        rowend (``rowptr + 1``), segments, segment stride, col, index bytes, val; ``bitmask``: mask bytes per row, rowptr, mask, val; ``bsr``: R, R8, C,
        browptr, bcol, bval; ``nm``: E, n, m, idx, val): one list for the M = 1 and M > 1 products
        and for unpack."""
        t = self.tensors
        if self.format == "nm":
            return t["idx"].shape[1], *self.group, t["idx"].data_ptr(), t["val"].data_ptr()
        if self.format == "csr":
            rp = t["rowptr"]
            nseg, ld = (rp.shape[0], rp.stride(0)) if rp.dim() == 2 else (1, 0)  # row n of segment g ends where n + 1 starts
            return (rp.data_ptr(), rp.data_ptr() + 8, nseg, ld, t["col"].data_ptr(), t["col"].element_size(),
                    t["val"].data_ptr())
        if self.format == "bitmask":
            return t["mask"].shape[1], t["rowptr"].data_ptr(), t["mask"].data_ptr(), t["val"].data_ptr()
        R, C = self.block
        return R, -(-R // 8) * 8, C, t["browptr"].data_ptr(), t["bcol"].data_ptr(), t["bval"].data_ptr()

    def mv(self, x_ptr: int, bias_ptr, y_ptr: int, threads: int) -> None:
        """The M = 1 kernel on raw pointers (x float32 `[K padded]`, bias float32 `[N]` or None,
        y float32 `[N]`), its constant arguments bound once (keeps the per-call cost low)."""
        fn = self.__dict__.get("_mv")
        if fn is None:
            fn = self._mv = _bind_mv(_lib(), self)
        fn(x_ptr, bias_ptr, y_ptr, threads)

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed arrays; for a level of a nested csr (a 2-D ``rowptr``), the bytes
        its products read: its segments' ``val`` + ``col`` (padding and the 8 trailing entries
        included, as a plain csr level counts them) plus its ``rowptr`` rows, not the entries of the
        denser levels that share the arrays (:attr:`NestedLevels.nbytes` counts those)."""
        t = self.tensors
        rp = t.get("rowptr")
        if self.format != "csr" or rp.dim() == 1:
            return sum(v.numel() * v.element_size() for v in t.values())
        entries = int((rp[:, -1] - rp[:, 0]).sum()) + _PAD
        return entries * (t["col"].element_size() + t["val"].element_size()) + rp.numel() * 8

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / max(1, n * k)

    def __repr__(self) -> str:
        blk = f" {self.block[0]}x{self.block[1]}" if self.format == "bsr" else ""
        blk = f" {self.group[0]}:{self.group[1]}" if self.format == "nm" else blk
        return (f"PackedLevel({self.format}{blk}, level={self.level}, shape={tuple(self.shape)}, "
                f"{str(self.dtype).replace('torch.', '')}, density={self.density:.3f}, {self.nbytes / 2**20:.2f} MiB)")


# -- packing ---------------------------------------------------------------------------------------
def _check_weight(w: torch.Tensor, level: int, code_bits: int, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ELSAError(f"{name}: the encoded weight must be a 2-D tensor [out_features, in_features], got {getattr(w, 'shape', type(w))}")
    if w.dtype not in _DT:
        raise ELSAError(f"{name}: dtype {w.dtype} has no ELSA codes (float32, bfloat16, float16)")
    if w.device.type != "cpu":
        raise ELSAError(f"{name}: the sparse-cpu backend needs a CPU tensor, got one on {w.device}")
    check_code_bits(w.dtype, code_bits, name=name)
    if not isinstance(level, int) or level < 1:
        raise ELSAError(f"{name}: level must be an int >= 1, got {level!r}")


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rowptr(counts: torch.Tensor) -> torch.Tensor:
    rp = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rp[1:])
    return rp


def _csr_arrays(counts: torch.Tensor, K: int, store: torch.dtype) -> tuple:
    """``(rowptr, col, index bytes, val)`` of a csr level with ``counts`` kept weights per row: rows
    padded to multiples of 8 entries, the arrays uninitialised except the entries past the last row
    (the packer writes every row's entries and padding)."""
    rp = _rowptr((counts + 7) // 8 * 8)
    total = int(rp[-1])
    idx_dt, isz = (torch.int16, 2) if K <= 65536 else (torch.int32, 4)
    col = torch.empty(total + _PAD, dtype=idx_dt)
    val = torch.empty(total + _PAD, dtype=store)
    col[total:].zero_()
    val[total:].zero_()
    return rp, col, isz, val


def pack_level(weight: torch.Tensor, level: int, code_bits: int, fmt: str = "csr", block=(0, 0), *,
               group=(0, 0), threads: int | None = None, name: str = "weight") -> PackedLevel:
    """Pack level ``level`` of the encoded ``weight`` `[N, K]` (float32 / bfloat16 / float16, CPU,
    any strides: a transposed view is read in place) in format ``fmt`` with the C++ kernels (one read of the weight); ``block``
    ``(R, C)`` for ``"bsr"``, ``group`` ``(n, m)`` for ``"nm"``.

    Raises:
        ELSAError: the kernels are unavailable, bad weight / level / format (names ``name``), a
            group of ``m`` columns keeping more than ``n`` weights (``"nm"``).

    Example::

        >>> w = ec.encode_tensor(torch.randn(64, 128), torch.randint(0, 4, (64, 128)), 2)
        >>> p = pack_level(w, 2, 2, "bitmask")   # level 2 of 3: the weights whose code is < 2
        >>> sparse_linear(torch.randn(5, 128), p).shape
        torch.Size([5, 64])
    """
    from ...native import cpu_kernels, cpu_kernels_error

    _check_weight(weight, level, code_bits, name)
    if fmt not in FORMATS:
        raise ELSAError(f"{name}: format must be one of {FORMATS}, got {fmt!r}")
    lib = cpu_kernels()
    if lib is None:
        raise ELSAError(f"{name}: the CPU sparse kernels are unavailable ({cpu_kernels_error()})")
    w = weight  # any strides: a transposed Conv1D weight is read in place, never copied
    N, K = w.shape
    es, nt = w.element_size(), threads or torch.get_num_threads()
    args = (w.data_ptr(), es, N, K, w.stride(0), w.stride(1), code_bits, level)
    store = torch.float32 if w.dtype == torch.float32 else torch.int16  # values move as bits
    if fmt == "bsr":
        return _pack_bsr(lib, w, args, level, block, nt, store)
    if fmt == "nm":
        return _pack_nm(lib, w, args, level, group, nt, store, name)
    counts = torch.empty(N, dtype=torch.int64)
    lib.elsa_count_rows(*args, counts.data_ptr(), nt)
    nnz = int(counts.sum())
    if fmt == "csr":
        rp, col, isz, val = _csr_arrays(counts, K, store)
        lib.elsa_pack_csr(*args, rp.data_ptr(), col.data_ptr(), isz, val.data_ptr(), nt)
        tensors = {"rowptr": rp, "col": col, "val": val.view(w.dtype)}
    else:
        rp = _rowptr(counts)
        KB = (K + 7) // 8
        mask = torch.empty(N, KB, dtype=torch.uint8)
        val = torch.empty(nnz + _PAD, dtype=store)  # the packer writes every entry
        val[nnz:].zero_()
        lib.elsa_pack_bitmask(*args, rp.data_ptr(), mask.data_ptr(), KB, val.data_ptr(), nt)
        tensors = {"rowptr": rp, "mask": mask, "val": val.view(w.dtype)}
    return PackedLevel(fmt, (N, K), w.dtype, level, nnz, tensors)


def csr_from_bitmask(packed: PackedLevel, *, threads: int | None = None) -> PackedLevel:
    """The ``"csr"`` form of a ``"bitmask"`` level, from its mask and values alone (the encoded
    weight is not read again): the same level, bit for bit, as :func:`pack_level` with ``"csr"``.

    Raises:
        ELSAError: ``packed`` is not a bitmask level; the kernels are unavailable.

    Example::

        >>> w = ec.encode_tensor(torch.randn(64, 128), torch.randint(0, 4, (64, 128)), 2)
        >>> p = csr_from_bitmask(pack_level(w, 2, 2, "bitmask"))
        >>> p.format, torch.equal(unpack(p), unpack(pack_level(w, 2, 2, "csr")))
        ('csr', True)
    """
    from ...native import cpu_kernels, cpu_kernels_error

    if not isinstance(packed, PackedLevel) or packed.format != "bitmask":
        raise ELSAError(f"csr_from_bitmask needs a bitmask PackedLevel, got {getattr(packed, 'format', type(packed).__name__)!r}")
    lib = cpu_kernels()
    if lib is None:
        raise ELSAError(f"csr_from_bitmask: the CPU sparse kernels are unavailable ({cpu_kernels_error()})")
    N, K = packed.shape
    brp, mask, bval = packed.tensors["rowptr"], packed.tensors["mask"], packed.tensors["val"]
    rp, col, isz, val = _csr_arrays(brp[1:] - brp[:-1], K, bval.dtype)
    lib.elsa_bitmask_to_csr(N, mask.shape[1], brp.data_ptr(), mask.data_ptr(), bval.data_ptr(), bval.element_size(),
                            rp.data_ptr(), col.data_ptr(), isz, val.data_ptr(), threads or torch.get_num_threads())
    return PackedLevel("csr", (N, K), packed.dtype, packed.level, packed.nnz, {"rowptr": rp, "col": col, "val": val})


def _pack_bsr(lib, w, args, level, block, nt, store) -> PackedLevel:
    R, C = (int(b) for b in block)
    if R < 1 or C < 1:
        raise ELSAError(f"bsr needs a block (R, C) of positive sizes, got {block!r}")
    N, K = w.shape
    NBR, NBC = -(-N // R), -(-K // C)
    R8 = -(-R // 8) * 8
    keep = torch.empty(NBR, NBC, dtype=torch.uint8)
    bcount = torch.empty(NBR, dtype=torch.int64)
    lib.elsa_bsr_blocks(*args, R, C, keep.data_ptr(), bcount.data_ptr(), nt)
    bp = _rowptr(bcount)
    nb = int(bp[-1])
    bcol = torch.empty(nb, dtype=torch.int32)
    bval = torch.zeros(nb * C * R8 + _PAD, dtype=store)
    lib.elsa_pack_bsr(*args, R, C, R8, keep.data_ptr(), bp.data_ptr(), bcol.data_ptr(), bval.data_ptr(), nt)
    counts = torch.empty(N, dtype=torch.int64)
    lib.elsa_count_rows(*args, counts.data_ptr(), nt)
    nnz = int(counts.sum())  # the weights the level keeps, inside the stored blocks
    return PackedLevel("bsr", (N, K), w.dtype, level, nnz, {"browptr": bp, "bcol": bcol, "bval": bval.view(w.dtype)}, (R, C))


def _check_group(group, K: int, name: str) -> tuple:
    n, m = (int(v) for v in group)
    if not 1 <= n <= m <= 256:
        raise ELSAError(f"{name}: the nm format needs a group (n, m) with 1 <= n <= m <= 256, got {group!r}")
    return n, m


def _pack_nm(lib, w, args, level, group, nt, store, name) -> PackedLevel:
    N, K = w.shape
    n, m = _check_group(group, K, name)
    E = -(-K // m) * n
    idx = torch.zeros(N, E, dtype=torch.uint8)
    val = torch.zeros(N * E + _PAD, dtype=store)
    bad = lib.elsa_pack_nm(*args, n, m, E, idx.data_ptr(), val.data_ptr(), nt)
    if bad:
        raise ELSAError(f"{name}: level {level} is not {n}:{m}: {bad} groups of {m} columns keep more than {n} weights")
    counts = torch.empty(N, dtype=torch.int64)
    lib.elsa_count_rows(*args, counts.data_ptr(), nt)
    return PackedLevel("nm", (N, K), w.dtype, level, int(counts.sum()), {"idx": idx, "val": val.view(w.dtype)},
                       group=(n, m))


def pack_level_reference(weight: torch.Tensor, level: int, code_bits: int, fmt: str = "csr", block=(0, 0), *,
                         group=(0, 0)) -> PackedLevel:
    """Pure-PyTorch :func:`pack_level` (same arrays, bit for bit); the reference of the kernels."""
    _check_weight(weight, level, code_bits, "weight")
    N, K = weight.shape
    keep = bits_view(weight.contiguous()).bitwise_and((1 << code_bits) - 1) < level
    wl = torch.where(keep, weight, torch.zeros((), dtype=weight.dtype))
    nnz = int(keep.sum())
    if fmt == "bsr":
        return _bsr_reference(wl, keep, level, block, nnz)
    if fmt == "nm":
        return _nm_reference(wl, keep, level, group, nnz)
    counts = keep.sum(1)
    if fmt == "csr":
        pc = (counts + 7) // 8 * 8
        rp = _rowptr(pc)
        total = int(rp[-1])
        col = torch.zeros(total + _PAD, dtype=torch.int16 if K <= 65536 else torch.int32)
        val = torch.zeros(total + _PAD, dtype=weight.dtype)
        rows, cols = keep.nonzero(as_tuple=True)
        pos = rp[rows] + (torch.arange(rows.numel()) - _rowptr(counts)[rows])
        col[pos] = cols.to(col.dtype)
        val[pos] = weight[rows, cols]
        return PackedLevel("csr", (N, K), weight.dtype, level, nnz, {"rowptr": rp, "col": col, "val": val})
    KB = (K + 7) // 8
    bitsk = torch.zeros(N, KB * 8, dtype=torch.uint8)
    bitsk[:, :K] = keep.to(torch.uint8)
    mask = (bitsk.view(N, KB, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    val = torch.zeros(nnz + _PAD, dtype=weight.dtype)
    val[:nnz] = weight[keep]
    return PackedLevel("bitmask", (N, K), weight.dtype, level, nnz, {"rowptr": _rowptr(counts), "mask": mask, "val": val})


def _bsr_reference(wl, keep, level, block, nnz) -> PackedLevel:
    R, C = block
    N, K = wl.shape
    NBR, NBC = -(-N // R), -(-K // C)
    R8 = -(-R // 8) * 8
    kp = torch.zeros(NBR * R, NBC * C, dtype=torch.bool)
    kp[:N, :K] = keep
    blocks_kept = kp.view(NBR, R, NBC, C).any(3).any(1)  # [NBR, NBC]
    wp = torch.zeros(NBR, R8, NBC, C, dtype=wl.dtype)
    wfull = torch.zeros(NBR * R, NBC * C, dtype=wl.dtype)
    wfull[:N, :K] = wl
    wp[:, :R] = wfull.view(NBR, R, NBC, C)
    br, bc = blocks_kept.nonzero(as_tuple=True)
    bval = wp.permute(0, 2, 3, 1)[br, bc]  # [blocks, C, R8]
    flat = torch.zeros(bval.numel() + _PAD, dtype=wl.dtype)
    flat[: bval.numel()] = bval.reshape(-1)
    return PackedLevel("bsr", (N, K), wl.dtype, level, nnz,
                       {"browptr": _rowptr(blocks_kept.sum(1)), "bcol": bc.to(torch.int32), "bval": flat}, (R, C))


def _nm_reference(wl, keep, level, group, nnz) -> PackedLevel:
    N, K = wl.shape
    n, m = _check_group(group, K, "weight")
    G = -(-K // m)
    kp = torch.zeros(N, G * m, dtype=torch.bool)
    kp[:, :K] = keep
    kg = kp.view(N, G, m)
    if kg.numel() and int(kg.sum(-1).max()) > n:
        raise ELSAError(f"weight: level {level} is not {n}:{m}")
    wp = torch.zeros(N, G * m, dtype=wl.dtype)
    wp[:, :K] = wl
    # the kept offsets of each group in column order, then offset 0 (value 0) as padding
    order = torch.argsort((~kg).to(torch.int8), dim=-1, stable=True)[..., :n]  # [N, G, n]
    took = torch.gather(kg, -1, order)
    vals = torch.gather(wp.view(N, G, m), -1, order)
    vals = torch.where(took, vals, torch.zeros((), dtype=wl.dtype))
    idx = torch.where(took, order, torch.zeros((), dtype=order.dtype)).to(torch.uint8).view(N, G * n)
    val = torch.zeros(N * G * n + _PAD, dtype=wl.dtype)
    val[: N * G * n] = vals.reshape(-1)
    return PackedLevel("nm", (N, K), wl.dtype, level, nnz, {"idx": idx, "val": val}, group=(n, m))


def unpack(packed: PackedLevel, *, threads: int | None = None) -> torch.Tensor:
    """The level's weight `[N, K]` (packed dtype) rebuilt from the packed arrays (C++ kernels; the
    PyTorch reference :func:`unpack_reference` where they are unavailable): equal, bit for bit, to
    :func:`elsa_codec.extract_level` of the weight it was packed from. Reads only the packed level
    (never the encoded weight, so a memory-mapped file stays out of memory)."""
    from ...native import cpu_kernels

    lib = cpu_kernels()
    if lib is None:
        return unpack_reference(packed)
    N, K = packed.shape
    out = torch.zeros(N, K, dtype=packed.dtype)
    getattr(lib, f"elsa_unpack_{packed.format}")(N, K, *packed.arrays(), packed.dtype.itemsize, out.data_ptr(),
                                                 threads or torch.get_num_threads())
    return out


def unpack_reference(packed: PackedLevel) -> torch.Tensor:
    """Pure-PyTorch :func:`unpack`."""
    N, K = packed.shape
    t = packed.tensors
    out = torch.zeros(N, K, dtype=packed.dtype)
    if packed.format == "bsr":
        R, C = packed.block
        NBR, NBC = -(-N // R), -(-K // C)
        R8 = -(-R // 8) * 8
        nb = t["bcol"].numel()
        blocks = t["bval"][: nb * C * R8].view(nb, C, R8)[:, :, :R].transpose(1, 2)  # [nb, R, C]
        full = torch.zeros(NBR, NBC, R, C, dtype=packed.dtype)
        brow = torch.repeat_interleave(torch.arange(NBR), t["browptr"].diff())
        full[brow, t["bcol"].long()] = blocks
        return full.permute(0, 2, 1, 3).reshape(NBR * R, NBC * C)[:N, :K].contiguous()
    if packed.format == "nm":
        n, m = packed.group
        E = t["idx"].shape[1]
        val = t["val"][: N * E].view(N, E)
        cols = (torch.arange(E) // n * m).unsqueeze(0) + t["idx"].long()
        rows = torch.arange(N).unsqueeze(1).expand(N, E)
        nz = bits_view(val) != 0  # padding entries are +0.0 at offset 0
        out.index_put_((rows[nz], cols[nz]), val[nz])
        return out
    rp = t["rowptr"]
    if packed.format == "csr":
        for seg in rp.view(-1, N + 1):  # one segment (plain csr), or each segment of a nested level
            rows = torch.repeat_interleave(torch.arange(N), seg.diff())
            pos = torch.arange(int(seg[0]), int(seg[-1]))
            col = t["col"][pos].long()
            if t["col"].dtype == torch.int16:
                col &= 0xFFFF
            val = t["val"][pos]
            # padding entries are +0.0 (all bits zero) at column 0; a kept +0.0 is +0.0 in `out` already
            nz = bits_view(val) != 0
            out.index_put_((rows[nz], col[nz]), val[nz])
        return out
    bits = ((t["mask"].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).view(N, -1)[:, :K].bool()
    out[bits] = t["val"][: packed.nnz]
    return out


class _SparseLinear(torch.autograd.Function):
    """The packed product with a backward (input and bias gradients; the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, packed, threads):
        ctx.packed = packed
        return _sparse_linear(x, packed, bias, threads)

    @staticmethod
    def backward(ctx, gy):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = gy @ unpack(ctx.packed).to(gy.dtype)
        if ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gb, None, None


# -- the product -------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, packed: PackedLevel, bias) -> None:
    K = packed.shape[1]
    if x.shape[-1] != K:
        raise ELSAError(f"sparse_linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}), the weight has in_features={K}")
    if x.device.type != "cpu":
        raise ELSAError(f"sparse_linear: the input is on {x.device}, the packed level on the CPU")
    if bias is not None and tuple(bias.shape) != (packed.shape[0],):
        raise ELSAError(f"sparse_linear: bias has shape {tuple(bias.shape)}, expected ({packed.shape[0]},)")


def sparse_linear(x: torch.Tensor, packed: PackedLevel, bias: torch.Tensor | None = None, *,
                  threads: int | None = None) -> torch.Tensor:
    """``F.linear(x, W_t, bias)`` from the packed level: `[*, in_features]` -> `[*, out_features]`
    in ``x``'s dtype, accumulated in float32 (the kernels of ``elsa_codec/kernels/cpu/elsa_cpu.cpp``).
    Differentiable with respect to ``x`` and ``bias`` (the weight is frozen).

    Raises:
        ELSAError: the kernels are unavailable, or ``x`` / ``bias`` do not fit the weight.
    """
    _check_x(x, packed, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _SparseLinear.apply(x, bias, packed, threads)
    return _sparse_linear(x, packed, bias, threads)


def _sparse_linear(x, packed, bias, threads):
    N, K = packed.shape
    nt = threads or torch.get_num_threads()
    b = None if bias is None else bias.detach()
    if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
        b = b.to(torch.float32).contiguous()
    lead = x.shape[:-1]
    if x.numel() == K:  # one row (any leading dims of size 1): the M = 1 kernel on x itself
        if x.dtype == torch.float32 and x.is_contiguous() and _xpad(packed) == K:
            xf = x
        else:
            xf = torch.zeros(_xpad(packed), dtype=torch.float32)
            xf[:K] = x.reshape(-1)
        y = torch.empty(*lead, N, dtype=torch.float32)
        packed.mv(xf.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), nt)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_zeros(*lead, N)
    y = torch.empty(M, N, dtype=torch.float32)
    _mm(_lib(), packed, x2, b, y, M, nt)
    return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, N)


def _lib():
    from ...native import cpu_kernels, cpu_kernels_error

    lib = cpu_kernels()
    if lib is None:
        raise ELSAError(f"sparse_linear: the CPU sparse kernels are unavailable ({cpu_kernels_error()})")
    return lib


def _xpad(packed: PackedLevel) -> int:
    K = packed.shape[1]
    if packed.format == "bitmask":
        return (K + 7) // 8 * 8
    if packed.format == "bsr":
        C = packed.block[1]
        return -(-K // C) * C
    return K


def _bind_mv(lib, packed):
    """``f(x_ptr, bias_ptr, y_ptr, threads)``: the format's M = 1 kernel with the packed arrays bound
    (converted to their ctypes types once: the per-call conversion is what costs at small sizes)."""
    fn = getattr(lib, f"elsa_{packed.format}_mv")
    args = (packed.shape[0], *packed.arrays(), _DT[packed.dtype])
    pre = tuple(ct(v) for ct, v in zip(fn.argtypes, args))
    return lambda x, b, y, nt: fn(*pre, x, b, y, nt)


#: Bytes of one panel of x (``[Kp, W]`` float32) the ``bsr`` product aims to keep in L2 cache. The
#: csr, bitmask and nm products read a panel in K chunks of 16 KiB (``elsa_cpu_mm.inc``, "K blocking"),
#: so their panels are as wide as M allows (up to 64) whatever ``Kp``.
PANEL_BYTES = 512 * 1024


def panel_width(M: int, Kp: int, capped: bool = True) -> int:
    """Columns of x per panel of the M > 1 products (8 for M <= 8, run by the 8-lane kernels; else
    16, 32, 48 or 64): as few panels as a width of 64 allows, each as narrow as its share of ``M``
    rounded up to 16; ``capped`` (the ``bsr`` product): no panel over :data:`PANEL_BYTES` while it
    is wider than 16."""
    if M <= 8:
        return 8
    w_max = 64
    while capped and w_max > 16 and Kp * w_max * 4 > PANEL_BYTES:
        w_max -= 16
    panels = -(-M // w_max)
    return -(-(-(-M // panels)) // 16) * 16


def panels(x2: torch.Tensor, Kp: int, capped: bool = True) -> tuple[torch.Tensor, int]:
    """x `[M, K]` (any float dtype) cut into the M > 1 kernels' panels: ``(xp, W)``, xp float32
    `[P, Kp, W]` = x^T in ``P`` panels of ``W`` (:func:`panel_width`) columns, zero past M and K."""
    M, K = x2.shape
    W = panel_width(M, Kp, capped)
    P = -(-M // W)
    if P * W != M:  # zero columns past M
        x2 = torch.cat([x2, x2.new_zeros(P * W - M, K)])
    xp = torch.empty(P, Kp, W, dtype=torch.float32)
    if Kp > K:
        xp[:, K:].zero_()
    xp[:, :K].copy_(x2.view(P, W, K).transpose(1, 2))
    return xp, W


def panel_cost_input(packed: PackedLevel) -> tuple[int, bool]:
    """``(Kp, capped)``: the padded input width the products of ``packed`` read and whether their
    panels are capped (what :func:`panels` takes after x)."""
    return _xpad(packed), _capped(packed)


#: Below this density a csr product runs each row whole on an L2-sized panel (``elsa_cpu_mm.inc``:
#: ``CSR_BLOCKED_DENSITY``; short runs per K chunk cost more than the chunk saves).
CSR_BLOCKED_DENSITY = 0.2


def _capped(packed: PackedLevel) -> bool:
    """Whether the M > 1 product of ``packed`` takes panels capped to :data:`PANEL_BYTES`: bsr, and
    csr below :data:`CSR_BLOCKED_DENSITY` or on a CPU with at least 4 x :data:`PANEL_BYTES` of L2
    cache per core (:func:`~elsa_codec.native.l2_cache_bytes`; a capped panel stays in L2 beside the
    weight stream there, so whole rows beat K chunks). The products run a row whole wherever the
    panel is at most :data:`PANEL_BYTES`."""
    from ...native import l2_cache_bytes

    if packed.format != "csr":
        return packed.format == "bsr"
    return packed.density < CSR_BLOCKED_DENSITY or l2_cache_bytes() >= 4 * PANEL_BYTES


def _mm(lib, packed, x2, b, y, M, nt) -> None:
    N, K = packed.shape
    Kp = _xpad(packed)
    xp, W = panels(x2, Kp, _capped(packed))
    getattr(lib, f"elsa_{packed.format}_mm")(N, M, W, Kp, *packed.arrays(), _DT[packed.dtype], xp.data_ptr(), _ptr(b),
                                             y.data_ptr(), N, nt)


def sparse_linear_reference(x: torch.Tensor, packed: PackedLevel, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch :func:`sparse_linear`: ``F.linear`` in float32 on :func:`unpack`, cast to
    ``x``'s dtype."""
    _check_x(x, packed, bias)
    y = torch.nn.functional.linear(x.float(), unpack_reference(packed).float(), None if bias is None else bias.float())
    return y.to(x.dtype)
