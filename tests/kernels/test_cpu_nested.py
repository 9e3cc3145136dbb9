"""The nested csr: every sparse level of one weight in one packed form (kernels/cpu/nested.py).

The packer moves bits: bit-exact against its PyTorch reference (``atol=0``, compared as bytes), and
each level view unpacks to ``extract_level``. Products sum in another order than ``F.linear``: the
per-dtype tolerances of test_cpu_sparse.py. Never a timing.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_close_linear, bits  # noqa: E402  (tests/kernels/kernel_cases.py)

import elsa_codec as ec
from elsa_codec.format.bits import encode_tensor, extract_level
from elsa_codec.kernels.cpu import nested as nz
from elsa_codec.kernels.cpu import packed as cs
from elsa_codec.native import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU sparse kernels could not be built here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(63, 123), (123, 63), (64, 64), (1, 5), (17, 300)]

CASES = [(1, 1), (2, 2), (3, 2), (7, 3)]  # (T, code_bits)


def encoded(n, k, dtype, T=3, code_bits=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    return encode_tensor(w, torch.randint(0, T + 1, (n, k), generator=g), code_bits)


def assert_same(a: nz.NestedLevels, b: nz.NestedLevels):
    assert (a.shape, a.dtype, a.num_levels, a.nnz) == (b.shape, b.dtype, b.num_levels, b.nnz)
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        assert a.tensors[name].dtype == b.tensors[name].dtype, name
        assert torch.equal(bits(a.tensors[name]), bits(b.tensors[name])), name


def isas():
    from elsa_codec.native import ISAS, cpu_isa

    return ISAS[1 : ISAS.index(cpu_isa()) + 1]


# -- the packer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("T,k", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_pack_is_the_reference_and_every_level_unpacks_to_it(T, k, shape, dtype):
    w = encoded(*shape, dtype, T, k)
    p = nz.pack_nested(w, T, k)
    assert_same(p, nz.pack_nested_reference(w, T, k))
    sp = p.tensors["segptr"]
    assert sp.shape == (T, shape[0] + 1) and bool((sp % 8 == 0).all()) and bool((sp.diff(dim=1) >= 0).all())
    assert torch.equal(sp[1:, 0], sp[:-1, -1]) and int(sp[0, 0]) == 0  # segment-major, back to back
    for t in range(1, T + 1):
        lv = p.level(t)
        assert lv is p.level(t) and lv.format == "csr" and lv.level == t and lv.nnz == p.nnz[t - 1]
        assert lv.tensors["val"].data_ptr() == p.tensors["val"].data_ptr()
        assert lv.tensors["rowptr"].data_ptr() == sp.data_ptr() and lv.tensors["rowptr"].shape == (t, shape[0] + 1)
        wl = extract_level(w, t, k)
        assert lv.nnz == int(((w.view(torch.int32 if dtype == torch.float32 else torch.int16) & ((1 << k) - 1)) < t).sum())
        assert torch.equal(bits(cs.unpack(lv)), bits(wl)), t
        assert torch.equal(bits(cs.unpack_reference(lv)), bits(wl)), t


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("n,k", [(300, 123), (63, 123), (17, 1)], ids=str)
def test_transposed_and_strided_weights_every_isa(dtype, n, k):
    """A column-stored weight (a transformers Conv1D's ``.t()``; 300 rows: two 256-row blocks) and a
    row-strided view pack as the contiguous weight does, on every instruction set."""
    from elsa_codec.native import cpu_isa

    w = encoded(n, k, dtype)
    ref = nz.pack_nested_reference(w, 3, 2)
    wt = w.t().contiguous().t()
    strided = torch.cat([w, w], 1)[:, :k]
    top = cpu_isa()
    try:
        for isa in ("scalar", *isas()):
            cpu_isa(isa)
            for src in (w, wt, strided):
                assert_same(nz.pack_nested(src, 3, 2), ref)
    finally:
        cpu_isa(top)


@pytest.mark.parametrize("T,k,dtype", [(9, 4, torch.float32), (15, 4, torch.float16), (255, 8, torch.float32)], ids=str)
def test_many_levels_every_isa(T, k, dtype):
    """More than 8 levels: the AVX-512 packer walks each 16 weights' distinct codes."""
    from elsa_codec.native import cpu_isa

    w = encoded(37, 300, dtype, T, k)
    ref = nz.pack_nested_reference(w, T, k)
    top = cpu_isa()
    try:
        for isa in ("scalar", *isas()):
            cpu_isa(isa)
            p = nz.pack_nested(w, T, k)
            assert_same(p, ref)
            for t in (1, T // 2, T):
                assert torch.equal(bits(cs.unpack(p.level(t))), bits(extract_level(w, t, k))), (isa, t)
    finally:
        cpu_isa(top)


def test_threads_give_identical_arrays_and_products():
    w = encoded(123, 300, torch.float32)
    one, two = nz.pack_nested(w, 3, 2, threads=1), nz.pack_nested(w, 3, 2, threads=2)
    assert_same(one, two)
    for m in (1, 17):
        x = torch.randn(m, 300)
        for t in (1, 2, 3):
            assert torch.equal(cs.sparse_linear(x, one.level(t), threads=1), cs.sparse_linear(x, two.level(t), threads=2))


def test_wide_rows_use_int32_columns():
    w = encoded(3, 70000, torch.float32)
    p = nz.pack_nested(w, 3, 2)
    assert p.tensors["col"].dtype == torch.int32
    assert_same(p, nz.pack_nested_reference(w, 3, 2))
    x = torch.randn(1, 70000)
    assert_close_linear(cs.sparse_linear(x, p.level(2)), x, extract_level(w, 2, 2), None, torch.float32)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 90), T=st.integers(1, 7), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), transposed=st.booleans())
def test_property_pack_unpack_and_product(n, k, T, seed, dtype, transposed):
    code_bits = max(1, T.bit_length())
    w = encoded(n, k, dtype, T, code_bits, seed)
    p = nz.pack_nested(w.t().contiguous().t() if transposed else w, T, code_bits)
    assert_same(p, nz.pack_nested_reference(w, T, code_bits))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for t in range(1, T + 1):
        wl = extract_level(w, t, code_bits)
        assert torch.equal(bits(cs.unpack(p.level(t))), bits(wl))
        assert_close_linear(cs.sparse_linear(x, p.level(t)), x, wl, None, dtype)
        assert_close_linear(cs.sparse_linear(x[:1], p.level(t)), x[:1], wl, None, dtype)


# -- the product ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", [(63, 123), (123, 63)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sparse_linear_every_level_batch_size_and_isa(dtype, shape):
    from elsa_codec.native import cpu_isa

    n, k = shape
    w = encoded(n, k, dtype)
    p = nz.pack_nested(w, 3, 2)
    g = torch.Generator().manual_seed(1)
    b = torch.randn(n, generator=g).to(dtype)
    xs = {m: torch.randn(m, k, generator=g).to(dtype) for m in (1, 3, 17, 70, 257)}
    top = cpu_isa()
    try:
        for isa in isas():
            cpu_isa(isa)
            for t in (1, 2, 3):
                wl = extract_level(w, t, 2)
                for m, x in xs.items():
                    for bias in (None, b):
                        assert_close_linear(cs.sparse_linear(x, p.level(t), bias), x, wl, bias, dtype)
                assert_close_linear(cs.sparse_linear_reference(xs[17], p.level(t), b), xs[17], wl, b, dtype)
    finally:
        cpu_isa(top)


def test_gradients_leading_dims_and_bytes():
    w = encoded(40, 64, torch.float32)
    p = nz.pack_nested(w, 3, 2)
    wl = extract_level(w, 2, 2)
    x = torch.randn(2, 3, 64, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    cs.sparse_linear(x, p.level(2), b).square().sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, wl, b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-4) and torch.allclose(b.grad, b2.grad, atol=1e-4)
    ts = p.tensors
    assert p.nbytes == sum(v.numel() * v.element_size() for v in ts.values())
    for t in (1, 2, 3):
        entries = int(ts["segptr"][t - 1, -1]) + 8
        assert p.level(t).nbytes == entries * (4 + 2) + t * 41 * 8
    assert p.level(1).nbytes < p.level(2).nbytes < p.level(3).nbytes <= p.nbytes
    # level 1 is a plain csr level, padding and all: the same arrays pack_level writes
    plain = cs.pack_level(w, 1, 2, "csr")
    assert p.level(1).nbytes == plain.nbytes
    n1 = int(ts["segptr"][0, -1])
    assert torch.equal(ts["segptr"][0], plain.tensors["rowptr"]) and torch.equal(ts["col"][:n1], plain.tensors["col"][:n1])


def test_bad_input_is_refused_before_any_work():
    w = encoded(8, 16, torch.float32)
    with pytest.raises(ec.ELSAError, match="mine.*2-D"):
        nz.pack_nested(w[0], 3, 2, name="mine")
    with pytest.raises(ec.ELSAError, match="mine.*float64"):
        nz.pack_nested(w.double(), 3, 2, name="mine")
    with pytest.raises(ec.ELSAError, match="mine.*code_bits"):
        nz.pack_nested(w, 3, 9, name="mine")
    with pytest.raises(ec.ELSAError, match="mine.*num_levels"):
        nz.pack_nested(w, 0, 2, name="mine")
    with pytest.raises(ec.ELSAError, match="mine.*4 levels"):
        nz.pack_nested(w, 4, 2, name="mine")
    with pytest.raises(ec.ELSAError, match="bfloat16"):
        nz.pack_nested(w.bfloat16(), 15, 4, name="mine")
    with pytest.raises(ec.ELSAError, match="num_levels"):
        nz.pack_nested_reference(w, True, 2)
    if torch.backends.mps.is_available() or torch.cuda.is_available():
        with pytest.raises(ec.ELSAError, match="CPU"):
            nz.pack_nested(w.to("cuda" if torch.cuda.is_available() else "mps"), 3, 2, name="mine")
    with pytest.raises(ec.ELSAError, match="mine.*CPU"):
        nz.pack_nested(w.to("meta"), 3, 2, name="mine")
    p = nz.pack_nested(w, 3, 2)
    for t in (0, 4, "dense", 2.0, True):
        with pytest.raises(ec.ELSAError, match="1..3"):
            p.level(t)
    with pytest.raises(ec.ELSAError, match="16"):
        cs.sparse_linear(torch.randn(2, 15), p.level(1))
