"""The sparse-cpu backend: packed formats, C++ kernels against their PyTorch references, the module
path (auto selection, fallback, gradients), loading one level from a memory-mapped file.

Packers and ``unpack`` move bits: bit-exact (``atol=0``). Products sum in another order than
``F.linear``: float32 summation-order tolerance, per dtype. Never a timing (see bench/cpu_sparse.py).
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import assert_close_linear, bits  # noqa: E402  (tests/kernels/kernel_cases.py)
from torch import nn

import elsa_codec as ec
from elsa_codec.format.bits import encode_tensor, extract_level
from elsa_codec.format.pages import release_pages
from elsa_codec.kernels.cpu import packed as cs
from elsa_codec.native import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU sparse kernels could not be built here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(63, 123), (123, 63), (64, 64), (1, 5), (17, 300)]
FORMATS = [("csr", (0, 0)), ("bitmask", (0, 0)), ("bsr", (16, 16)), ("bsr", (8, 4)), ("bsr", (64, 64)), ("bsr", (32, 8))]
GROUPS = [(1, 4), (2, 4), (2, 8), (3, 7)]  # nm: (n, m); 3:7 is neither a power of two nor divides 123


def encoded(n, k, dtype, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    codes = torch.randint(0, T + 1, (n, k), generator=g)
    return encode_tensor(w, codes, 2)


# -- packers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,block", FORMATS, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_pack_matches_reference_and_unpacks_to_the_level(fmt, block, shape, dtype):
    w = encoded(*shape, dtype)
    for t in (1, 2, 4):
        p = cs.pack_level(w, t, 2, fmt, block)
        r = cs.pack_level_reference(w, t, 2, fmt, block)
        assert p.format == r.format == fmt and p.nnz == r.nnz and p.tensors.keys() == r.tensors.keys()
        for name in p.tensors:
            assert torch.equal(bits(p.tensors[name]), bits(r.tensors[name])), (name, t)
        assert torch.equal(bits(cs.unpack(p)), bits(extract_level(w, t, 2))), t
        assert torch.equal(bits(cs.unpack_reference(p)), bits(extract_level(w, t, 2))), t


def test_pack_threads_and_strided_rows_bit_exact():
    w = encoded(123, 200, torch.float32)
    ref = cs.pack_level(w, 2, 2, "csr", threads=1)
    for nt in (2, 3):
        p = cs.pack_level(w, 2, 2, "csr", threads=nt)
        assert all(torch.equal(p.tensors[n], ref.tensors[n]) for n in p.tensors)
    view = torch.cat([w, w], 1)[:, :200]  # rows with a stride of 400 elements
    p = cs.pack_level(view, 2, 2, "csr")
    assert all(torch.equal(p.tensors[n], ref.tensors[n]) for n in p.tensors)


@pytest.mark.parametrize("fmt,block", FORMATS[:3] + [("nm", (0, 0))], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_pack_transposed_views_and_every_isa_bit_exact(fmt, block, dtype):
    """A transposed weight (a transformers Conv1D's) is packed in place; the AVX-512 row packer
    (compress-stores) and the one-weight-at-a-time packer give the same arrays."""
    from elsa_codec.native import ISAS, cpu_isa

    w = nm_encoded(123, 291, dtype, (2, 4)) if fmt == "nm" else encoded(123, 291, dtype)
    ref = cs.pack_level_reference(w, 2, 2, fmt, block, group=(2, 4))
    wt = w.t().contiguous().t()  # same values, column-major storage
    assert wt.stride() == (1, 123)
    top = cpu_isa()
    try:
        for isa in ISAS[: ISAS.index(top) + 1]:
            cpu_isa(isa)
            for src in (w, wt):
                p = cs.pack_level(src, 2, 2, fmt, block, group=(2, 4))
                assert all(torch.equal(bits(p.tensors[n]), bits(ref.tensors[n])) for n in ref.tensors), (isa, src.stride())
    finally:
        cpu_isa(top)



@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("n,k", [(300, 1201), (63, 123), (257, 16)], ids=str)
def test_column_stored_sub_blocks_and_csr_from_bitmask_every_isa(dtype, n, k):
    """A column-stored weight wide enough that a 256-row block is transposed in several sub-blocks
    (16 x 16 register tiles, row and column tails) packs as the reference does; the csr form derived
    from a bitmask level is the csr pack, padding included, on every ISA."""
    from elsa_codec.native import ISAS, cpu_isa

    w = encoded(n, k, dtype)
    wt = w.t().contiguous().t()
    top = cpu_isa()
    try:
        for isa in ISAS[: ISAS.index(top) + 1]:
            cpu_isa(isa)
            for t in (1, 2, 3):
                for fmt in ("csr", "bitmask"):
                    ref = cs.pack_level_reference(w, t, 2, fmt)
                    p = cs.pack_level(wt, t, 2, fmt)
                    assert all(torch.equal(bits(p.tensors[x]), bits(ref.tensors[x])) for x in ref.tensors), (isa, t, fmt)
                d = cs.csr_from_bitmask(cs.pack_level(wt, t, 2, "bitmask"), threads=2)
                c = cs.pack_level(w, t, 2, "csr")
                assert d.nnz == c.nnz and all(torch.equal(bits(d.tensors[x]), bits(c.tensors[x])) for x in c.tensors), (isa, t)
    finally:
        cpu_isa(top)
    with pytest.raises(ec.ELSAError, match="bitmask PackedLevel"):
        cs.csr_from_bitmask(cs.pack_level(w, 1, 2, "csr"))

def test_wide_rows_use_int32_columns():
    w = encoded(3, 70000, torch.float32)
    p = cs.pack_level(w, 2, 2, "csr")
    assert p.tensors["col"].dtype == torch.int32
    d = cs.csr_from_bitmask(cs.pack_level(w, 2, 2, "bitmask"))
    assert all(torch.equal(bits(d.tensors[n]), bits(p.tensors[n])) for n in p.tensors)
    assert torch.equal(bits(cs.unpack(p)), bits(extract_level(w, 2, 2)))
    for m in (1, 17):  # M > 1: the K-blocked product walks int32 columns chunk by chunk
        x = torch.randn(m, 70000)
        assert_close_linear(cs.sparse_linear(x, p), x, extract_level(w, 2, 2), None, torch.float32)


@pytest.mark.parametrize("fmt,group", [("csr", (0, 0)), ("bitmask", (0, 0)), ("nm", (2, 4)), ("nm", (3, 7))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_k_blocked_products_across_many_chunks_every_isa(fmt, group, dtype):
    """M > 1 products read x in K chunks of 16 KiB against 32 weight rows (elsa_cpu_mm.inc, "K
    blocking"): K = 1123 is 5-36 chunks at every panel width, 75 rows are 2 full row blocks and a
    partial one, a row with no kept weight sits among them; every ISA, the scalar one included."""
    from elsa_codec.native import ISAS, cpu_isa

    n, k = 75, 1123
    w = nm_encoded(n, k, dtype, group) if fmt == "nm" else encoded(n, k, dtype)
    w[40] = encode_tensor(w[40:41].float().to(dtype), torch.full((1, k), 3), 2)[0]  # row 40: nothing below level 3
    b = torch.randn(n).to(dtype)
    top = cpu_isa()
    try:
        for isa in ISAS[: ISAS.index(top) + 1]:
            cpu_isa(isa)
            for t in (1, 2):
                p = cs.pack_level(w, t, 2, fmt, group=group)
                for m in (2, 9, 33, 64, 130):
                    x = torch.randn(m, k).to(dtype)
                    assert_close_linear(cs.sparse_linear(x, p, b), x, extract_level(w, t, 2), b, dtype)
    finally:
        cpu_isa(top)


@pytest.mark.parametrize("l2", [512 << 10, 2 << 20], ids=["l2-512k", "l2-2m"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_csr_k_blocked_and_whole_rows_every_isa(l2, dtype, monkeypatch):
    """csr at 25% / 50% kept: with a 512 KiB L2 a panel over PANEL_BYTES (K = 2311, W = 64) runs
    K-blocked, narrower ones (M = 9, and M = 130 as three panels of 48) whole rows; with a 2 MiB L2 every panel is capped and runs whole rows
    (elsa_cpu_mm.inc, csr_rows). Both paths agree with F.linear on every ISA."""
    import elsa_codec.native as native

    monkeypatch.setattr(native, "l2_cache_bytes", lambda: l2)
    n, k = 75, 2311
    w = encoded(n, k, dtype)
    b = torch.randn(n).to(dtype)
    top = native.cpu_isa()
    try:
        for isa in native.ISAS[: native.ISAS.index(top) + 1]:
            native.cpu_isa(isa)
            for t in (1, 2):
                p = cs.pack_level(w, t, 2, "csr")
                for m in (9, 64, 128, 130):  # 130: three panels of 48, under PANEL_BYTES
                    x = torch.randn(m, k).to(dtype)
                    W = cs.panels(x, *cs.panel_cost_input(p))[1]
                    blocked = k * W * 4 > cs.PANEL_BYTES
                    assert blocked == (l2 < 4 * cs.PANEL_BYTES and m in (64, 128)), (l2, m, W)
                    assert_close_linear(cs.sparse_linear(x, p, b), x, extract_level(w, t, 2), b, dtype)
    finally:
        native.cpu_isa(top)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 90), t=st.integers(1, 4), seed=st.integers(0, 2**16),
       fmt=st.sampled_from(["csr", "bitmask", "bsr"]), r=st.sampled_from([8, 16, 3]), c=st.sampled_from([1, 4, 16]))
def test_property_pack_unpack_and_product(n, k, t, seed, fmt, r, c):
    w = encoded(n, k, torch.float32, seed=seed)
    p = cs.pack_level(w, t, 2, fmt, (r, c))
    wl = extract_level(w, t, 2)
    assert torch.equal(bits(cs.unpack(p)), bits(wl))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(seed))
    assert_close_linear(cs.sparse_linear(x, p), x, wl, None, torch.float32)
    assert_close_linear(cs.sparse_linear(x[:1], p), x[:1], wl, None, torch.float32)


# -- products ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,block", FORMATS[:4], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("m", [1, 3, 8, 17, 70])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_sparse_linear_equals_the_level(fmt, block, shape, dtype, m, bias):
    w = encoded(*shape, dtype)
    n, k = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    for t in (1, 3):
        p = cs.pack_level(w, t, 2, fmt, block)
        y = cs.sparse_linear(x, p, b)
        assert_close_linear(y, x, extract_level(w, t, 2), b, dtype)
        assert_close_linear(cs.sparse_linear_reference(x, p, b), x, extract_level(w, t, 2), b, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_every_instruction_set_gives_the_level(dtype):
    """The AVX-512 bitmask product (where the CPU has it) and the AVX2 / scalar paths below it."""
    from elsa_codec.native import ISAS, cpu_isa

    top = cpu_isa()
    w = encoded(123, 291, dtype)
    x = torch.randn(1, 291).to(dtype)
    b = torch.randn(123).to(dtype)
    try:
        for isa in ISAS[: ISAS.index(top) + 1]:
            assert cpu_isa(isa) == isa
            for fmt in ("bitmask", "csr"):
                p = cs.pack_level(w, 2, 2, fmt)
                assert_close_linear(cs.sparse_linear(x, p, b), x, extract_level(w, 2, 2), b, dtype)
    finally:
        cpu_isa(top)
    assert cpu_isa() == top
    with pytest.raises(ValueError, match="avx"):
        cpu_isa("sse9")


@pytest.mark.parametrize("fmt,block", FORMATS[:3], ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 9])
def test_threads_give_identical_results(fmt, block, m):
    w = encoded(123, 63, torch.float32)
    p = cs.pack_level(w, 2, 2, fmt, block)
    x = torch.randn(m, 63)
    one = cs.sparse_linear(x, p, threads=1)
    for nt in (2, 4):
        assert torch.equal(cs.sparse_linear(x, p, threads=nt), one)


def test_leading_dims_empty_batch_and_bad_input():
    w = encoded(63, 123, torch.float32)
    p = cs.pack_level(w, 2, 2, "csr")
    x = torch.randn(2, 3, 123)
    y = cs.sparse_linear(x, p)
    assert y.shape == (2, 3, 63)
    assert_close_linear(y, x, extract_level(w, 2, 2), None, torch.float32)
    assert cs.sparse_linear(torch.randn(0, 123), p).shape == (0, 63)
    with pytest.raises(ec.ELSAError, match="123"):
        cs.sparse_linear(torch.randn(1, 122), p)
    with pytest.raises(ec.ELSAError, match="bias"):
        cs.sparse_linear(torch.randn(1, 123), p, torch.zeros(62))
    with pytest.raises(ec.ELSAError, match="format"):
        cs.pack_level(w, 2, 2, "coo")
    with pytest.raises(ec.ELSAError, match="2-D"):
        cs.pack_level(w[0], 2, 2)
    with pytest.raises(ec.ELSAError, match="float64|dtype"):
        cs.pack_level(w.double(), 2, 2)


def nm_encoded(n, k, dtype, group, seed=0):
    """A weight whose level 1 keeps group[0] - 1 (at least 1) and level 2 keeps group[0] of each
    group of group[1] columns (the last group may be shorter); code 3 elsewhere."""
    nn_, mm_ = group
    g = torch.Generator().manual_seed(seed)
    G = -(-k // mm_)
    order = torch.rand(n, G, mm_, generator=g).argsort(-1)
    codes = torch.full((n, G, mm_), 3, dtype=torch.long)
    first = max(1, nn_ - 1)
    codes.scatter_(-1, order[..., :first], 0)
    codes.scatter_(-1, order[..., first:nn_], 1)
    w = torch.randn(n, k, generator=g).to(dtype)
    return encode_tensor(w, codes.view(n, G * mm_)[:, :k], 2)


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"{g[0]}:{g[1]}")
@pytest.mark.parametrize("shape", [(63, 123), (123, 63), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_nm_pack_is_the_reference_and_the_product_the_level(group, shape, dtype):
    w = nm_encoded(*shape, dtype, group)
    n, k = shape
    for t in (1, 2):
        p = cs.pack_level(w, t, 2, "nm", group=group)
        r = cs.pack_level_reference(w, t, 2, "nm", group=group)
        assert p.nnz == r.nnz and p.group == group and p.tensors.keys() == r.tensors.keys() == {"idx", "val"}
        for name in p.tensors:
            assert torch.equal(bits(p.tensors[name]), bits(r.tensors[name])), (name, t)
        assert torch.equal(bits(cs.unpack(p)), bits(extract_level(w, t, 2)))
        assert torch.equal(bits(cs.unpack_reference(p)), bits(extract_level(w, t, 2)))
        for m in (1, 3, 17, 70):
            x = torch.randn(m, k).to(dtype)
            b = torch.randn(n).to(dtype)
            assert_close_linear(cs.sparse_linear(x, p, b), x, extract_level(w, t, 2), b, dtype)


def test_nm_refuses_a_level_that_is_not_n_m():
    w = encoded(16, 64, torch.float32)  # about half of each group of 4 kept at level 2
    with pytest.raises(ec.ELSAError, match="not 1:4"):
        cs.pack_level(w, 2, 2, "nm", group=(1, 4))
    with pytest.raises(ec.ELSAError, match="group"):
        cs.pack_level(w, 2, 2, "nm", group=(5, 4))


@pytest.mark.parametrize("fmt,block", FORMATS[:4] + [("nm", (0, 0))], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("m", [1, 3, 17, 70, 257, 512])
def test_every_format_at_every_batch_size_and_isa(fmt, block, dtype, m):
    """M up to 512 (several x panels), each instruction set (AVX-512 and the 8-lane kernels)."""
    from elsa_codec.native import ISAS, cpu_isa

    w = nm_encoded(123, 291, dtype, (2, 4)) if fmt == "nm" else encoded(123, 291, dtype)
    x = torch.randn(m, 291).to(dtype)
    b = torch.randn(123).to(dtype)
    top = cpu_isa()
    try:
        for isa in ISAS[1: ISAS.index(top) + 1]:
            cpu_isa(isa)
            p = cs.pack_level(w, 2, 2, fmt, block, group=(2, 4))
            assert_close_linear(cs.sparse_linear(x, p, b), x, extract_level(w, 2, 2), b, dtype)
    finally:
        cpu_isa(top)


def test_panel_width_fits_l2_and_covers_m():
    assert cs.panel_width(1, 4096) == cs.panel_width(8, 4096) == 8
    for m in (9, 17, 63, 64, 65, 70, 257, 512):
        for kp in (291, 4096, 11008):
            w = cs.panel_width(m, kp)
            assert w % 16 == 0 and 16 <= w <= 64 and (w == 16 or kp * w * 4 <= cs.PANEL_BYTES)
            wide = cs.panel_width(m, kp, capped=False)  # the K-blocked products: as wide as M allows
            assert wide % 16 == 0 and w <= wide <= 64 and -(-m // wide) == -(-m // 64)
            assert -(-m // w) * w - m < 16 * -(-m // w)  # less than 16 padded columns per panel
    xp, w = cs.panels(torch.arange(6.0).view(2, 3), 5)
    assert w == 8 and xp.shape == (1, 5, 8) and xp[0, :3, :2].t().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert xp[0, 3:].abs().sum() == 0 and xp[0, :, 2:].abs().sum() == 0


# -- the module path ------------------------------------------------------------------------------
def linear_at_levels(levels, structure="unstructured", n=1031, k=520, dtype=torch.float32, bias=True):
    """A layer above SMALL_LAYER_BYTES in float32 and bfloat16 (the auto backend packs every level)."""
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    cnt = ec.magnitude_counters({"weight": lin.weight.detach().float()}, levels, structure=structure)
    return ec.ELSALinear.from_linear(lin, cnt)


@pytest.mark.parametrize("levels,structure", [
    ([0.9, 0.75, 0.5], "unstructured"),
    (["1:4", "2:4"], "unstructured"),
    ([0.75, 0.5], "block:16x16"),
], ids=["unstructured", "nm", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_module_serves_each_bucket_as_its_plan_says(levels, structure, dtype):
    """The suite runs the cost model (conftest): the module follows it bucket by bucket, and every
    route gives the level."""
    from elsa_codec.kernels.cpu.planner import BUCKETS, cost_model

    m = linear_at_levels(levels, structure, dtype=dtype)
    for t in range(1, len(levels) + 1):
        m.set_level(t)
        want = cost_model((1031, 520), dtype, 1 - m.sparsities[t - 1], m.structures[t - 1])
        plan = m.cpu_plan
        assert (plan.packed, plan.source) == (want.packed, "cost-model")
        assert m.backend == ("sparse-cpu" if any(want.packed) else "reference")
        if any(want.packed):
            head = "+".join(c[0] for c in plan.choices)
            assert plan.format == want.format and f"backend=sparse-cpu ({head} [M=1:" in repr(m)
        for rows in (1, 3, 17, 70, 257):
            x = torch.randn(rows, 520).to(dtype)
            m.clear_cache()
            with torch.inference_mode():
                y = m(x)
            assert_close_linear(y, x, extract_level(m.weight, t, m.code_bits), m.bias, dtype)
            packed = m.backend == "sparse-cpu" and plan.serves_packed(rows)
            assert (m._cached is None) == packed  # a dense-routed call decodes (cached)
    assert BUCKETS == (1, 8, 16, 64, 128, 256)
    m.set_level("dense")
    assert m.backend == "dense" and m.cached_bytes == 0 and len(m._packed) == 0


def test_unstructured_90_percent_is_packed_at_every_bucket_and_block_levels_use_bsr():
    m = linear_at_levels([0.9], n=1031, k=520)
    m.set_level(1)
    assert m.cpu_plan.format == "csr" and all(m.cpu_plan.packed)
    b = linear_at_levels([0.75], "block:16x16")
    b.set_level(1)
    assert b.packed_level().format == "bsr" and b.packed_level().block == (16, 16)



def test_a_two_format_plan_packs_the_weight_once_and_routes_each_bucket(monkeypatch):
    """A plan serving M = 1 from bitmask and larger M from csr: the switch packs the bitmask level
    from the encoded weight and derives the csr form from it (one read of the weight); each call
    runs the format its bucket names, and both give the level."""
    from elsa_codec.kernels.cpu.planner import Plan
    from elsa_codec.serving import cpu_plan

    m = linear_at_levels([0.75, 0.5])
    plan = Plan("csr", packed=(2, 1, 1, 1, 0, 0), source="measured", second=("bitmask", (0, 0), (0, 0)))
    monkeypatch.setattr(type(m), "cpu_plan", property(lambda self: plan))
    reads = []
    real = cpu_plan.pack_for_module
    monkeypatch.setattr("elsa_codec.serving.base.pack_for_module", lambda *a: reads.append(a[2]) or real(*a))
    m.set_level(2)
    assert reads == [("bitmask", (0, 0), (0, 0))] and len(m._packed) == 2
    formats = {p.format for p in m._packed._levels.values()}
    assert formats == {"csr", "bitmask"} and m.cached_bytes == m._packed.nbytes
    wl = extract_level(m.weight, 2, m.code_bits)
    for rows, fmt in ((1, "bitmask"), (3, "csr"), (17, "csr"), (70, None)):
        assert plan.choice_for(rows) == (None if fmt is None else (fmt, (0, 0), (0, 0)))
        x = torch.randn(rows, 520)
        with torch.inference_mode():
            assert_close_linear(m(x), x, wl, m.bias, torch.float32)
    assert len(reads) == 1  # no call packed again

def test_forced_rows_and_format_overrides():
    m = linear_at_levels([0.5])
    m.set_level(1)
    m.cpu_max_tokens = 1
    assert m.cpu_plan.source == "forced" and "packed for M<=1" in repr(m)
    x = torch.randn(4, 520)
    with torch.no_grad():
        y = m(x)  # 4 rows > max_tokens: the decoded weight
    assert m._cached is not None and m._cached[0][1] == "sparse-cpu"  # unpacked from the packed level
    torch.testing.assert_close(y, F.linear(x, extract_level(m.weight, 1, m.code_bits), m.bias), rtol=0, atol=0)
    m.cache = False
    m.clear_cache()
    with torch.no_grad():
        y1 = m(x)  # cache off: unpacked per call, only the packed level stays
    assert m._cached is None and len(m._packed) == 1 and torch.equal(y1, y)
    m.cache = True
    m.clear_cache()
    m.cpu_max_tokens = 64
    with torch.no_grad():
        y2 = m(x)
    assert m._cached is None
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)
    for fmt in ("csr", "bitmask"):
        m.cpu_format = fmt
        assert m.packed_level().format == fmt
    with pytest.raises(ec.ELSAError, match="block"):
        m.cpu_format = "bsr"
    with pytest.raises(ec.ELSAError, match="N:M"):
        m.cpu_format = "nm"
    assert m.cpu_format == "bitmask" and m.packed_level().format == "bitmask"
    m.cpu_format = None
    m.backend = "reference"
    assert m.backend == "reference" and "forced reference" in repr(m)
    with pytest.raises(ec.ELSAError, match="linear layers only"):
        ec.ELSAConv2d.from_conv2d(nn.Conv2d(2, 2, 1), torch.ones(2, 2, 1, 1, dtype=torch.long) * 2, num_levels=1).backend = "sparse-cpu"


def test_nm_levels_can_be_served_in_the_nm_format():
    m = linear_at_levels(["1:4", "2:4"])
    m.cpu_format = "nm"
    x = torch.randn(9, 520)
    for t in (1, 2):
        m.set_level(t)
        assert m.packed_level().format == "nm" and m.packed_level().group == (t, 4)
        m.cpu_max_tokens = 16
        with torch.no_grad():
            assert_close_linear(m(x), x, extract_level(m.weight, t, m.code_bits), m.bias, torch.float32)
        m.cpu_max_tokens = None


def test_small_layers_use_the_decoded_weight_unless_very_sparse():
    m = linear_at_levels([0.9, 0.5], n=63, k=128)  # 32 KiB: its dense GEMV runs from cache
    m.set_level(1)
    assert m.backend == "sparse-cpu" and m.packed_level().format == "csr"
    m.set_level(2)
    assert m.backend == "reference" and len(m._packed) == 0
    m.cpu_max_tokens = 1  # the override turns it on
    assert m.backend == "sparse-cpu" and len(m._packed) == 1 and "packed for M<=1" in repr(m)
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert_close_linear(m(x), x, extract_level(m.weight, 2, m.code_bits), m.bias, torch.float32)
    with pytest.raises(ec.ELSAError, match="cpu_max_tokens"):
        m.cpu_max_tokens = -1


def test_packed_levels_lru_keeps_recent_levels_within_the_budget():
    m = linear_at_levels([0.9, 0.75, 0.5])
    sizes = {}
    for t in (1, 2, 3):
        m.set_level(t)
        sizes[t] = m._packed.nbytes  # every packed form of the level (a plan may use two formats)
        assert sizes[t] >= m.packed_level().nbytes
        assert m._packed.levels() == [t]  # default: the current level only
    m.set_level("dense")
    assert len(m._packed) == 0
    m.packed_cache_bytes = sizes[1] + sizes[2]
    for t in (1, 2, 3):
        m.set_level(t)
    assert m._packed.levels() == [1, 2, 3] or m._packed.levels() == [2, 3]
    assert m._packed.nbytes - sizes[3] <= m.packed_cache_bytes
    m.set_level(2)  # still held: no packing
    p2 = m._packed.get(next(k for k in m._packed._levels if k[0] == 2 and k[4] == m.cpu_plan.format))
    assert m.packed_level() is p2 and m._packed.levels()[-1] == 2
    assert m.cached_bytes == m._packed.nbytes
    m.set_level("dense")  # the budget still holds what fits
    assert 0 < m._packed.nbytes <= m.packed_cache_bytes
    model = nn.Sequential(m)
    assert ec.set_packed_cache_bytes(model, None) == 1 and m.packed_cache_bytes is None and len(m._packed) == 0
    with pytest.raises(ec.ELSAError, match="nbytes"):
        ec.set_packed_cache_bytes(model, -1)


def test_module_gradients_flow_to_input_and_bias():
    m = linear_at_levels([0.75])
    m.set_level(1)
    x = torch.randn(1, 520, requires_grad=True)
    m(x).square().sum().backward()
    ref = nn.Linear(520, 1031)
    with torch.no_grad():
        ref.weight.copy_(extract_level(m.weight, 1, m.code_bits))
        ref.bias.copy_(m.bias)
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


def test_hf_conv1d_transposed_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(1031, 301)  # weight [nx=301, nf=1031]
    cnt = ec.magnitude_counters({"weight": conv.weight.detach()}, [0.9, 0.5])
    m = ec.ELSATransformersConv1D.from_conv1d(conv, cnt)
    x = torch.randn(1, 2, 301)
    for t in (1, 2):
        m.set_level(t)
        assert m.backend == "sparse-cpu" and m.packed_level().shape == (1031, 301)
        with torch.no_grad():
            y = m(x)
        ref = torch.addmm(m.bias, x.view(-1, 301), extract_level(m.weight, t, m.code_bits)).view(1, 2, 1031)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# -- loading one level from the file ---------------------------------------------------------------
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(520, 1031), nn.ReLU(), nn.Linear(1031, 33))  # 2 MiB and 133 KiB


def test_load_level_packs_only_that_level_and_switches(tmp_path):
    model = mlp()
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.75, 0.5]))
    path = str(tmp_path / "m.safetensors")
    ec.save_file(enc, path)
    served = ec.load(path, mlp(), level=1)
    x = torch.randn(1, 520)
    ref = mlp()
    for t in (1, 3, 2, "dense"):
        lv = ec.set_level(served, t)
        ref.load_state_dict(ec.extract(enc, lv))
        big, small = served[0], served[2]
        assert big.level == small.level == lv and big.keep_weight_resident is False
        assert big.backend == ("dense" if lv == 4 else "sparse-cpu") and (len(big._packed) == 0) == (lv == 4)
        assert small.backend == {1: "sparse-cpu", 4: "dense"}.get(lv, "reference")
        with torch.no_grad():
            torch.testing.assert_close(served(x), ref(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ec.ELSAError, match="level"):
        ec.load(path, mlp(), level=5)


def test_release_pages_only_for_mapped_files(tmp_path):
    path = str(tmp_path / "t.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.arange(300000, dtype=torch.float32)}, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        t = f.get_tensor("w")
    before = t.clone()
    assert release_pages(t) in (True, False)  # False only where the kernel lacks MADV_PAGEOUT
    assert torch.equal(t, before)  # the bytes come back from the file
    assert release_pages(torch.zeros(300000)) is False  # ordinary memory: never touched


def test_without_the_kernels_the_reference_path_serves_and_warns_once(tmp_path):
    code = (
        "import warnings, torch, elsa_codec as ec\n"
        "from torch import nn\n"
        "lin = nn.Linear(16, 8)\n"
        "m = ec.ELSALinear.from_linear(lin, ec.magnitude_counters({'weight': lin.weight.detach()}, [0.5]))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m.set_level(1); m.set_level(2); m.set_level(1)\n"
        "    y = m(torch.randn(1, 16))\n"
        "print(m.backend, sum('CPU sparse kernels are unavailable' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ, ELSA_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "1"]


def test_build_into_a_fresh_cache(tmp_path):
    code = "from elsa_codec.native import cpu_kernels; import os; lib = cpu_kernels(); print(lib is not None, os.path.dirname(lib._name))"
    env = dict(os.environ, ELSA_CPU_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ok, where = out.stdout.split()
    assert ok == "True" and where == str(tmp_path)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".so")] and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_load_level_assigns_plain_tensors_from_the_file_and_keeps_ties(tmp_path):
    """Non-encoded tensors become views of the mapped file (nothing copied); a tied pair stays one."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 520)
            self.fc = nn.Linear(520, 1031)
            self.head = nn.Linear(520, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.fc(self.emb(ids))[..., :520])

    torch.manual_seed(0)
    model = Tied()
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(model, [0.9, 0.5]))  # fc only ("blocks")
    path = str(tmp_path / "t.safetensors")
    ec.save_file(enc, path)
    fresh = Tied()
    before = fresh.fc.bias
    served = ec.load(path, fresh, level=1)
    assert served.fc.bias is not before and torch.equal(served.fc.bias, sd["fc.bias"])  # assigned, not copied
    assert served.head.weight is served.emb.weight and torch.equal(served.emb.weight, sd["emb.weight"])
    ids = torch.tensor([[1, 2, 3]])
    ref = Tied()
    ref.load_state_dict(ec.extract(enc, 1))
    with torch.no_grad():
        torch.testing.assert_close(served(ids), ref(ids), rtol=1e-5, atol=1e-5)
