"""Every sparse level of one weight in ONE packed form: the nested csr (``sparse-cpu`` backend).

ELSA (Halvachi et al., arXiv 2312.06872), section 2.2: level ``t`` keeps the weights whose code (the
``k`` low mantissa bits) is below ``t``, so level ``t`` holds every weight of level ``t - 1``. The
nested csr stores each row's kept weights ordered by level: first the weights of code 0 (level 1),
then those of code 1 (what level 2 adds), ... up to code ``T - 1``; columns ascending within each
such segment, each segment padded to a multiple of 8 entries (value 0, column 0). The dense-only
weights (code ``T``) are not stored. The segments are stored segment-major: every row's segment 0
first (level 1 is one contiguous csr, exactly the arrays ``pack_level(w, 1, k, "csr")`` writes),
then every row's segment 1, and so on; ``segptr[c, n] .. segptr[c, n + 1] - 1`` are row ``n``'s
entries of segment ``c``. Level ``t`` of row ``n`` is its segments ``0 .. t - 1``: every level is a
csr :class:`~elsa_codec.kernels.cpu.packed.PackedLevel` whose ``rowptr`` is the view
``segptr[:t]`` of the shared arrays, and the csr kernels read its ``t`` segments: a level switch
only changes how many segments they read (no repacking, no copy), and each segment streams as
contiguous as a plain csr level. (Storing each row's segments side by side instead, row after
row, made level 1 read short runs at a long stride: 1.2-1.4x plain csr at 4096x4096, 90%.)

:func:`pack_nested` builds it with the C++ kernels of ``elsa_cpu_nested.cpp`` (one read of the
encoded weight to count each row's codes, one to pack); :func:`pack_nested_reference` is the
pure-PyTorch specification (the same arrays, bit for bit).
"""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ELSAError
from ...format.bits import bits_view, check_code_bits
from .packed import _PAD, PackedLevel, _check_weight

__all__ = ["NestedLevels", "pack_nested", "pack_nested_reference"]

#: Rows per row-contiguous copy of a weight not stored by rows (a transposed Conv1D weight).
BLOCK_ROWS = 256


@dataclasses.dataclass
class NestedLevels:
    """Every sparse level ``1..T`` of one weight `[N, K]`, nested csr (see the module docstring).

    Attributes:
        shape: ``(N, K)`` of the weight.
        dtype: the weight's dtype (float32 / bfloat16 / float16; values keep their exact bits).
        num_levels: ``T``.
        nnz: kept weights of each level ``1..T`` (no padding), nondecreasing.
        tensors: ``segptr`` int64 `[T, N + 1]` (``segptr[c, n]``: where row ``n``'s segment ``c``
            starts, multiples of 8; ``segptr[c, N] == segptr[c + 1, 0]``), ``col`` int16
            (``K <= 65536``, read as unsigned) or int32 `[total + 8]`, ``val`` `[total + 8]` (weight
            dtype), ``total = segptr[T - 1, N]``.
    """

    shape: tuple
    dtype: torch.dtype
    num_levels: int
    nnz: tuple
    tensors: dict
    _levels: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def level(self, t: int) -> PackedLevel:
        """Level ``t`` (``1..T``) as a csr :class:`PackedLevel` whose tensors share this object's
        storage (``rowptr`` = the view ``segptr[:t]``, ``col``, ``val``): served by
        :func:`~elsa_codec.kernels.cpu.packed.sparse_linear` and ``unpack`` as any csr level. Built
        once per ``t`` and kept (a small object; nothing is copied).

        Raises:
            ELSAError: ``t`` is not an int in ``1..T`` (the dense level ``T + 1`` is the encoded
                weight itself).
        """
        T = self.num_levels
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= T:
            raise ELSAError(f"NestedLevels.level: t must be a sparse level, an int in 1..{T}, got {t!r} "
                            f"(the dense level {T + 1} is the encoded weight itself)")
        p = self._levels.get(t)
        if p is None:
            ts = self.tensors
            p = self._levels[t] = PackedLevel("csr", self.shape, self.dtype, t, self.nnz[t - 1], {
                "rowptr": ts["segptr"][:t], "col": ts["col"], "val": ts["val"]})
        return p

    @property
    def nbytes(self) -> int:
        """Bytes of the shared arrays (``segptr``, ``col``, ``val``), each counted once."""
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def __repr__(self) -> str:
        n, k = self.shape
        dens = ", ".join(f"{c / max(1, n * k):.3f}" for c in self.nnz)
        return (f"NestedLevels(T={self.num_levels}, shape={tuple(self.shape)}, {str(self.dtype).replace('torch.', '')}, "
                f"density=[{dens}], {self.nbytes / 2**20:.2f} MiB)")


def _check(weight, num_levels, code_bits, name: str) -> None:
    _check_weight(weight, 1, code_bits, name)
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
        raise ELSAError(f"{name}: num_levels must be an int >= 1, got {num_levels!r}")
    check_code_bits(weight.dtype, code_bits, num_levels, name=name)


def _layout(counts: torch.Tensor, K: int, store: torch.dtype) -> tuple:
    """``(segptr, col, val)`` of a nested csr with ``counts`` `[N, T]` kept weights per row and
    code: every segment padded to 8, segment-major; col / val uninitialised but for the 8 trailing
    entries."""
    N, T = counts.shape
    padded = (counts + 7) // 8 * 8
    segptr = torch.zeros(T, N + 1, dtype=torch.int64)
    segptr[:, 1:] = padded.t().cumsum(1)  # within each segment, from its start
    starts = torch.zeros(T, dtype=torch.int64)
    starts[1:] = segptr[:-1, -1].cumsum(0)  # segment c starts where segment c - 1 ends
    segptr += starts[:, None]
    total = int(segptr[-1, -1])
    col = torch.empty(total + _PAD, dtype=torch.int16 if K <= 65536 else torch.int32)
    val = torch.empty(total + _PAD, dtype=store)
    col[total:].zero_()
    val[total:].zero_()
    return segptr, col, val


def _row_blocks(w: torch.Tensor):
    """``(rows, n0)``: the whole weight when its rows are contiguous; else row-contiguous copies of
    :data:`BLOCK_ROWS` rows at a time into one reused scratch (never a copy of the whole weight)."""
    N, K = w.shape
    if w.stride(1) == 1 or N == 0 or K == 0:
        yield w, 0
        return
    scratch = torch.empty(min(BLOCK_ROWS, N), K, dtype=w.dtype)
    for n0 in range(0, N, BLOCK_ROWS):
        rows = scratch[: min(BLOCK_ROWS, N - n0)]
        rows.copy_(w[n0 : n0 + rows.shape[0]])
        yield rows, n0


def pack_nested(weight: torch.Tensor, num_levels: int, code_bits: int, *, threads: int | None = None,
                name: str = "weight") -> NestedLevels:
    """Every sparse level ``1..num_levels`` of the encoded ``weight`` `[N, K]` (float32 / bfloat16 /
    float16, CPU, any strides) in one nested csr, with the C++ kernels: one read of the weight counts
    each row's codes, one packs them (AVX-512 compare + compress where the CPU has it). A weight not
    stored by rows (a transposed view) is read in row-contiguous blocks of :data:`BLOCK_ROWS` rows.

    Raises:
        ELSAError: the kernels are unavailable; bad weight (not 2-D, dtype, device), ``code_bits``
            or ``num_levels`` (below 1 or more than ``code_bits`` can hold); names ``name``. Checked
            before any work.

    Example::

        >>> w = ec.encode_tensor(torch.randn(64, 128), torch.randint(0, 4, (64, 128)), 2)
        >>> nested = pack_nested(w, 3, 2)              # levels 1, 2, 3 in one packed form
        >>> sparse_linear(torch.randn(5, 128), nested.level(2)).shape
        torch.Size([5, 64])
        >>> torch.equal(unpack(nested.level(2)), ec.extract_level(w, 2, 2))
        True
    """
    from ...native import cpu_kernels, cpu_kernels_error

    _check(weight, num_levels, code_bits, name)
    lib = cpu_kernels()
    if lib is None:
        raise ELSAError(f"{name}: the CPU sparse kernels are unavailable ({cpu_kernels_error()})")
    N, K = weight.shape
    T, nt, es = num_levels, threads or torch.get_num_threads(), weight.element_size()
    store = torch.float32 if weight.dtype == torch.float32 else torch.int16  # values move as bits

    def args(w):
        return w.data_ptr(), es, w.shape[0], K, w.stride(0), w.stride(1), code_bits, T

    counts = torch.empty(N, T, dtype=torch.int64)
    for w, n0 in _row_blocks(weight):
        lib.elsa_count_codes(*args(w), counts.data_ptr() + 8 * n0 * T, nt)
    segptr, col, val = _layout(counts, K, store)
    for w, n0 in _row_blocks(weight):  # segment c of row n: segptr[c, n] .. segptr[c, n + 1]
        start = segptr.data_ptr() + 8 * n0
        lib.elsa_pack_csr_nested(*args(w), start, start + 8, N + 1, col.data_ptr(), col.element_size(),
                                 val.data_ptr(), nt)
    nnz = tuple(int(c) for c in counts.sum(0).cumsum(0))
    tensors = {"segptr": segptr, "col": col, "val": val.view(weight.dtype)}
    return NestedLevels((N, K), weight.dtype, T, nnz, tensors)


def pack_nested_reference(weight: torch.Tensor, num_levels: int, code_bits: int) -> NestedLevels:
    """Pure-PyTorch :func:`pack_nested` (the same arrays, bit for bit); the reference of the kernels.

    Raises:
        ELSAError: as :func:`pack_nested` (naming ``"weight"``).
    """
    _check(weight, num_levels, code_bits, "weight")
    N, K = weight.shape
    T = num_levels
    w = weight.contiguous()
    codes = bits_view(w).long() & ((1 << code_bits) - 1)
    rows, cols = (codes < T).nonzero(as_tuple=True)  # row by row, columns ascending
    seg = codes[rows, cols]
    key = seg * N + rows  # (code, row): the segment of each kept weight, segment-major
    counts = torch.zeros(T * N, dtype=torch.int64).index_add_(0, key, torch.ones_like(key))
    segptr, col, val = _layout(counts.view(T, N).t(), K, weight.dtype)
    col.zero_()
    val.zero_()
    order = torch.sort(key, stable=True).indices  # by code, then row, then column
    ks = key[order]
    rank = torch.arange(ks.numel()) - (counts.cumsum(0) - counts)[ks]  # place within the segment
    pos = segptr[:, :-1].reshape(-1)[ks] + rank
    col[pos] = cols[order].to(col.dtype)
    val[pos] = w[rows[order], cols[order]]
    nnz = tuple(int(c) for c in counts.view(T, N).sum(1).cumsum(0))
    return NestedLevels((N, K), weight.dtype, T, nnz, {"segptr": segptr, "col": col, "val": val})
