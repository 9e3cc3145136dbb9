"""The code rule: counter codes in the low mantissa bits of IEEE-754 weights.

Source: Halvachi et al., "ELSA: Partial Weight Freezing for Overhead-Free Sparse Network
Deployment", arXiv 2312.06872, section 2.2; the exact rule is in docs/DESIGN.md
("The code rule") and docs/FORMAT.md.

Terms: level ``t`` in ``1..T`` (``1`` the sparsest, ``T+1`` the dense network), counter ``N`` in
``1..T+1`` (the first level that contains a weight), code ``c = N - 1`` stored in the ``k`` lowest
bits of the weight's bit pattern.
"""
from __future__ import annotations

import math

import torch

from ..errors import ELSAError

__all__ = [
    "SUPPORTED_DTYPES",
    "MAX_CODE_BITS",
    "default_code_bits",
    "check_code_bits",
    "bits_view",
    "encode_tensor",
    "decode_codes",
    "kept_counts",
    "decode_counters",
    "level_mask",
    "extract_level",
    "ulp_error",
    "sqnr_db",
]

#: Largest usable code width ``k`` per dtype (docs/DESIGN.md, "Terms").
MAX_CODE_BITS = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 3}
SUPPORTED_DTYPES = tuple(MAX_CODE_BITS)

# Signed integer dtype of the same width (for bit views), the magnitude mask and the bit pattern of
# the largest finite magnitude, per float dtype.
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_MAG_MASK = {torch.float32: 0x7FFFFFFF, torch.float16: 0x7FFF, torch.bfloat16: 0x7FFF}
_MAX_FINITE = {torch.float32: 0x7F7FFFFF, torch.float16: 0x7BFF, torch.bfloat16: 0x7F7F}
_VALID_CODE_BITS = frozenset((d, k) for d, kmax in MAX_CODE_BITS.items() for k in range(1, kmax + 1))


def default_code_bits(num_levels: int) -> int:
    """Default code width ``k = max(1, ceil(log2(T + 1)))`` for ``T`` sparse levels.

    Codes take the values ``0..T`` (``T + 1`` distinct values: ``T`` sparse levels plus dense-only).

    Raises:
        ELSAError: ``num_levels`` is not a positive integer.
    """
    if not isinstance(num_levels, int) or isinstance(num_levels, bool) or num_levels < 1:
        raise ELSAError(f"number of levels T must be a positive integer, got {num_levels!r}")
    return max(1, math.ceil(math.log2(num_levels + 1)))


def check_code_bits(dtype: torch.dtype, code_bits: int, num_levels: int | None = None, name: str = "tensor") -> int:
    """Check that ``code_bits`` fits ``dtype`` (and holds codes ``0..num_levels``); return it.

    Raises:
        ELSAError: unsupported dtype, ``code_bits`` outside ``1..MAX_CODE_BITS[dtype]``, or too
            few code bits for ``num_levels`` levels. The message names ``name``.
    """
    if num_levels is None and type(code_bits) is int and (dtype, code_bits) in _VALID_CODE_BITS:
        return code_bits  # the common case, on every encode / extract / decode: one set lookup
    if dtype not in MAX_CODE_BITS:
        raise ELSAError(
            f"{name}: unsupported dtype {dtype}; ELSA codes live in float32, float16 or bfloat16 weights"
        )
    if not isinstance(code_bits, int) or isinstance(code_bits, bool):
        raise ELSAError(f"{name}: code_bits must be an int, got {code_bits!r}")
    kmax = MAX_CODE_BITS[dtype]
    if num_levels is not None and default_code_bits(num_levels) > kmax:
        raise ELSAError(
            f"{name}: {num_levels} levels need codes 0..{num_levels}, i.e. at least {default_code_bits(num_levels)} code bits, "
            f"but {dtype} has {kmax} code bits: at most {(1 << kmax) - 1} levels"
        )
    if not 1 <= code_bits <= kmax:
        raise ELSAError(f"{name}: code_bits={code_bits} is outside 1..{kmax} allowed for {dtype}")
    if num_levels is not None and num_levels + 1 > (1 << code_bits):
        need = default_code_bits(num_levels)
        more = f"; {dtype} allows at most {(1 << kmax) - 1} levels" if need > kmax else ""
        raise ELSAError(
            f"{name}: {num_levels} levels need codes 0..{num_levels}, i.e. at least {need} code bits, "
            f"but code_bits={code_bits}{more}"
        )
    return code_bits


def bits_view(x: torch.Tensor) -> torch.Tensor:
    """The raw IEEE-754 bit pattern of ``x`` as a signed integer tensor of the same width (a view).

    ``x``: float32 -> int32, float16/bfloat16 -> int16. Same shape; contiguous or not.
    """
    if x.dtype not in _INT_VIEW:
        raise ELSAError(f"unsupported dtype {x.dtype}; expected float32, float16 or bfloat16")
    return x.view(_INT_VIEW[x.dtype])


def encode_tensor(
    weight: torch.Tensor,
    codes: torch.Tensor,
    code_bits: int,
    *,
    name: str = "weight",
) -> torch.Tensor:
    """Store ``codes`` in the ``code_bits`` lowest bits of ``weight`` (the code rule).

    For each element, the result is the finite float of the same dtype and the same sign whose
    ``k`` low bits equal the code and which is nearest to the input by value; on a tie, the smaller
    magnitude (docs/DESIGN.md, "The code rule"; ELSA, arXiv 2312.06872, section 2.2). The error is at
    most ``2**(k-1)`` ulp, the ulp taken ``2**(k-1)`` representable values above ``|x|`` (equal to
    ``x``'s own ulp except just below a power of two, where the upper neighbour's steps are twice
    as large). Within ``2**k`` representable values of zero or of the largest finite value only one
    candidate of the right sign and finiteness may exist; there the error is below ``2**k`` ulp.

    CPU tensors run the C kernel of ``elsa_codec/format/elsa_rule.c`` (one pass that also checks the
    weights and the codes); other devices, or no C compiler, or ``ELSA_CPU_KERNELS=0``, run the
    PyTorch reference (:func:`_encode_chunk`, same bits).

    Args:
        weight: float tensor of any shape, float32 / float16 / bfloat16. Not modified.
        codes: integer tensor of the same shape with values in ``0..2**k - 1`` (code = counter - 1);
            uint8, int16, int32 and int64 are read as they are, other integer dtypes are widened
            first.
        code_bits: ``k``, in ``1..MAX_CODE_BITS[weight.dtype]`` (8 / 4 / 3).
        name: tensor name used in error messages.

    Returns:
        A NEW contiguous tensor, same shape and dtype as ``weight``.

    Raises:
        ELSAError: NaN/Inf weights, unsupported dtype, bad ``code_bits``, codes of the wrong shape,
            not integer, or out of range. Messages name ``name``.
    """
    if not isinstance(weight, torch.Tensor):
        raise ELSAError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    check_code_bits(weight.dtype, code_bits, name=name)
    if not isinstance(codes, torch.Tensor):
        raise ELSAError(f"{name}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.shape != weight.shape:
        raise ELSAError(f"{name}: codes have shape {tuple(codes.shape)} but the weight has shape {tuple(weight.shape)}")
    if codes.dtype not in _INTEGER_DTYPES:
        raise ELSAError(f"{name}: codes must be an integer tensor, got dtype {codes.dtype}")
    plain = weight.is_cpu and type(weight) in _PLAIN and type(codes) in _PLAIN and not _compiling()
    rule = (_RULE[0] if _RULE else _rule_kernels()) if plain else None
    if rule is not None:
        return _encode_kernel(rule, weight, codes, code_bits, name)
    _check_finite(weight, name)
    _check_codes(codes, code_bits, name)
    flat = weight.detach().contiguous().reshape(-1)
    cflat = codes.detach().to(device=weight.device).contiguous().reshape(-1)
    out = torch.empty_like(flat)
    # Cache-sized chunks: the ~20 elementwise passes then stay in cache instead of streaming memory.
    for s in range(0, flat.numel(), _CHUNK):
        out[s : s + _CHUNK] = _encode_chunk(flat[s : s + _CHUNK], cflat[s : s + _CHUNK], code_bits)
    return out.reshape(weight.shape)


_CHUNK = 1 << 15
_INTEGER_DTYPES = frozenset(
    getattr(torch, n) for n in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64") if hasattr(torch, n)
)
_DECODE_CHUNK = 1 << 18  # decode does 3 passes: larger chunks pay less per-op overhead


def _check_finite(x: torch.Tensor, name: str) -> None:
    if not torch.isfinite(x).all():
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ELSAError(f"{name}: weights must be finite, found {n_nan} NaN and {n_inf} Inf values")


def _check_codes(codes: torch.Tensor, code_bits: int, name: str) -> None:
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= (1 << code_bits):
            raise ELSAError(f"{name}: codes must lie in 0..{(1 << code_bits) - 1} for code_bits={code_bits}, got {lo}..{hi}")


# -- the C kernels (elsa_codec/format/elsa_rule.c, built by cpu_build) -----------------------------------
class _Rule:
    """The code-rule kernels of one loaded library, looked up by dtype: ``encode[(weight dtype,
    codes dtype)]``, ``extract[weight dtype]``, ``decode[weight dtype]``: the CPython module's
    functions where it was built (``via == "python"``), else the ctypes functions (``"ctypes"``);
    both take the same arguments (``data_ptr()`` ints, ``k``, ``t``, ``n``)."""

    _DT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
    _CT = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}

    def __init__(self, lib, use_python: bool = True):
        mod = getattr(lib, "python_module", None) if use_python else None
        self.via = "python" if mod is not None else "ctypes"

        def fn(name):
            return getattr(mod, name) if mod is not None else getattr(lib, f"elsa_{name}")

        self.encode = {(d, c): fn(f"encode_{ds}_{cs}") for d, ds in self._DT.items() for c, cs in self._CT.items()}
        self.extract = {d: fn("extract_u32" if d == torch.float32 else "extract_u16") for d in self._DT}
        self.decode = {d: fn("decode_codes_u32" if d == torch.float32 else "decode_codes_u16") for d in self._DT}


_RULE: list = []  # [] before the first use, then [_Rule or None] (tests set [None]: the reference)
#: Tensor types the kernels take (raw memory): subclasses (DTensor, FakeTensor under tracing...) run
#: the PyTorch reference, which dispatches through them.
_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})
#: True while torch.compile traces: a ctypes / C call cannot be traced, the PyTorch reference can.
_compiling = torch.compiler.is_compiling


def _rule_kernels() -> _Rule | None:
    """The C code-rule kernels, built on first use (about 1 s, cached on disk; see
    :func:`elsa_codec.native.rule_kernels`); None when they are unavailable (no C compiler,
    ``ELSA_CPU_KERNELS=0``): callers then run the PyTorch reference.
    The kernels run on PyTorch's threads from 128K elements on (PAR_MIN in elsa_rule.c)."""
    if not _RULE:
        from ..native import rule_kernels

        lib = rule_kernels()
        _RULE.append(_Rule(lib) if lib is not None else None)
    return _RULE[0]


def _encode_kernel(rule: _Rule, weight: torch.Tensor, codes: torch.Tensor, code_bits: int, name: str) -> torch.Tensor:
    """:func:`encode_tensor` on the CPU by the C kernel; the weight and code checks ride along in
    the same pass (a status), the error messages are the reference's."""
    x = weight.contiguous()
    c = codes if codes.is_cpu else codes.cpu()
    fn = rule.encode.get((x.dtype, c.dtype))
    if fn is None:
        c = c.to(torch.int64)
        fn = rule.encode[(x.dtype, torch.int64)]
    c = c.contiguous()
    out = torch.empty_like(x)  # contiguous, like x (and faster than torch.empty)
    status = fn(x.data_ptr(), c.data_ptr(), code_bits, out.data_ptr(), x.numel())
    if status:
        _check_finite(weight.detach(), name)
        _check_codes(c, code_bits, name)
        raise ELSAError(f"{name}: the code-rule kernel reported status {status} for finite weights and valid codes")
    return out


def _encode_chunk(x: torch.Tensor, codes: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The code rule on a flat contiguous chunk (no checks)."""
    dtype = x.dtype
    step = 1 << code_bits
    mag_mask, max_finite = _MAG_MASK[dtype], _MAX_FINITE[dtype]
    # Work on the magnitude bit patterns in int32 (16-bit patterns widened) and compare distances
    # in float32: differences of neighbouring floats are exact there (Sterbenz), so the choice of
    # the nearest candidate is exact.
    raw = _bits32(x)
    mag = raw & mag_mask
    sign = raw ^ mag
    base = (mag & -step) | codes.to(torch.int32)  # -step == ~(step - 1)
    above = torch.where(base < mag, base + step, base)  # the candidate at or above |x|
    below = above - step  # the candidate below |x|
    valid_above = above <= max_finite
    valid_below = below >= 0
    fx = _float32_of(mag, dtype)
    d_above = _float32_of(torch.where(valid_above, above, mag), dtype) - fx
    d_below = fx - _float32_of(torch.where(valid_below, below, mag), dtype)
    take_below = valid_below & (~valid_above | (d_below <= d_above))
    return _unbits32(torch.where(take_below, below, above) | sign, dtype)


def _bits32(x: torch.Tensor) -> torch.Tensor:
    """Bit pattern of ``x`` as int32 (16-bit patterns zero-extended)."""
    if x.dtype == torch.float32:
        return x.view(torch.int32)
    return x.view(torch.int16).to(torch.int32) & 0xFFFF


def _unbits32(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`_bits32` (returns a new tensor of ``dtype``)."""
    if dtype == torch.float32:
        return bits.view(torch.float32)
    return bits.to(torch.int16).view(dtype)


def _float32_of(mag_bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative float32 values of the magnitude bit patterns ``mag_bits`` (int32) of ``dtype``."""
    if dtype == torch.bfloat16:  # bfloat16 is the upper half of a float32
        return (mag_bits << 16).view(torch.float32)
    return _unbits32(mag_bits, dtype).to(torch.float32)


def kept_counts(codes: torch.Tensor, num_levels: int, code_bits: int) -> list:
    """``[number of codes < t for t in 1..T+1]`` of a uint8 code tensor (:func:`decode_codes` with
    ``code_bits``): the weights each level keeps, and last the codes ``<= T`` (fewer than
    ``codes.numel()`` when some code is out of range; not counted when ``k`` bits hold no code
    above ``T``). On the CPU with few levels a vectorised compare-and-count per level (several
    times faster than a bincount); else one bincount."""
    flat = codes.reshape(-1)
    T = num_levels
    if T > 15 or flat.device.type != "cpu":
        return torch.cumsum(torch.bincount(flat, minlength=T + 2), 0)[: T + 1].tolist()
    import numpy as np

    a = flat.numpy()
    kept = [int(np.count_nonzero(a < t)) for t in range(1, T + 1)]
    return kept + [int(np.count_nonzero(a <= T)) if T + 1 < (1 << code_bits) else a.size]


def decode_codes(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The codes (``counter - 1``) held in the low bits: ``bits & (2**k - 1)``.

    CPU tensors run the C kernel (one pass), other devices the PyTorch reference; same values.

    Args:
        encoded: float32 / float16 / bfloat16 tensor of any shape.
        code_bits: ``k``.

    Returns:
        uint8 tensor of the same shape, values in ``0..2**k - 1``.

    Raises:
        ELSAError: unsupported dtype or bad ``code_bits``.
    """
    dtype = encoded.dtype
    if type(code_bits) is not int or (dtype, code_bits) not in _VALID_CODE_BITS:
        check_code_bits(dtype, code_bits)  # raises
    rule = (_RULE[0] if _RULE else _rule_kernels()) if encoded.is_cpu and type(encoded) in _PLAIN and not _compiling() else None
    if rule is None:
        return (bits_view(encoded) & ((1 << code_bits) - 1)).to(torch.uint8)
    src = encoded.contiguous()
    out = torch.empty_like(src, dtype=torch.uint8)
    rule.decode[dtype](src.data_ptr(), code_bits, out.data_ptr(), src.numel())
    return out


def decode_counters(encoded: torch.Tensor, code_bits: int) -> torch.Tensor:
    """The counters ``N = code + 1`` (first level containing each weight; ELSA section 2.2's N(T)).

    Returns:
        tensor of the same shape as ``encoded``, values in ``1..2**k``: uint8, or int16 when
        ``code_bits == 8`` (float32 with up to 255 levels: the counter 256 does not fit a byte).
    """
    codes = decode_codes(encoded, code_bits)
    return (codes.to(torch.int16) if code_bits == 8 else codes) + 1


def _check_level(level, num_levels: int | None) -> int:
    if type(level) is int and level >= 1 and (num_levels is None or level <= num_levels + 1):
        return level
    if level == "dense":
        if num_levels is None:
            raise ELSAError("level 'dense' needs the number of levels T")
        return num_levels + 1
    if not isinstance(level, int) or isinstance(level, bool):
        raise ELSAError(f"level must be an int in 1..T+1 or 'dense', got {level!r}")
    top = (num_levels + 1) if num_levels is not None else None
    if level < 1 or (top is not None and level > top):
        rng = f"1..{top} (or 'dense')" if top is not None else ">= 1"
        raise ELSAError(f"level {level} is out of range: expected {rng}")
    return level


def level_mask(encoded: torch.Tensor, level, code_bits: int, num_levels: int | None = None) -> torch.Tensor:
    """Boolean mask of the weights that belong to level ``t``: ``code < t`` (i.e. ``N <= t``).

    Args:
        encoded: encoded float tensor, any shape.
        level: ``t`` in ``1..T+1`` or ``"dense"`` (needs ``num_levels``).
        code_bits: ``k``.
        num_levels: ``T``, used to check ``level``; optional.

    Returns:
        bool tensor of the same shape.

    Raises:
        ELSAError: level out of range.
    """
    t = _check_level(level, num_levels)
    check_code_bits(encoded.dtype, code_bits)
    return (bits_view(encoded) & ((1 << code_bits) - 1)) < t


def extract_level(encoded: torch.Tensor, level, code_bits: int, num_levels: int | None = None) -> torch.Tensor:
    """The weight of level ``t``: ``where(code < t, W, 0)`` (docs/DESIGN.md, "The code rule").

    Args:
        encoded: encoded float32 / float16 / bfloat16 tensor, any shape.
        level: ``t`` in ``1..T+1`` or ``"dense"`` (needs ``num_levels``).
        code_bits: ``k``.
        num_levels: ``T``, used to check ``level``; optional.

    Returns:
        The dense level (``T+1``, when ``num_levels`` is given): ``encoded`` itself (no decoding, no
        copy). Sparse levels: a new contiguous tensor of the same shape and dtype, a kept weight
        with its exact bits, a dropped one ``+0.0``. CPU tensors run the C kernel (one pass), other
        devices the PyTorch reference below (the reference for the GPU kernels too).

    Raises:
        ELSAError: level out of range, unsupported dtype or bad ``code_bits``.
    """
    t = _check_level(level, num_levels)
    if num_levels is not None and t == num_levels + 1:
        return encoded
    dtype = encoded.dtype
    if type(code_bits) is not int or (dtype, code_bits) not in _VALID_CODE_BITS:
        check_code_bits(dtype, code_bits)  # raises
    # (the hot path of a level switch: each Python call here is ~5% of a 64x64 copy)
    rule = (_RULE[0] if _RULE else _rule_kernels()) if encoded.is_cpu and type(encoded) in _PLAIN and not _compiling() else None
    if rule is None:
        return _extract_reference(encoded, t, code_bits)
    src = encoded.contiguous()
    out = torch.empty_like(src)
    rule.extract[dtype](src.data_ptr(), code_bits, t, out.data_ptr(), src.numel())
    return out


def _extract_reference(encoded: torch.Tensor, t: int, code_bits: int) -> torch.Tensor:
    """:func:`extract_level` of a sparse level ``t`` in PyTorch: ``bits * (code < t)``."""
    src = bits_view(encoded.contiguous()).reshape(-1)
    out = torch.empty_like(src)
    low = (1 << code_bits) - 1
    # bits * (code < t), chunk by chunk (cache-sized): a kept weight keeps its exact bits, a
    # dropped one becomes +0.0.
    for s in range(0, src.numel(), _DECODE_CHUNK):
        b = src[s : s + _DECODE_CHUNK]
        torch.mul(b, torch.bitwise_and(b, low).lt_(t), out=out[s : s + _DECODE_CHUNK])
    return out.view(encoded.dtype).reshape(encoded.shape)


def ulp_error(reference: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``|approx - reference|`` in units of the ulp of ``reference`` (float32 tensor, same shape).

    The ulp of ``x`` is the spacing of representable values in ``x``'s binade (the distance from
    ``|x|`` to the next larger magnitude; for the largest finite value, to the next smaller one).
    Exact for same-sign neighbours: their float32 difference is exact (Sterbenz) and the ulp is a
    power of two.
    """
    mant, min_sub = _ULP_PARAMS[reference.dtype]
    xf = reference.to(torch.float32)
    # ulp = 2**(exponent - mantissa bits), from the float32 exponent field (exact for all three
    # dtypes); subnormals share the smallest spacing.
    ulp = (xf.view(torch.int32) & 0x7F800000).view(torch.float32).mul(2.0**-mant).clamp_min_(min_sub)
    return (approx.to(torch.float32) - xf).abs_().div_(ulp)


_ULP_PARAMS = {torch.float32: (23, 2.0**-149), torch.bfloat16: (7, 2.0**-133), torch.float16: (10, 2.0**-24)}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB.

    Sums of squares accumulate in float64. Returns ``inf`` when the two are equal.
    """
    r = reference.detach()
    if r.dtype not in (torch.float32, torch.float64):
        r = r.to(torch.float32)
    e = approx.detach().to(r.dtype) - r
    noise = float(torch.linalg.vector_norm(e, dtype=torch.float64)) ** 2
    if noise == 0.0:
        return math.inf
    signal = float(torch.linalg.vector_norm(r, dtype=torch.float64)) ** 2
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
