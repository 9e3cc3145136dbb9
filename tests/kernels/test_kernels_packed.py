"""The packed GPU level (kernels/triton/packed.py, packed_unpack.py, packed_linear.py, route.py).

Packing and the expansion are integer work: checked bit-exact (``atol=0``) against
``where(code < t, W, 0)``; the product against a float64 reference with per-dtype tolerances, at
odd shapes and M in {1, 3, 17, 32}. Compiled kernels on a GPU, the Triton interpreter otherwise
(tests/conftest.py sets TRITON_INTERPRET=1 without CUDA).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import make_codes  # noqa: E402  (tests/kernels/kernel_cases.py)

import elsa_codec as ec
from elsa_codec import ELSAError, encode_tensor
from elsa_codec.format.bits import extract_level
from elsa_codec.kernels.triton import (
    GpuModel,
    PackedLevel,
    cuda_route,
    default_tile_rows,
    kernels_available,
    pack_level,
    packed_linear,
    packed_linear_reference,
    packed_nbytes,
    unpack_level,
    unpack_level_reference,
)

route_mod = importlib.import_module("elsa_codec.kernels.triton.route")
linear_mod = importlib.import_module("elsa_codec.kernels.triton.packed_linear")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
T, K_BITS = 3, 2
SHAPES = [(63, 123), (123, 63), (64, 128), (1, 1), (130, 65)]


def make(n, k, dtype, structure="unstructured", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    return encode_tensor(w, make_codes(structure, n, k, T, g), K_BITS).to(DEVICE)


def bits(t):
    return t.contiguous().view(INT[t.dtype])


# ----------------------------------------------------------------------------- packing and expansion
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block64"])
def test_pack_and_expand_are_bit_exact(dtype, shape, structure):
    enc = make(*shape, dtype, structure)
    for t in range(1, T + 2):
        want = bits(extract_level(enc, t, K_BITS))
        for tile_n in (16, 64):
            p = pack_level(enc, t, K_BITS, tile_n=tile_n)
            assert p.values.numel() == int(((bits(enc) & 3) < t).sum())
            assert torch.equal(bits(unpack_level_reference(p)), want)
            assert torch.equal(bits(unpack_level(p)), want), (t, tile_n)  # the kernel's expansion


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 140), k=st.integers(1, 200), t=st.integers(1, T + 1), tile_n=st.sampled_from([16, 32, 64, 128]),
       seed=st.integers(0, 2**16))
def test_pack_round_trip_any_shape(n, k, t, tile_n, seed):
    enc = make(n, k, torch.bfloat16, seed=seed).cpu()
    p = pack_level(enc, t, K_BITS, tile_n=tile_n)
    assert torch.equal(bits(unpack_level_reference(p)), bits(extract_level(enc, t, K_BITS)))
    assert p.nbytes == pytest.approx(packed_nbytes(n, k, p.density, 2, tile_n), rel=1e-9)


def test_layout_is_the_documented_one():
    """Bitmap bit j of word h of (row r, tile kt) is column 64 kt + 32 h + j; values tile by tile,
    rows then columns; bases the exclusive prefix of the tiles' counts."""
    enc = make(70, 130, torch.float32)
    p = pack_level(enc, 2, K_BITS, tile_n=32)
    keep = (bits(enc) & 3) < 2
    words = p.bitmap.to(torch.int64) & 0xFFFFFFFF
    for r, c in [(0, 0), (5, 31), (5, 32), (69, 129), (33, 64), (31, 127)]:
        assert bool((words[r, c // 64, (c % 64) // 32] >> (c % 32)) & 1) == bool(keep[r, c])
    assert p.bitmap.shape == (96, 3, 2) and p.tile_base.shape == (3, 3)
    tile = keep[32:64, 64:128]  # tile (1, 1)
    first = int(p.tile_base[1, 1])
    assert torch.equal(p.values[first:first + int(tile.sum())], enc[32:64, 64:128][tile])
    assert int(p.tile_base[0, 0]) == 0 and p.values.numel() == int(keep.sum())


def test_caller_tensor_not_modified():
    enc = make(40, 70, torch.float16)
    before = enc.clone()
    p = pack_level(enc, 1, K_BITS)
    packed_linear(torch.randn(2, 70).half().to(DEVICE), p)
    assert torch.equal(bits(enc), bits(before))


# ----------------------------------------------------------------------------- the product
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("shape", [(63, 123), (123, 63)], ids=["63x123", "123x63"])
@pytest.mark.parametrize("m", [1, 3, 17, 32])
def test_product_matches_float64(dtype, shape, m):
    n, k = shape
    enc = make(n, k, dtype, seed=m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    rtol, atol = TOL[dtype]
    for t in (1, 3):
        p = pack_level(enc, t, K_BITS, tile_n=default_tile_rows(dtype))
        ref = F.linear(x.double(), extract_level(enc, t, K_BITS).double(), b.double())
        for split_k in (None, 1, 2):
            y = packed_linear(x, p, b, split_k=split_k)
            assert y.dtype == dtype and y.shape == (m, n)
            torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)
        torch.testing.assert_close(packed_linear(x, p).double(), ref - b.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("tile_n", [16, 32, 64, 128])
def test_every_tile_height_and_lead_dims(tile_n):
    enc = make(100, 200, torch.bfloat16, "2:4", seed=tile_n)
    x = torch.randn(2, 3, 200).bfloat16().to(DEVICE)
    p = pack_level(enc, 1, K_BITS, tile_n=tile_n)
    want = F.linear(x.double(), extract_level(enc, 1, K_BITS).double())
    torch.testing.assert_close(packed_linear(x, p).double(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(packed_linear_reference(x, p).double(), want, rtol=1e-2, atol=1e-2)


def test_empty_level_and_empty_input():
    enc = make(50, 70, torch.float16)
    codes = torch.full((50, 70), 3)
    enc = encode_tensor(enc.cpu(), codes, K_BITS).to(DEVICE)  # every weight in the dense level only
    p = pack_level(enc, 1, K_BITS)
    assert p.values.numel() == 0
    b = torch.randn(50).half().to(DEVICE)
    assert torch.equal(packed_linear(torch.randn(4, 70).half().to(DEVICE), p, b), b.expand(4, 50))
    assert packed_linear(torch.randn(0, 70).half().to(DEVICE), p).shape == (0, 50)


def test_split_k_choice():
    assert linear_mod.split_k_for(1, 64, 64, 132) == 5  # 64 programs alone: about 2 per SM
    assert linear_mod.split_k_for(1, 172, 64, 132) == 2
    assert linear_mod.split_k_for(1, 1024, 64, 132) == 1
    assert linear_mod.split_k_for(1, 1, 3, 132) == 3  # never more splits than K tiles


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, match", [
    (lambda p, x: packed_linear(x[:, :5], p), r"shape \(2, 5\) does not match the packed weight \[40, 70\]"),
    (lambda p, x: packed_linear(x.double(), p), r"dtype torch.float64 differs from the packed weight's dtype torch.float16"),
    (lambda p, x: packed_linear(x, p, torch.zeros(7).half().to(DEVICE)), r"bias: expected a \(40,\) torch.float16"),
    (lambda p, x: packed_linear(x, p, split_k=0), r"split_k must be a positive int"),
    (lambda p, x: packed_linear("x", p), r"x: expected a torch.Tensor, got str"),
    (lambda p, x: packed_linear(x, "p"), r"expected a PackedLevel"),
    (lambda p, x: packed_linear(x, PackedLevel(p.values, p.bitmap[:-1], p.tile_base, p.shape, p.tile_n, 1)),
     r"packed.bitmap: expected a contiguous torch.int32 tensor of shape \(64, 2, 2\) for a \[40, 70\] weight"),
    (lambda p, x: pack_level(p.values, 1, K_BITS), r"expected a 2-D weight"),
    (lambda p, x: pack_level(make(4, 4, torch.float16), 1, K_BITS, tile_n=48), r"tile_n must be one of"),
    (lambda p, x: pack_level(make(4, 4, torch.float16), 5, K_BITS), r"out of range 1..4"),
], ids=["x-shape", "x-dtype", "bias-shape", "split-k", "x-type", "packed-type", "bitmap-shape", "pack-1d", "tile-n",
        "level"])
def test_bad_inputs(call, match):
    p = pack_level(make(40, 70, torch.float16), 1, K_BITS)
    x = torch.randn(2, 70).half().to(DEVICE)
    with pytest.raises(ELSAError, match=match):
        call(p, x)


def test_float32_tile_rows_the_kernel_lacks_are_refused():
    p = pack_level(make(40, 70, torch.float32), 1, K_BITS, tile_n=64)
    with pytest.raises(ELSAError, match=r"tiles of 64 rows has no kernel config.*\(16, 32\)"):
        packed_linear(torch.randn(1, 70).to(DEVICE), p)


# ----------------------------------------------------------------------------- routing
def test_route_follows_the_model():
    bf = torch.bfloat16
    assert cuda_route(4096, 4096, 1, 1.0, bf) == "cublas"
    # the H200 model: the expansion (~7.8 us at 4096 x 4096, whatever the density) is not below the
    # fused kernel's byte floor (7.8 us), so every level stays fused
    t = route_mod.route_times(4096, 4096, 0.1, bf)
    assert t["packed_expand_s"] == pytest.approx(4096 * 500 / (132 * 1.98e9)) and t["packed_bytes_s"] < 0.2 * t["fused"]
    for density in (0.1, 0.3, 0.5, 0.9):
        assert cuda_route(4096, 4096, 16, density, bf) == "fused", density
    # a model in which the expansion is 10x cheaper (what a GPU might measure): bytes decide
    fast = GpuModel(4.3e12, 132, 1.98e9, expand_clocks_per_tile=50)
    for density, want in [(0.1, "packed"), (0.3, "packed"), (0.5, "packed"), (0.7, "packed"), (0.75, "fused"), (0.9, "fused")]:
        assert cuda_route(4096, 4096, 16, density, bf, model=fast) == want, density
    assert cuda_route(4096, 4096, 33, 0.1, bf, model=fast) == "fused"  # compute bound: the fused GEMM
    assert cuda_route(4096, 4096, 1, 0.1, bf, requires_grad=True, model=fast) == "fused"
    assert cuda_route(4096, 4096, 1, 0.1, bf, allow_packed=False, model=fast) == "fused"
    assert cuda_route(4096, 4096, 1, 0.1, bf, fused_fraction=0.1, model=fast) == "fused"  # a block level skips its tiles
    b = route_mod.route_bytes(4096, 4096, 0.1, bf)
    assert b["packed"] / b["cublas"] == pytest.approx(0.1 + 1 / 16, abs=1e-3)
    with pytest.raises(ValueError, match="GpuModel.sms must be a positive number"):
        GpuModel(4.3e12, 0, 1.98e9)


@pytest.mark.skipif(not kernels_available(DEVICE), reason="the Triton kernels need CUDA or the interpreter")
def test_elsa_linear_serves_decode_from_the_packed_level():
    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 130).bfloat16()
    counters = ec.magnitude_counters({"weight": lin.weight.data}, [0.9, 0.5])
    m = ec.ELSALinear.from_linear(lin, counters["weight"], num_levels=2).to(DEVICE)
    m.backend = "triton-packed"
    m.set_level(1)
    assert m._gpu_packed is not None and "gpu packed level for M <= 32" in repr(m)
    calls = []
    real = linear_mod._launch_packed
    linear_mod._launch_packed = lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw)
    try:
        x1, x40 = torch.randn(1, 70).bfloat16().to(DEVICE), torch.randn(40, 70).bfloat16().to(DEVICE)
        with torch.no_grad():
            y1, y40 = m(x1), m(x40)
    finally:
        linear_mod._launch_packed = real
    assert calls == [x1.shape]  # M = 40: the fused kernel
    w = extract_level(m.weight, 1, m.code_bits).double()
    torch.testing.assert_close(y1.double(), F.linear(x1.double(), w, m.bias.double()), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y40.double(), F.linear(x40.double(), w, m.bias.double()), rtol=1e-2, atol=1e-2)
    m.set_level(2)  # repacked at the switch; the dense level drops it
    assert m._gpu_packed is not None and m._gpu_packed[1].level == 2
    m.set_level("dense")
    assert m._gpu_packed is None
    m.backend = "triton"  # the fused kernel only: no memory beside the weight
    m.set_level(1)
    assert m._gpu_packed is None and "gpu packed" not in repr(m)


def test_auto_backend_follows_the_router(monkeypatch):
    """On the auto path the module packs exactly when cuda_route says "packed" (the H200 model:
    never); forced packing is for ELSALinear only."""
    from elsa_codec.serving import gpu_plan

    torch.manual_seed(0)
    lin = torch.nn.Linear(70, 130).bfloat16()
    m = ec.ELSALinear.from_linear(lin, ec.magnitude_counters({"weight": lin.weight.data}, [0.9])["weight"], num_levels=1)

    class Kernels:  # the kernels module as refresh_gpu_packed sees it, with the router's answer stubbed
        def __init__(self, answer):
            import elsa_codec.kernels.triton as k

            self._k, self.answer = k, answer

        def __getattr__(self, name):
            return getattr(self._k, name)

        def cuda_route(self, *a, **kw):
            return self.answer

    m.set_level(1)
    assert m.backend_request == "auto"
    for answer, packed in (("fused", False), ("packed", True)):
        gpu_plan.refresh_gpu_packed(m, Kernels(answer))
        assert (m._gpu_packed is not None) == packed, answer
    with pytest.raises(ELSAError, match="'triton-packed' .* is for ELSALinear only"):
        ec.ELSAConv2d.from_conv2d(torch.nn.Conv2d(3, 4, 3), torch.full((4, 3, 3, 3), 2, dtype=torch.uint8),
                                  num_levels=1).backend = "triton-packed"


@pytest.mark.isolated  # its own process: tests/conftest.py, "process isolation"
def test_torch_compile_traces_the_op():
    enc = make(40, 70, torch.bfloat16)
    p = pack_level(enc, 1, K_BITS)
    x = torch.randn(3, 70).bfloat16().to(DEVICE)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    got = torch.compile(lambda x: packed_linear(x, p), backend=backend, fullgraph=True)(x)
    assert "elsa_codec.packed_linear.default" in " ".join(seen)
    assert torch.equal(got, packed_linear(x, p))


def test_opcheck_packed_linear():
    p = pack_level(make(20, 70, torch.float32), 2, K_BITS, tile_n=32)
    x = torch.randn(3, 70).to(DEVICE)
    torch.library.opcheck(torch.ops.elsa_codec.packed_linear.default,
                          (x, p.values, p.bitmap, p.tile_base, 20, 70, 32, 2, None),
                          test_utils=("test_schema", "test_faketensor"))
