"""The C code-rule kernels (elsa_codec/format/elsa_rule.c) against the PyTorch reference, bit for bit.

The reference is ``bits._encode_chunk`` (encode), ``bits._extract_reference`` (extract_level) and
``bits_view(x) & (2**k - 1)`` (decode_codes); docs/DESIGN.md, "The code rule"; ELSA arXiv 2312.06872,
section 2.2. Every comparison is on the raw bit patterns (``atol=0``).
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elsa_codec.format.bits as b
from elsa_codec import ELSAError, decode_codes, encode_tensor, extract_level
from elsa_codec.format.bits import _MAX_FINITE, MAX_CODE_BITS, bits_view

pytestmark = pytest.mark.skipif(b._rule_kernels() is None, reason="the C code-rule kernels could not be built here")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIDTH = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
DTYPE_K = [(n, k) for n, d in DTYPES.items() for k in range(1, MAX_CODE_BITS[d] + 1)]
SIZES = {"1": (1,), "63": (63,), "123": (123,), "64x64": (64, 64), "1536x384": (1536, 384)}


def from_patterns(pats: torch.Tensor, dtype) -> torch.Tensor:
    """Floats of the unsigned bit patterns ``pats`` (int64, any shape)."""
    w = WIDTH[dtype]
    signed = pats - (pats >= (1 << (w - 1))).to(torch.int64) * (1 << w)
    return signed.to(torch.int32 if w == 32 else torch.int16).view(dtype)


def random_finite(shape, dtype, g) -> torch.Tensor:
    """Uniformly random finite bit patterns of either sign."""
    w = WIDTH[dtype]
    n = torch.Size(shape).numel()
    pats = torch.randint(0, _MAX_FINITE[dtype] + 1, (n,), generator=g, dtype=torch.int64)
    pats |= torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << (w - 1)
    return from_patterns(pats, dtype).reshape(shape)


def reference_encode(x: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    flat, cflat = x.reshape(-1), codes.reshape(-1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), b._CHUNK):
        out[s : s + b._CHUNK] = b._encode_chunk(flat[s : s + b._CHUNK], cflat[s : s + b._CHUNK], k)
    return out.reshape(x.shape)


PAR_MIN = 1 << 17  # elsa_rule.c: from this many elements the kernels run on PyTorch's threads


def kernel_encode(x: torch.Tensor, codes: torch.Tensor, k: int, threads: int = 1) -> torch.Tensor:
    """The kernel called directly on ``threads`` PyTorch (OpenMP) threads."""
    rule = b._rule_kernels()
    x, codes = x.contiguous(), codes.contiguous()
    out = torch.empty_like(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        status = rule.encode[(x.dtype, codes.dtype)](x.data_ptr(), codes.data_ptr(), k, out.data_ptr(), x.numel())
    finally:
        torch.set_num_threads(before)
    assert status == 0
    return out


def same_bits(a: torch.Tensor, c: torch.Tensor) -> bool:
    return a.dtype == c.dtype and a.shape == c.shape and torch.equal(bits_view(a), bits_view(c))


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("dname, k", DTYPE_K, ids=[f"{n}-k{k}" for n, k in DTYPE_K])
def test_encode_equals_reference(dname, k, size):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(k * 1000 + len(size))
    x = random_finite(size, dtype, g)
    x.view(-1)[: min(4, x.numel())] = torch.randn(min(4, x.numel()), generator=g).to(dtype)  # ordinary weights too
    codes = torch.randint(0, 1 << k, size, generator=g, dtype=torch.uint8)
    got = encode_tensor(x, codes, k)
    assert same_bits(got, reference_encode(x, codes, k))


@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_encode_every_16bit_pattern_and_every_float32_edge(dname):
    """16-bit dtypes: every finite pattern of both signs with every code of every width. float32:
    the 600 patterns around the binade starts of exponents 0..3, 126..129 and 253, 254 (the
    subnormal/normal boundary included), next to zero and next to the largest finite value, with
    every code of every width."""
    dtype = DTYPES[dname]
    if WIDTH[dtype] == 16:
        pats = torch.arange(0, 1 << 16, dtype=torch.int64)
        pats = pats[(pats & 0x7FFF) <= _MAX_FINITE[dtype]]
    else:
        starts = torch.tensor([0, 1, 2, 3, 126, 127, 128, 129, 253, 254], dtype=torch.int64) << 23
        mags = (starts[:, None] + torch.arange(-300, 300)).reshape(-1)
        mags = torch.cat([mags, _MAX_FINITE[dtype] - torch.arange(600)]).clamp(0, _MAX_FINITE[dtype]).unique()
        pats = torch.cat([mags, mags | (1 << 31)])
    x = from_patterns(pats, dtype)
    for k in range(1, MAX_CODE_BITS[dtype] + 1):
        for code in range(1 << k):
            codes = torch.full(x.shape, code, dtype=torch.uint8)
            assert same_bits(encode_tensor(x, codes, k), reference_encode(x, codes, k)), (k, code)


@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_special_values(dname):
    """0, -0, the smallest subnormals, the largest finite values, values next to powers of two."""
    dtype = DTYPES[dname]
    tiny = torch.finfo(dtype).smallest_normal
    big = torch.finfo(dtype).max
    vals = [0.0, -0.0, tiny, -tiny, tiny / 2, big, -big, 1.0, -1.0, 2.0, 0.5, 1024.0, -65504.0 if dtype == torch.float16 else 3.0]
    x = torch.tensor(vals, dtype=torch.float32).to(dtype)
    x = torch.cat([x, torch.nextafter(x.float(), torch.zeros(())).to(dtype), from_patterns(torch.arange(0, 40), dtype)])
    for k in range(1, MAX_CODE_BITS[dtype] + 1):
        for code in range(1 << k):
            codes = torch.full(x.shape, code, dtype=torch.int64)
            y = encode_tensor(x, codes, k)
            assert same_bits(y, reference_encode(x, codes, k))
            assert torch.isfinite(y).all() and torch.equal(torch.signbit(y.float()), torch.signbit(x.float()))


@pytest.mark.parametrize("cdtype", [torch.uint8, torch.int32, torch.int64, torch.int16, torch.int8], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_code_dtypes(dname, cdtype):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(3)
    k = MAX_CODE_BITS[dtype]
    x = random_finite((300, 7), dtype, g)
    codes = torch.randint(0, min(1 << k, 128) if cdtype == torch.int8 else 1 << k, x.shape, generator=g).to(cdtype)
    assert same_bits(encode_tensor(x, codes, k), reference_encode(x, codes.to(torch.int64), k))


@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_parallel_path_equals_serial(dname):
    """Above PAR_MIN elements the kernel splits the work across OpenMP threads: same bits."""
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(4)
    k = MAX_CODE_BITS[dtype]
    x = random_finite((PAR_MIN * 2 + 77,), dtype, g)
    for cdtype in (torch.uint8, torch.int64):
        codes = torch.randint(0, 1 << k, x.shape, generator=g).to(cdtype)
        two = kernel_encode(x, codes, k, threads=2)
        assert same_bits(two, kernel_encode(x, codes, k, threads=1))
        assert same_bits(two, reference_encode(x, codes, k))


def test_large_tensor_over_4m():
    g = torch.Generator().manual_seed(6)
    x = random_finite(((1 << 22) + 5,), torch.float32, g)
    codes = torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8)
    assert same_bits(encode_tensor(x, codes, 8), reference_encode(x, codes, 8))


def test_non_contiguous_and_empty_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 48, generator=g)
    codes = torch.randint(0, 4, (64, 48), generator=g, dtype=torch.int64)
    y = encode_tensor(x.t(), codes.t(), 2)  # both transposed views
    assert y.is_contiguous() and same_bits(y, reference_encode(x.t().contiguous(), codes.t().contiguous(), 2))
    for dtype in DTYPES.values():
        e = encode_tensor(torch.empty(0, 3, dtype=dtype), torch.empty(0, 3, dtype=torch.uint8), 1)
        assert e.shape == (0, 3) and e.dtype == dtype
        assert decode_codes(e, 1).shape == (0, 3) and extract_level(e, 1, 1).shape == (0, 3)


@st.composite
def patterns(draw):
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    k = draw(st.integers(1, MAX_CODE_BITS[dtype]))
    w = WIDTH[dtype]
    pats = draw(st.lists(st.integers(0, (1 << w) - 1), min_size=1, max_size=200))
    codes = draw(st.lists(st.integers(0, (1 << k) - 1), min_size=len(pats), max_size=len(pats)))
    return dtype, k, torch.tensor(pats, dtype=torch.int64), torch.tensor(codes, dtype=torch.uint8)


@settings(max_examples=300, deadline=None)
@given(patterns())
def test_property_random_bit_patterns(c):
    """Random bit patterns (NaN and Inf included): finite inputs encode like the reference, any
    non-finite input is an error; extract and decode equal their references on every pattern."""
    dtype, k, pats, codes = c
    x = from_patterns(pats, dtype)
    fin = torch.isfinite(x)
    if fin.all():
        assert same_bits(encode_tensor(x, codes, k), reference_encode(x, codes, k))
    else:
        with pytest.raises(ELSAError, match="must be finite"):
            encode_tensor(x, codes, k)
        assert same_bits(encode_tensor(x[fin], codes[fin], k), reference_encode(x[fin], codes[fin], k))
    for t in range(1, (1 << k) + 2):
        assert same_bits(extract_level(x, t, k), b._extract_reference(x, t, k))
    assert torch.equal(decode_codes(x, k), (bits_view(x) & ((1 << k) - 1)).to(torch.uint8))


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_extract_and_decode_equal_reference(dname, size):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(8)
    for k in range(1, MAX_CODE_BITS[dtype] + 1):
        x = encode_tensor(random_finite(size, dtype, g), torch.randint(0, 1 << k, size, generator=g), k)
        for t in sorted({1, 2, 3, 1 << (k - 1), (1 << k) - 1, 1 << k, (1 << k) + 1, 1000}):
            got = extract_level(x, t, k)
            assert got is not x and same_bits(got, b._extract_reference(x, t, k))
        assert extract_level(x, 3, k, 2) is x  # the dense level of T = 2: the tensor itself
        d = decode_codes(x, k)
        assert d.dtype == torch.uint8 and torch.equal(d, (bits_view(x) & ((1 << k) - 1)).to(torch.uint8))


@pytest.mark.parametrize(
    "codes, msg",
    [
        (torch.tensor([0, 255, 1], dtype=torch.uint8), "got 0..255"),
        (torch.tensor([0, -1, 1], dtype=torch.int32), "got -1..1"),
        (torch.tensor([0, 1 << 40, 1], dtype=torch.int64), f"got 0..{1 << 40}"),  # low 32 bits are 0
        (torch.tensor([0, -1, 3], dtype=torch.int64), "got -1..3"),
        (torch.tensor([0, 4, 3], dtype=torch.int8), "got 0..4"),
        (torch.tensor([0, 256, 3], dtype=torch.int16), "got 0..256"),
        (torch.tensor([0, -2, 3], dtype=torch.int16), "got -2..3"),
    ],
    ids=["u8", "i32-negative", "i64-high-bits", "i64-negative", "i8", "i16-high", "i16-negative"],
)
def test_code_range_errors_from_the_kernel(codes, msg):
    with pytest.raises(ELSAError, match=f"layer.w: codes must lie in 0..3 for code_bits=2, {msg}"):
        encode_tensor(torch.ones(3), codes, 2, name="layer.w")


@pytest.mark.parametrize("dname", list(DTYPES), ids=list(DTYPES))
def test_non_finite_errors_from_the_kernel(dname):
    dtype = DTYPES[dname]
    x = torch.ones(1000, dtype=dtype)
    x[[3, 500]] = float("nan")
    x[7] = float("inf")
    x[999] = -float("inf")
    with pytest.raises(ELSAError, match="layer.w: weights must be finite, found 2 NaN and 2 Inf values"):
        encode_tensor(x, torch.zeros(1000, dtype=torch.uint8), 1, name="layer.w")


def test_kernel_disabled_path_gives_the_same_bits(monkeypatch):
    g = torch.Generator().manual_seed(9)
    for dtype in DTYPES.values():
        k = MAX_CODE_BITS[dtype]
        x = random_finite((257, 5), dtype, g)
        codes = torch.randint(0, 1 << k, x.shape, generator=g, dtype=torch.uint8)
        kern = (encode_tensor(x, codes, k), extract_level(x, 2, k), decode_codes(x, k))
        with monkeypatch.context() as m:
            m.setattr(b, "_RULE", [None])
            ref = (encode_tensor(x, codes, k), extract_level(x, 2, k), decode_codes(x, k))
        assert same_bits(kern[0], ref[0]) and same_bits(kern[1], ref[1]) and torch.equal(kern[2], ref[2])


def test_python_module_and_ctypes_entry_points_agree():
    """The CPython module _elsa_rule (where Python's headers were there) and the ctypes functions
    of the same shared object: same bits for every dtype and operation, one and two threads."""
    from elsa_codec.native import rule_kernels

    lib = rule_kernels()
    if lib.python_module is None:
        pytest.skip("built without Python's headers: ctypes only")
    via_py, via_ct = b._Rule(lib), b._Rule(lib, use_python=False)
    assert (via_py.via, via_ct.via) == ("python", "ctypes")
    g = torch.Generator().manual_seed(11)
    for dtype in DTYPES.values():
        k = MAX_CODE_BITS[dtype]
        for n in (4099, PAR_MIN + 5):
            x = random_finite((n,), dtype, g)
            x[7] = float("nan")  # status bit 0 from both
            codes = torch.randint(0, 1 << k, (n,), generator=g, dtype=torch.int16)
            codes[9] = 1 << k  # status bit 1 from both
            outs = []
            for rule in (via_py, via_ct):
                e, x_, d = torch.empty_like(x), torch.empty_like(x), torch.empty(n, dtype=torch.uint8)
                st = rule.encode[(dtype, torch.int16)](x.data_ptr(), codes.data_ptr(), k, e.data_ptr(), n)
                rule.extract[dtype](x.data_ptr(), k, 2, x_.data_ptr(), n)
                rule.decode[dtype](x.data_ptr(), k, d.data_ptr(), n)
                outs.append((st, bits_view(e), bits_view(x_), d))
            assert outs[0][0] == outs[1][0] == 3
            assert all(torch.equal(a, c) for a, c in zip(outs[0][1:], outs[1][1:]))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        via_py.extract[torch.float32](0, 1, 2)


def test_tensor_subclasses_run_the_reference():
    """A tensor subclass (here a trivial one; DTensor, FakeTensor) takes the PyTorch path."""

    class Sub(torch.Tensor):
        pass

    g = torch.Generator().manual_seed(10)
    x = torch.randn(40, 3, generator=g)
    codes = torch.randint(0, 4, x.shape, generator=g)
    want = encode_tensor(x, codes, 2)
    assert same_bits(encode_tensor(torch.nn.Parameter(x), codes, 2), want)
    got = encode_tensor(x.as_subclass(Sub), codes, 2)
    assert torch.equal(bits_view(got.as_subclass(torch.Tensor)), bits_view(want))
    assert torch.equal(bits_view(extract_level(want.as_subclass(Sub), 2, 2).as_subclass(torch.Tensor)), bits_view(extract_level(want, 2, 2)))


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


ENCODE_ONE = (
    "import warnings, torch, hashlib, elsa_codec.format.bits as b\n"
    "warnings.simplefilter('error')\n"
    "g = torch.Generator().manual_seed(1)\n"
    "x = torch.randn(300, 70, generator=g)\n"
    "y = b.encode_tensor(x, torch.randint(0, 8, x.shape, generator=g), 3)\n"
    "print(b._rule_kernels() is not None, hashlib.sha256(y.view(torch.int32).numpy().tobytes()).hexdigest())\n"
)


def test_env_turns_the_kernels_off_silently_with_the_same_bits():
    on = _run(ENCODE_ONE).split()
    off = _run(ENCODE_ONE, ELSA_CPU_KERNELS="0").split()
    assert on[0] == "True" and off[0] == "False" and on[1] == off[1]


def test_without_python_headers_ctypes_gives_the_same_bits(tmp_path):
    """No Python.h: the shared object is plain C, called through ctypes; same bits."""
    no_headers = "import elsa_codec.native as cb\ncb._python_include = lambda: None\n"
    plain = _run(no_headers + ENCODE_ONE + "print(b._rule_kernels().via)\n", ELSA_CPU_CACHE=str(tmp_path)).split()
    assert plain[0] == "True" and plain[2] == "ctypes" and plain[1] == _run(ENCODE_ONE).split()[1]


def test_cold_build_builds_only_the_rule(tmp_path):
    """A fresh cache: the first encode builds elsa_rule.c alone (not elsa_cpu.cpp), atomically."""
    _run(ENCODE_ONE, ELSA_CPU_CACHE=str(tmp_path))
    files = os.listdir(tmp_path)
    assert [f for f in files if f.startswith("elsa_rule_") and f.endswith(".so")]
    assert not [f for f in files if f.startswith("elsa_cpu") or f.startswith(".")]
