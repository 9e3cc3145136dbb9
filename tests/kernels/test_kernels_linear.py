"""Fused level GEMM (elsa_codec/kernels/triton/linear.py) and the tile table (elsa_codec/kernels/triton/tile_table.py).

``y = x @ W_t.T + bias`` with ``W_t = where(code < t, W, 0)`` (docs/DESIGN.md "The code rule" and
"Serving"; ELSA arXiv 2312.06872 sec 2.2), checked against a float64 reference with per-dtype
tolerances; tile skipping checked with NaN inputs under empty tiles. Compiled kernels on a GPU, the
Triton interpreter otherwise (conftest sets TRITON_INTERPRET=1 without CUDA).
"""
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import make_codes  # noqa: E402  (tests/kernels/kernel_cases.py)

from elsa_codec import ELSAError, encode_tensor
from elsa_codec.format.bits import extract_level
from elsa_codec.kernels.triton import (
    TILE_K,
    TILE_N,
    elsa_linear,
    elsa_linear_reference,
    kernels_available,
    tile_density,
    tile_table,
    tile_table_reference,
    to_semi_structured,
)
from elsa_codec.kernels.triton import linear as linear_mod

pytestmark = pytest.mark.usefixtures("poison_empty")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (rtol, atol) against the float64 reference; outputs are O(1) (weights scaled by 1/sqrt(K)).
# fp32 on a GPU uses input_precision="ieee" (torch's default: no TF32).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}

T_LEVELS, K_BITS = 3, 2  # levels 1..3 + dense 4, codes 0..3 in 2 bits (fits bf16's 3)
STRUCTURES = ["unstructured", "2:4", "block64"]
# Block configurations covering sub-tile (32), exact (64) and multi-tile (128/256) table lookups.
CONFIGS = {
    "bm16-bn32-bk32": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
    "bm16-bn64-bk64": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64},
    "bm32-bn128-bk128": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128},
    "bm16-bn16-bk256": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256},
}


# ----------------------------------------------------------------------------- helpers
def make_case(m_shape, n, k, dtype, structure="unstructured", seed=0, bias=True, code_bits=K_BITS,
              num_levels=T_LEVELS):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(dtype)
    codes = make_codes(structure, n, k, num_levels, g)
    enc = encode_tensor(w, codes, code_bits).to(DEVICE)
    x = torch.randn(*m_shape, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    return x, enc, b


def ref64(x, enc, level, code_bits, bias):
    w = extract_level(enc, level, code_bits).double()
    y = x.double() @ w.T
    return y + bias.double() if bias is not None else y


def assert_close64(y, ref, dtype):
    rtol, atol = TOL[dtype]
    assert y.dtype == dtype and y.shape == ref.shape
    y64 = y.double()
    assert torch.isfinite(y64).all(), "non-finite output (unwritten element?)"
    err = (y64 - ref).abs()
    bound = atol + rtol * ref.abs()
    assert (err <= bound).all(), f"max err {float(err.max()):.3g}, worst excess {float((err - bound).max()):.3g}"


def test_kernels_run_here():
    assert torch.isnan(torch.empty(3)).all(), "poison_empty fixture not active"
    assert kernels_available(DEVICE)
    assert linear_mod.INTERPRET != ON_GPU


# ----------------------------------------------------------------------------- correctness
SHAPES = {
    "m1-n64-k64": ((1,), 64, 64),
    "m7-n63-k123": ((7,), 63, 123),
    "m16-n128-k128": ((16,), 128, 128),
    "lead2x3-n123-k63": ((2, 3), 123, 63),
}


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_every_level_matches_float64(dtype, shape, structure):
    m_shape, n, k = SHAPES[shape]
    x, enc, b = make_case(m_shape, n, k, dtype, structure, seed=zlib.crc32(f"{shape}-{structure}".encode()))
    table = tile_table(enc, K_BITS)
    for level in range(1, T_LEVELS + 2):
        ref = ref64(x, enc, level, K_BITS, b)
        y = elsa_linear(x, enc, level, K_BITS, b, tile_table=table, num_levels=T_LEVELS)
        assert y.shape == (*m_shape, n)
        assert_close64(y, ref, dtype)
        if level <= T_LEVELS:  # the dense level is F.linear, no table involved
            y_nt = elsa_linear(x, enc, level, K_BITS, b)
            assert_close64(y_nt, ref, dtype)


@pytest.mark.parametrize("m", [1, 33, 100], ids=lambda m: f"m{m}")
def test_m_sweep_no_bias(m):
    x, enc, _ = make_case((m,), 70, 90, torch.bfloat16, "unstructured", seed=m, bias=False)
    for level in (1, 3):
        assert_close64(elsa_linear(x, enc, level, K_BITS), ref64(x, enc, level, K_BITS, None), torch.bfloat16)


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_block_configs_with_table(dtype, cfg):
    """Table lookups for blocks smaller than, equal to and larger than the 64x64 tiles."""
    x, enc, b = make_case((5,), 130, 200, dtype, "block64", seed=7)
    table = tile_table(enc, K_BITS)
    for level in range(1, T_LEVELS + 1):
        y = linear_mod._launch_linear(x, enc, level, K_BITS, b, table, _config=CONFIGS[cfg])
        assert_close64(y, ref64(x, enc, level, K_BITS, b), dtype)


@pytest.mark.parametrize("dtype_k", [(torch.float32, 8), (torch.float16, 4), (torch.bfloat16, 3)],
                         ids=["fp32-k8", "fp16-k4", "bf16-k3"])
def test_wide_codes(dtype_k):
    """Largest code width per dtype, many levels; tile table entries up to 2**k - 1."""
    dtype, k = dtype_k
    num_levels = (1 << k) - 1
    x, enc, b = make_case((3,), 96, 130, dtype, "block64", seed=k, code_bits=k, num_levels=num_levels)
    table = tile_table(enc, k)
    for level in sorted({1, 2, num_levels // 2, num_levels}):
        y = elsa_linear(x, enc, level, k, b, tile_table=table)
        assert_close64(y, ref64(x, enc, level, k, b), dtype)


@pytest.mark.parametrize("layout", ["x-strided", "x-transposed", "w-transposed"])
def test_non_contiguous_inputs(layout):
    dtype = torch.float16
    x, enc, b = make_case((6,), 65, 96, dtype, "unstructured", seed=3)
    if layout == "x-strided":
        x = torch.cat([x, x], dim=1)[:, ::2]
    elif layout == "x-transposed":
        x = x.t().contiguous().t()
    else:
        enc = enc.t().contiguous().t()
    assert not (x.is_contiguous() and enc.is_contiguous())
    table = tile_table(enc, K_BITS)
    for level in (1, 2):
        y = elsa_linear(x, enc, level, K_BITS, b, tile_table=table)
        assert_close64(y, ref64(x, enc, level, K_BITS, b), dtype)


def test_int64_offsets_path():
    x, enc, b = make_case((5,), 70, 80, torch.bfloat16, "block64", seed=2)
    table = tile_table(enc, K_BITS)
    y = linear_mod._launch_linear(x, enc, 2, K_BITS, b, table, _force_int64=True)
    assert_close64(y, ref64(x, enc, 2, K_BITS, b), torch.bfloat16)


@pytest.mark.parametrize("which", ["m0", "n0", "k0"])
def test_empty_dims(which):
    m, n, k = {"m0": (0, 8, 8), "n0": (3, 0, 8), "k0": (3, 8, 0)}[which]
    x = torch.randn(m, k, device=DEVICE)
    enc = torch.randn(n, k, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    y = elsa_linear(x, enc, 1, 2, b)
    assert y.shape == (m, n)
    assert torch.equal(y, F.linear(x, torch.zeros_like(enc), b))


# ----------------------------------------------------------------------------- tile skipping
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if CONFIGS[c]["BLOCK_K"] <= 128], ids=str)
def test_empty_tiles_are_not_loaded(cfg):
    """Input columns 128..255 meet only dense-only weights: NaN there must not reach y at any sparse
    level when the table is given (0 * NaN would), and does without the table. (A K step skips when
    all the table tiles it covers are empty: BLOCK_K <= 128 here.)"""
    dtype = torch.float32
    x, enc, b = make_case((4,), 100, 256, dtype, "block64", seed=5)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, T_LEVELS, (100, 256), generator=g)
    codes[:, 128:] = T_LEVELS  # dense-only
    enc = encode_tensor(enc.cpu(), codes, K_BITS).to(DEVICE)
    table = tile_table(enc, K_BITS)
    assert (table[:, 2:] == T_LEVELS).all() and (table[:, :2] < T_LEVELS).all()
    x_nan = x.clone()
    x_nan[:, 128:] = float("nan")
    x_zero = x.clone()
    x_zero[:, 128:] = 0.0
    for level in range(1, T_LEVELS + 1):
        y = linear_mod._launch_linear(x_nan, enc, level, K_BITS, b, table, _config=CONFIGS[cfg])
        assert_close64(y, ref64(x_zero, enc, level, K_BITS, b), dtype)
        y_nt = linear_mod._launch_linear(x_nan, enc, level, K_BITS, b, None, _config=CONFIGS[cfg])
        assert torch.isnan(y_nt).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_all_tiles_empty_gives_exactly_bias(dtype):
    n, k = 70, 130
    enc = encode_tensor(torch.randn(n, k).to(dtype), torch.full((n, k), 2), K_BITS).to(DEVICE)
    x = torch.full((3, k), float("nan"), dtype=dtype, device=DEVICE)
    b = torch.randn(n).to(dtype).to(DEVICE)
    table = tile_table(enc, K_BITS)
    assert tile_density(table, 2) == 0.0 and tile_density(table, 3) == 1.0
    for level in (1, 2):
        assert torch.equal(elsa_linear(x, enc, level, K_BITS, b, tile_table=table), b.expand(3, n))
        y0 = elsa_linear(x, enc, level, K_BITS, tile_table=table)
        assert torch.equal(y0, torch.zeros_like(y0))


def test_table_drives_skipping():
    """A table that marks a full tile as empty makes the kernel drop exactly that tile."""
    dtype = torch.float32
    x, enc, b = make_case((3,), 128, 128, dtype, "unstructured", seed=9)
    enc = encode_tensor(enc.cpu(), torch.zeros(128, 128, dtype=torch.int64), K_BITS).to(DEVICE)
    table = tile_table(enc, K_BITS)
    assert (table == 0).all()
    table[1, 0] = 255  # claim tile rows 64..127 x cols 0..63 is empty
    w = enc.clone()
    w[64:, :64] = 0
    y = elsa_linear(x, enc, 1, K_BITS, b, tile_table=table)
    assert_close64(y, x.double() @ w.double().T + b.double(), dtype)


# ----------------------------------------------------------------------------- tile table
@pytest.mark.parametrize("shape", [(1, 1), (63, 65), (130, 70), (1100, 70)], ids=str)
@pytest.mark.parametrize("dtype_k", [(torch.float32, 8), (torch.float16, 3), (torch.bfloat16, 2)],
                         ids=["fp32-k8", "fp16-k3", "bf16-k2"])
def test_tile_table_matches_reference(shape, dtype_k):
    dtype, k = dtype_k
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 1 << k, shape, generator=g)
    codes[::97, ::61] = 0
    enc = encode_tensor(torch.randn(shape, generator=g).to(dtype), codes, k).to(DEVICE)
    got = tile_table(enc, k)
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert got.shape == (-(-shape[0] // TILE_N), -(-shape[1] // TILE_K))
    assert torch.equal(got.cpu(), tile_table_reference(enc, k).cpu())
    # transposed storage gives the same table
    assert torch.equal(tile_table(enc.t().contiguous().t(), k).cpu(), got.cpu())


def test_tile_table_errors():
    with pytest.raises(ELSAError, match=r"2-D weight.*\(4, 5, 6\)"):
        tile_table(torch.zeros(4, 5, 6), 2)
    with pytest.raises(ELSAError, match="float64"):
        tile_table(torch.zeros(4, 5, dtype=torch.float64), 2)
    with pytest.raises(ELSAError, match="code_bits=4"):
        tile_table(torch.zeros(4, 5, dtype=torch.bfloat16), 4)


# ----------------------------------------------------------------------------- torch op
@pytest.mark.isolated  # its own process: tests/conftest.py, "process isolation"
@pytest.mark.parametrize("backend", ["aot_eager"] + (["inductor"] if ON_GPU else []))
def test_torch_compile_matches_eager(backend):
    # No torch._dynamo.reset() between the two compilations: resetting while compiled code of this
    # or an earlier test is still referenced can crash the interpreter (pytorch/pytorch#155057); the
    # two compilations use two functions (two code objects) instead.
    x, enc, b = make_case((2, 3), 70, 90, torch.bfloat16, "block64", seed=4)
    table = tile_table(enc, K_BITS)
    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    def f(x, enc, b, table):
        return elsa_linear(x, enc, 2, K_BITS, b, tile_table=table), elsa_linear(x, enc, "dense", K_BITS, b,
                                                                                num_levels=T_LEVELS)

    def g(x, enc, b, table):
        return f(x, enc, b, table)

    torch.compile(g, backend=recording_backend, fullgraph=True)(x, enc, b, table)
    assert "elsa_codec.linear.default" in " ".join(seen)
    got = torch.compile(f, backend=backend, fullgraph=True)(x, enc, b, table)
    want = f(x, enc, b, table)
    for g_, w_ in zip(got, want):
        if backend == "aot_eager":
            assert torch.equal(g_, w_)
        else:  # inductor may fuse the dense level's bias add differently
            torch.testing.assert_close(g_, w_, rtol=1e-2, atol=1e-2)


def test_opcheck_linear():
    x, enc, b = make_case((3,), 20, 70, torch.float32, "unstructured", seed=1)
    table = tile_table(enc, K_BITS)
    torch.library.opcheck(torch.ops.elsa_codec.linear.default, (x, enc, 2, K_BITS, b, table),
                          test_utils=("test_schema", "test_faketensor"))


def test_autograd_matches_reference():
    x, enc, b = make_case((4,), 20, 70, torch.float32, "unstructured", seed=6)
    leaves = [t.clone().requires_grad_() for t in (x, enc, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, enc, b)]
    elsa_linear(leaves[0], leaves[1], 2, K_BITS, leaves[2]).square().sum().backward()
    keep = ((enc.view(torch.int32) & 3) < 2).to(enc.dtype)
    F.linear(ref_leaves[0], ref_leaves[1] * keep, ref_leaves[2]).square().sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- errors
def _good():
    x, enc, b = make_case((3,), 20, 70, torch.float32, seed=0)
    return x, enc, b


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, e, b: (x[:, :69], e, b, {}), r"shape \(3, 69\) does not match the weight \[20, 70\]"),
        (lambda x, e, b: (x.half(), e, b, {}), "dtype torch.float16 differs"),
        (lambda x, e, b: (x, e.reshape(1, 20, 70), b, {}), r"2-D weight.*\(1, 20, 70\)"),
        (lambda x, e, b: (x, e, b[:19], {}), r"bias: shape \(19,\) does not match out_features=20"),
        (lambda x, e, b: (x, e, b.half(), {}), "bias: dtype"),
        (lambda x, e, b: (x, e, b, {"tile_table": torch.zeros(1, 1, dtype=torch.uint8)}),
         r"tile_table: shape \(1, 1\) does not fit a weight \[20, 70\]: expected \(1, 2\)"),
        (lambda x, e, b: (x, e, b, {"tile_table": torch.zeros(1, 2, dtype=torch.int32)}), "torch.uint8"),
        (lambda x, e, b: (x, e, b, {"level": 5}), r"level 5 is out of range 1..4"),
        (lambda x, e, b: (x, e, b, {"level": 4, "num_levels": 2}), r"level 4 is out of range 1..3"),
        (lambda x, e, b: (x, e, b, {"code_bits": 9}), "code_bits=9"),
        (lambda x, e, b: (x.double(), e.double(), b.double(), {}), "float64"),
        (lambda x, e, b: (x.cpu().numpy(), e, b, {}), "x: expected a torch.Tensor"),
    ],
    ids=["k-mismatch", "x-dtype", "w-3d", "bias-shape", "bias-dtype", "table-shape", "table-dtype",
         "level-range", "level-range-T", "code-bits", "fp64", "x-numpy"],
)
def test_bad_inputs(mutate, match):
    x, e, b, kw = mutate(*_good())
    level = kw.pop("level", 2)
    code_bits = kw.pop("code_bits", K_BITS)
    if kw.get("tile_table") is not None:
        kw["tile_table"] = kw["tile_table"].to(DEVICE)
    with pytest.raises(ELSAError, match=match):
        elsa_linear(x, e, level, code_bits, b, **kw)
    with pytest.raises(ELSAError, match=match):
        elsa_linear_reference(x, e, level, code_bits, b, **kw)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_device_mismatch():
    x, e, b = _good()
    with pytest.raises(ELSAError, match="x: on cpu but the encoded weight is on cuda"):
        elsa_linear(x.cpu(), e, 2, K_BITS, b)
    with pytest.raises(ELSAError, match="bias: on cpu"):
        elsa_linear(x, e, 2, K_BITS, b.cpu())


def test_bad_block_config():
    x, enc, b = _good()
    with pytest.raises(ELSAError, match="BLOCK_K=48"):
        linear_mod._launch_linear(x, enc, 1, K_BITS, b, None, _config={"BLOCK_K": 48})


# ----------------------------------------------------------------------------- misc
def test_autotune_prune_keeps_fitting_configs():
    """Every autotune candidate uses block sizes compatible with the 64x64 tile table, and the
    pruner keeps at least one config for each M bucket and dtype."""
    for cfg in linear_mod.AUTOTUNE_CONFIGS:
        linear_mod._check_block_config(cfg.kwargs)
    for mb in (1, 16, 32, 64, 128, 4096):
        for dt in (torch.float32, torch.bfloat16):
            for use_table in (False, True):
                kept = linear_mod._prune_configs(linear_mod.AUTOTUNE_CONFIGS,
                                                 {"M_BUCKET": mb, "x_ptr": torch.empty(0, dtype=dt)},
                                                 USE_TABLE=use_table)
                assert kept
                if use_table:
                    assert all(c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_K"] <= 64 for c in kept)


@pytest.mark.skipif(not ON_GPU, reason="autotuned kernel only runs on CUDA")
@pytest.mark.parametrize("m", [1, 16, 128, 300])
def test_autotuned_gpu_shapes(m):
    x, enc, b = make_case((m,), 512, 384, torch.bfloat16, "block64", seed=m)
    table = tile_table(enc, K_BITS)
    for level in (1, 2, 3):
        assert_close64(elsa_linear(x, enc, level, K_BITS, b, tile_table=table), ref64(x, enc, level, K_BITS, b),
                       torch.bfloat16)


def test_semi_structured_guard():
    x, enc, _ = make_case((64,), 128, 128, torch.float16, "2:4", seed=0, bias=False)
    w1 = extract_level(enc, 1, K_BITS)
    from elsa_codec.kernels.triton import semi_structured_supported

    if not semi_structured_supported(DEVICE):
        with pytest.raises(ELSAError, match="compute capability"):
            to_semi_structured(w1)
        return
    with pytest.raises(ELSAError, match="more than 2 non-zeros"):
        to_semi_structured(enc)
    try:
        ws = to_semi_structured(w1)
    except ELSAError as e:  # e.g. no cuSPARSELt / CUTLASS backend in this build
        pytest.skip(str(e))
    assert_close64(F.linear(x, ws), ref64(x, enc, 1, K_BITS, None), torch.float16)


def test_cpu_fallback_without_interpreter():
    """On a CPU without the interpreter the public functions run the PyTorch reference."""
    code = (
        "import torch\n"
        "from elsa_codec import encode_tensor\n"
        "from elsa_codec.format.bits import extract_level\n"
        "import elsa_codec.kernels.triton as K\n"
        "assert not K.kernels_available('cpu')\n"
        "w = encode_tensor(torch.randn(20, 30), torch.randint(0, 4, (20, 30)), 2)\n"
        "x = torch.randn(3, 30)\n"
        "tab = K.tile_table(w, 2)\n"
        "y = K.elsa_linear(x, w, 2, 2, tile_table=tab)\n"
        "assert torch.equal(y, torch.nn.functional.linear(x, extract_level(w, 2, 2)))\n"
        "assert torch.equal(K.decode_level(w, 1, 2), extract_level(w, 1, 2))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
