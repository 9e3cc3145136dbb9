"""The code rule, bit-exact: property tests over every finite value, code and code width."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elsa_codec import ELSAError, decode_codes, encode_tensor, extract_level, level_mask
from elsa_codec.format.bits import _MAX_FINITE, MAX_CODE_BITS, default_code_bits, ulp_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIDTH = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def from_patterns(pats, dtype):
    w = WIDTH[dtype]
    t = torch.tensor([p - (1 << w) if p >= (1 << (w - 1)) else p for p in pats], dtype=torch.int64)
    return t.to(torch.int32 if w == 32 else torch.int16).view(dtype)


def value(mag: int, dtype) -> float:
    return from_patterns([mag], dtype).double().item()


def brute_force(x_pat: int, code: int, k: int, dtype) -> int:
    """Nearest same-sign finite pattern with low bits == code; ties -> smaller magnitude."""
    w = WIDTH[dtype]
    sign = x_pat & (1 << (w - 1))
    mag = x_pat & ((1 << (w - 1)) - 1)
    xv = value(mag, dtype)
    best = None
    for m in range(max(0, mag - (1 << (k + 1))), min(_MAX_FINITE[dtype], mag + (1 << (k + 1))) + 1):
        if m & ((1 << k) - 1) != code:
            continue
        d = abs(value(m, dtype) - xv)
        if best is None or d < best[0] or (d == best[0] and m < best[1]):
            best = (d, m)
    return sign | best[1]


@st.composite
def case(draw):
    name = draw(st.sampled_from(list(DTYPES)))
    dtype = DTYPES[name]
    k = draw(st.integers(1, MAX_CODE_BITS[dtype]))
    w = WIDTH[dtype]
    maxf = _MAX_FINITE[dtype]
    special = [0, 1, 2, (1 << k) - 1, 1 << k, maxf, maxf - 1, maxf - (1 << k), 0x00800000 if w == 32 else 0x0080 if dtype == torch.bfloat16 else 0x0400]
    mag = st.one_of(st.integers(0, maxf), st.sampled_from(special), st.sampled_from([s + d for s in special for d in (-1, 1) if 0 <= s + d <= maxf]))
    mags = draw(st.lists(mag, min_size=1, max_size=24))
    signs = draw(st.lists(st.booleans(), min_size=len(mags), max_size=len(mags)))
    pats = [m | ((1 << (w - 1)) if s else 0) for m, s in zip(mags, signs)]
    codes = draw(st.lists(st.integers(0, (1 << k) - 1), min_size=len(pats), max_size=len(pats)))
    return dtype, k, pats, codes


@settings(max_examples=300, deadline=None)
@given(case())
def test_code_rule_is_nearest_same_sign_finite(c):
    dtype, k, pats, codes = c
    x = from_patterns(pats, dtype)
    y = encode_tensor(x, torch.tensor(codes), k)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert decode_codes(y, k).tolist() == codes
    ybits = (y.view(torch.int32 if WIDTH[dtype] == 32 else torch.int16).to(torch.int64) & ((1 << WIDTH[dtype]) - 1)).tolist()
    for p, code, yb in zip(pats, codes, ybits):
        assert yb == brute_force(p, code, k, dtype), (hex(p), code, k, dtype)
    # same sign (signed zeros included)
    sx = torch.signbit(x.float())
    sy = torch.signbit(y.float())
    assert torch.equal(sx, sy)


@settings(max_examples=200, deadline=None)
@given(case())
def test_error_bound_half_the_code_span(c):
    """Error <= 2**(k-1) ulp, the ulp taken 2**(k-1) values above |x| (docs/DESIGN.md); edges excluded."""
    dtype, k, pats, codes = c
    x = from_patterns(pats, dtype)
    y = encode_tensor(x, torch.tensor(codes), k)
    w = WIDTH[dtype]
    maxf = _MAX_FINITE[dtype]
    for p, xv, yv in zip(pats, x.double().tolist(), y.double().tolist()):
        mag = p & ((1 << (w - 1)) - 1)
        if mag < (1 << k) or mag > maxf - (1 << k):
            assert abs(yv - xv) <= (1 << k) * (value(min(mag + 1, maxf), dtype) - value(min(mag, maxf - 1), dtype)) * 2
            continue
        hi = mag + (1 << (k - 1))
        ulp = value(hi + 1, dtype) - value(hi, dtype)
        assert abs(yv - xv) <= (1 << (k - 1)) * ulp


def test_plain_overwrite_error_is_halved():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    for k in (1, 2, 4, 8):
        c = torch.randint(0, 1 << k, x.shape)
        y = encode_tensor(x, c, k)
        assert float(ulp_error(x, y).max()) <= 2 ** (k - 1)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", [(63,), (123, 63), (4, 3, 3, 3)], ids=["63", "123x63", "conv"])
def test_extract_equals_where_mask(dtype, shape):
    torch.manual_seed(1)
    x = torch.randn(shape).to(dtype)
    T = 3
    k = default_code_bits(T)
    n = torch.randint(1, T + 2, shape)
    y = encode_tensor(x, n - 1, k)
    for t in range(1, T + 2):
        ref = torch.where(n <= t, y, torch.zeros((), dtype=dtype))
        got = extract_level(y, t, k, T)
        assert torch.equal(got, ref)
        assert torch.equal(level_mask(y, t, k, T), n <= t)
    assert extract_level(y, T + 1, k, T) is y  # dense: the stored tensor, bit-identical


def test_caller_tensor_not_modified():
    x = torch.randn(50)
    before = x.clone()
    encode_tensor(x, torch.ones(50, dtype=torch.int64), 2)
    assert torch.equal(x, before)


def test_default_code_bits():
    assert [default_code_bits(t) for t in (1, 2, 3, 4, 7, 8, 15)] == [1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize(
    "x, codes, k, msg",
    [
        (torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), 2, "1 NaN"),
        (torch.tensor([1.0, float("inf")]), torch.tensor([0, 0]), 2, "1 Inf"),
        (torch.ones(3), torch.tensor([0, 4, 1]), 2, "0..3"),
        (torch.ones(3), torch.tensor([0, -1, 1]), 2, "0..3"),
        (torch.ones(3), torch.zeros(2, dtype=torch.int64), 2, "shape"),
        (torch.ones(3), torch.zeros(3), 2, "integer"),
        (torch.ones(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.int64), 4, "1..3"),
        (torch.ones(3, dtype=torch.float16), torch.zeros(3, dtype=torch.int64), 5, "1..4"),
        (torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), 2, "unsupported dtype"),
        (torch.ones(3, dtype=torch.int8), torch.zeros(3, dtype=torch.int64), 2, "unsupported dtype"),
    ],
    ids=["nan", "inf", "code-high", "code-negative", "shape", "float-codes", "bf16-k4", "fp16-k5", "float64", "int8"],
)
def test_bad_input_names_the_tensor(x, codes, k, msg):
    with pytest.raises(ELSAError, match=msg) as e:
        encode_tensor(x, codes, k, name="layer.weight")
    assert "layer.weight" in str(e.value)


def test_level_out_of_range():
    y = encode_tensor(torch.ones(4), torch.zeros(4, dtype=torch.int64), 2)
    with pytest.raises(ELSAError, match="out of range"):
        extract_level(y, 5, 2, 3)
    with pytest.raises(ELSAError, match="out of range"):
        extract_level(y, 0, 2, 3)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_kernel_bit_exact_with_reference_on_4m_elements(dtype, monkeypatch):
    """CPU tensors go through the C kernel (elsa_codec/format/elsa_rule.c): same bits as the PyTorch
    reference, here on 4M elements (the OpenMP path) with zero, subnormals and the largest values."""
    import elsa_codec.format.bits as b

    if b._rule_kernels() is None:
        pytest.skip("the C code-rule kernels could not be built here")
    n = 1 << 22
    g = torch.Generator().manual_seed(5)
    w = WIDTH[dtype]
    pats = torch.randint(0, _MAX_FINITE[dtype] + 1, (n,), generator=g, dtype=torch.int64)
    pats[:64] = torch.arange(64)  # subnormals and zero
    pats[64:128] = _MAX_FINITE[dtype] - torch.arange(64)  # the largest finite values
    pats |= torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << (w - 1)
    x = pats.to(torch.int32 if w == 32 else torch.int16).view(dtype) if w == 32 else (pats - (pats >= 1 << 15) * (1 << 16)).to(torch.int16).view(dtype)
    k = MAX_CODE_BITS[dtype]
    codes = torch.randint(0, 1 << k, (n,), generator=g, dtype=torch.uint8)
    kernel = encode_tensor(x, codes, k)
    monkeypatch.setattr(b, "_RULE", [None])
    reference = encode_tensor(x, codes, k)
    assert torch.equal(b.bits_view(kernel), b.bits_view(reference))
