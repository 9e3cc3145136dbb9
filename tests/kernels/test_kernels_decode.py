"""Decode kernels (elsa_codec/kernels/triton/decode.py): bit-exact against the reference for every dtype and code
width; the code rule of docs/DESIGN.md / ELSA arXiv 2312.06872 sec 2.2. Runs the compiled kernels on a
GPU, the Triton interpreter otherwise (conftest sets TRITON_INTERPRET=1 without CUDA)."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elsa_codec import MAX_CODE_BITS, ELSAError, encode_tensor
from elsa_codec.format.bits import bits_view, extract_level
from elsa_codec.format.bits import decode_counters as bits_decode_counters
from elsa_codec.kernels.triton import decode as decode_mod
from elsa_codec.kernels.triton import (
    decode_counters,
    decode_counters_reference,
    decode_level,
    decode_level_reference,
    kernels_available,
)

pytestmark = pytest.mark.usefixtures("poison_empty")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPE_K = [(dt, k) for dt in DTYPES for k in range(1, MAX_CODE_BITS[dt] + 1)]


def _id_dk(p):
    return f"{DTYPE_IDS[p[0]]}-k{p[1]}"


def make_encoded(shape, dtype, code_bits, seed=0, device=DEVICE):
    """Random encoded weight of ``shape`` with uniformly random codes ``0..2**k - 1``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    codes = torch.randint(0, 1 << code_bits, shape, generator=g)
    return encode_tensor(w, codes, code_bits).to(device)


def levels_for(code_bits):
    top = 1 << code_bits
    if top <= 16:
        return list(range(1, top + 1))
    return [1, 2, 3, top // 2, top - 1, top]


def assert_bits_equal(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits_view(a.cpu().contiguous()), bits_view(b.cpu().contiguous()))


def test_kernels_run_here():
    assert torch.isnan(torch.empty(3)).all(), "poison_empty fixture not active"
    """The tests exercise the Triton kernels (compiled or interpreted), not the fallback."""
    assert kernels_available(DEVICE)
    if not torch.cuda.is_available():
        assert decode_mod.INTERPRET


# 3 x 37 x 29 = 3219 elements: several interpreter programs (1024 each) and a ragged tail.
@pytest.mark.parametrize("dtype_k", DTYPE_K, ids=_id_dk)
def test_decode_level_bit_exact(dtype_k):
    dtype, k = dtype_k
    enc = make_encoded((3, 37, 29), dtype, k, seed=k)
    for t in levels_for(k):
        out = decode_level(enc, t, k)
        ref = extract_level(enc, t, k)
        assert_bits_equal(out, ref)
        if t < (1 << k):
            assert out.is_contiguous() and out.data_ptr() != enc.data_ptr()


@pytest.mark.parametrize("dtype_k", DTYPE_K, ids=_id_dk)
def test_decode_counters_bit_exact(dtype_k):
    dtype, k = dtype_k
    enc = make_encoded((3, 37, 29), dtype, k, seed=10 + k)
    out = decode_counters(enc, k)
    assert out.dtype == (torch.int16 if k == 8 else torch.uint8) and out.shape == enc.shape
    assert torch.equal(out.cpu(), bits_decode_counters(enc, k).cpu())
    assert torch.equal(out.cpu(), decode_counters_reference(enc, k).cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_signed_zeros_and_extremes(dtype):
    """-0.0, tiny and huge magnitudes keep their exact bit pattern; dropped ones become +0.0."""
    k = 2
    info = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, info.tiny, -info.tiny, info.max, -info.max, 1.0, -1.0] * 4)
    w = vals.to(dtype)
    codes = torch.arange(w.numel()) % 4
    enc = encode_tensor(w, codes, k).to(DEVICE)
    for t in range(1, 5):
        assert_bits_equal(decode_level(enc, t, k), extract_level(enc, t, k))


def test_dense_level_returns_input():
    enc = make_encoded((5, 7), torch.bfloat16, 2)
    assert decode_level(enc, 4, 2) is enc  # 2**k without num_levels
    assert decode_level(enc, 3, 2, num_levels=2) is enc  # T+1
    assert decode_level(enc, "dense", 2, num_levels=2) is enc
    assert decode_level_reference(enc, "dense", 2, num_levels=2) is enc


@pytest.mark.parametrize(
    "layout", ["transposed", "sliced", "expanded"],
)
def test_non_contiguous_input(layout):
    k = 3
    base = make_encoded((40, 33), torch.float32, k, seed=3)
    enc = {"transposed": base.t(), "sliced": base[::2, 1::3], "expanded": base[:1].expand(6, 33)}[layout]
    assert not enc.is_contiguous()
    for t in (1, 5):
        out = decode_level(enc, t, k)
        assert out.is_contiguous()
        assert_bits_equal(out, extract_level(enc, t, k))
    assert torch.equal(decode_counters(enc, k).cpu(), bits_decode_counters(enc, k).cpu())


@pytest.mark.parametrize("shape", [(), (0,), (1,), (4, 0, 3)], ids=["0d", "empty", "one", "empty3d"])
def test_tiny_shapes(shape):
    enc = make_encoded(shape, torch.float16, 2)
    assert_bits_equal(decode_level(enc, 2, 2), extract_level(enc, 2, 2))
    assert torch.equal(decode_counters(enc, 2).cpu(), bits_decode_counters(enc, 2).cpu())


def test_int64_offsets_path():
    """The int64-offset variant (used when sizes pass 2**31) gives the same bits."""
    enc = make_encoded((2100,), torch.bfloat16, 3)
    out = decode_mod._launch_decode_level(enc, 3, 3, _force_int64=True)
    assert_bits_equal(out, extract_level(enc, 3, 3))
    cnt = decode_mod._launch_decode_counters(enc, 3, _force_int64=True)
    assert torch.equal(cnt.cpu(), bits_decode_counters(enc, 3).cpu())


@settings(max_examples=15, deadline=None)
@given(
    dtype_k=st.sampled_from(DTYPE_K),
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_decode_property(dtype_k, shape, seed, data):
    dtype, k = dtype_k
    t = data.draw(st.integers(1, 1 << k), label="level")
    enc = make_encoded(tuple(shape), dtype, k, seed=seed)
    assert_bits_equal(decode_level(enc, t, k), extract_level(enc, t, k))


# ----------------------------------------------------------------------------- torch op
def test_ops_registered():
    assert hasattr(torch.ops.elsa_codec, "decode_level")
    assert hasattr(torch.ops.elsa_codec, "decode_counters")
    enc = make_encoded((9, 5), torch.float32, 3)
    assert_bits_equal(torch.ops.elsa_codec.decode_level(enc, 2, 3), extract_level(enc, 2, 3))


def test_opcheck_decode_level():
    enc = make_encoded((9, 70), torch.bfloat16, 3)
    torch.library.opcheck(torch.ops.elsa_codec.decode_level.default, (enc, 2, 3),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.elsa_codec.decode_counters.default, (enc, 3),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.isolated  # its own process: tests/conftest.py, "process isolation"
def test_torch_compile_matches_eager():
    enc = make_encoded((17, 70), torch.float16, 4)

    def f(e):
        return decode_level(e, 5, 4) * 2, decode_counters(e, 4)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, cnt = compiled(enc)
    want, want_cnt = f(enc)
    assert torch.equal(got.cpu(), want.cpu())
    assert torch.equal(cnt.cpu(), want_cnt.cpu())


def test_autograd_masks_gradient():
    enc = make_encoded((6, 8), torch.float32, 2).requires_grad_()
    out = decode_level(enc, 2, 2)
    out.sum().backward()
    keep = (bits_view(enc.detach()) & 3) < 2
    assert torch.equal(enc.grad, keep.to(torch.float32))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(3, dtype=torch.float64), 1, 2), "float64"),
        ((torch.zeros(3, dtype=torch.int32), 1, 2), "int32"),
        (("not a tensor", 1, 2), "str"),
        ((torch.zeros(3, dtype=torch.float16), 1, 5), "code_bits=5 is outside 1..4"),
        ((torch.zeros(3, dtype=torch.bfloat16), 1, 4), "code_bits=4 is outside 1..3"),
        ((torch.zeros(3), 0, 2), "level 0 is out of range 1..4"),
        ((torch.zeros(3), 5, 2), "level 5 is out of range 1..4"),
        ((torch.zeros(3), True, 2), "level must be an int"),
        ((torch.zeros(3), 1.0, 2), "level must be an int"),
        ((torch.zeros(3), "dense", 2), "needs num_levels"),
        ((torch.zeros(3), "sparse", 2), "'dense'"),
    ],
    ids=["fp64", "int32", "str", "fp16-k5", "bf16-k4", "level0", "level5", "bool", "float", "dense-noT", "bad-str"],
)
def test_decode_level_errors(args, match):
    with pytest.raises(ELSAError, match=match):
        decode_level(*args)


def test_decode_level_num_levels_range():
    with pytest.raises(ELSAError, match=r"level 4 is out of range 1..3"):
        decode_level(torch.zeros(3), 4, 2, num_levels=2)
    with pytest.raises(ELSAError, match="levels need codes"):
        decode_level(torch.zeros(3), 1, 2, num_levels=4)


@pytest.mark.parametrize("dtype, k", [(torch.float64, 2), (torch.float32, 9), (torch.float32, 0)], ids=["fp64", "k9", "k0"])
def test_decode_counters_errors(dtype, k):
    with pytest.raises(ELSAError):
        decode_counters(torch.zeros(3, dtype=dtype), k)


# ----------------------------------------------------------------------------- imports
def test_import_is_light():
    """``import elsa_codec`` needs no Triton; ``elsa_codec.kernels.triton`` does not initialise CUDA."""
    code = (
        "import sys, torch, elsa_codec\n"
        "assert 'triton' not in sys.modules, 'elsa_codec imported triton'\n"
        "import elsa_codec.kernels.triton\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
    )
    env = dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
