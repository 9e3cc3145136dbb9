"""ELSALinear / ELSAConv2d / per-level batch norm (elsa_codec.serving.base): every level bit-exact against the
stock module loaded with the extracted level weight; caching; backends; repr; errors."""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAConv2d, ELSAError, ELSALinear, LevelBatchNorm2d
from elsa_codec.format.bits import extract_level
from elsa_codec.serving.batch_norm import level_batch_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand_counters(shape, T, gen):
    return torch.randint(1, T + 2, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


def snapshot(m: nn.Module):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@settings(max_examples=20, deadline=None)
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    T=st.integers(1, 3),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_linear_every_level_bit_exact(out_f, in_f, T, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    before = snapshot(lin)
    c = rand_counters(lin.weight.shape, T, gen)
    m = ELSALinear.from_linear(lin, c, num_levels=T)
    assert same_state(before, snapshot(lin)), "from_linear must not modify the given module"
    assert list(m.state_dict()) == list(lin.state_dict())
    assert m.weight.dtype == dtype and m.weight.shape == lin.weight.shape
    x = torch.randn(3, 5, in_f, generator=gen).to(dtype)
    for t in range(1, T + 2):
        m.set_level(t)
        want = F.linear(x, extract_level(m.weight, t, m.code_bits, T), m.bias)
        assert torch.equal(m(x), want), t
    assert m.level == T + 1 and m.backend == "dense"


def test_linear_dense_is_stock_and_sparse_cache():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    c = torch.randint(1, 5, lin.weight.shape)
    m = ELSALinear.from_linear(lin, c, num_levels=3, backend="reference")
    x = torch.randn(4, 32)
    # dense: the stored tensor, no copy, no cache
    assert m.level == 4 and m.decoded_weight() is m.weight
    assert torch.equal(m(x), F.linear(x, m.weight, m.bias))
    assert m.cached_bytes == 0
    # sparse: decoded once, cached, reused
    m.set_level(2)
    y = m(x)
    w1 = m.decoded_weight()
    assert m.cached_bytes == m.weight.numel() * 4
    m(x)
    assert m.decoded_weight() is w1
    assert torch.equal(y, F.linear(x, extract_level(m.weight, 2, m.code_bits), m.bias))
    # level change drops it
    m.set_level("dense")
    assert m.cached_bytes == 0
    m.set_level(1)
    m(x)
    assert m.cached_bytes > 0
    # the weight changes in place (load_state_dict): the cache follows
    other = ELSALinear.from_linear(nn.Linear(32, 16), c, num_levels=3)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(x), F.linear(x, extract_level(other.weight, 1, 2), other.bias))
    # cache=False: nothing kept
    m.cache = False
    m.set_level(2)
    m(x)
    assert m.cached_bytes == 0
    # moving the module drops the cache
    m.cache = True
    m(x)
    m.to(torch.float32)
    assert m.cached_bytes == 0


CONV_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding="same", dilation=2),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="valid", groups=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),  # depthwise
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, padding_mode="replicate"),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=(1, 2), padding_mode="circular", stride=(1, 2)),
]


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items() if k not in ("in_channels",)))
def test_conv2d_every_level_bit_exact(cfg):
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(**cfg)
    before = snapshot(conv)
    T = 3
    m = ELSAConv2d.from_conv2d(conv, rand_counters(conv.weight.shape, T, gen), num_levels=T)
    assert same_state(before, snapshot(conv))
    assert list(m.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, cfg["in_channels"], 9, 8, generator=gen)
    ref = copy.deepcopy(conv)
    for t in range(1, T + 2):
        m.set_level(t)
        with torch.no_grad():
            ref.weight.copy_(extract_level(m.weight, t, m.code_bits, T))
            if conv.bias is not None:
                ref.bias.copy_(m.bias)
        assert torch.equal(m(x), ref(x)), t
    # unbatched input works as for nn.Conv2d
    assert torch.equal(m(x[0]), ref(x[0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conv2d_half_dtypes(dtype):
    gen = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1).to(dtype)
    m = ELSAConv2d.from_conv2d(conv, rand_counters(conv.weight.shape, 3, gen), num_levels=3)
    x = torch.randn(1, 3, 6, 6, generator=gen).to(dtype)
    for t in range(1, 5):
        m.set_level(t)
        assert torch.equal(m(x), F.conv2d(x, extract_level(m.weight, t, m.code_bits, 3), m.bias, padding=1))


def test_counters_container_and_structures():
    lin = nn.Linear(8, 8)
    cnt = ec.magnitude_counters({"weight": lin.weight.detach()}, ["1:4", "2:4"])
    m = ELSALinear.from_linear(lin, cnt)
    assert m.num_levels == 2 and m.code_bits == 2 and m.structures == ["1:4", "2:4"]
    assert m.sparsities == pytest.approx([0.75, 0.5])
    m.set_level(1)
    r = repr(m)
    for s in ("ELSALinear(", "in_features=8", "T=2", "k=2", "structure=['1:4', '2:4']", "level=1 (1:4, sparsity=0.750)", "backend=reference"):  # 8x8: too small to pack
        assert s in r, (s, r)
    m.set_level("dense")
    assert "level=3 (dense)" in repr(m) and "backend=dense" in repr(m)


def test_repr_backend_and_errors():
    conv = nn.Conv2d(2, 4, 3, groups=2, padding="same")
    m = ELSAConv2d.from_conv2d(conv, torch.ones(conv.weight.shape, dtype=torch.uint8) * 2, num_levels=1, level=1)
    r = repr(m)
    assert "ELSAConv2d(2, 4" in r and "groups=2" in r and "T=1, k=1" in r and "level=1 (unstructured, sparsity=1.000)" in r
    assert m.backend == "reference"
    m.backend = "reference"
    assert "(forced reference)" in repr(m)
    with pytest.raises(ELSAError, match="backend"):
        m.backend = "cuda"
    with pytest.raises(ELSAError, match="out of range"):
        m.set_level(3)
    with pytest.raises(ELSAError, match="out of range"):
        m.set_level(0)
    assert m.level == 1
    with pytest.raises(ELSAError, match="compile_mode"):
        ELSALinear(3, 4, num_levels=2, compile_mode="dynamic")
    with pytest.raises(ELSAError, match="code_bits"):
        ELSALinear(3, 4, num_levels=4, code_bits=2)
    with pytest.raises(ELSAError, match="nn.Linear"):
        ELSALinear.from_linear(conv, torch.ones(4, 1, 3, 3, dtype=torch.uint8))
    with pytest.raises(ELSAError):
        ELSALinear.from_linear(nn.Linear(3, 4), torch.ones(4, 4, dtype=torch.uint8))  # counters shape


def test_constructor_and_state_dict_roundtrip():
    src = ELSALinear.from_linear(nn.Linear(12, 7), torch.randint(1, 4, (7, 12)), num_levels=2, level=1)
    dst = ELSALinear(12, 7, num_levels=2)
    assert dst.level == 3 and dst.weight.requires_grad is False
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 12)
    for t in (1, 2, 3):
        src.set_level(t)
        dst.set_level(t)
        assert torch.equal(src(x), dst(x))
    assert "_level_t" not in dst.state_dict()


def test_gradient_flows_to_input_at_sparse_level():
    m = ELSALinear.from_linear(nn.Linear(6, 3), torch.randint(1, 4, (3, 6)), num_levels=2, level=1)
    x = torch.randn(2, 6, requires_grad=True)
    with torch.inference_mode():
        m(torch.randn(2, 6))  # cache an inference tensor
    m(x).sum().backward()
    assert torch.equal(x.grad, extract_level(m.weight, 1, 2).sum(0).expand(2, 6))


def test_level_batch_norm_swaps_stats():
    bn = nn.BatchNorm2d(3)
    before = snapshot(bn)
    T = 2
    stats = {t: {"running_mean": torch.full((3,), float(t)), "running_var": torch.full((3,), t + 1.0),
                 "num_batches_tracked": torch.tensor(10 * t)} for t in range(1, T + 2)}
    lb = level_batch_norm(bn, stats, T)
    assert isinstance(lb, LevelBatchNorm2d) and isinstance(lb, nn.BatchNorm2d)
    assert same_state(before, snapshot(bn)) and list(lb.state_dict()) == list(bn.state_dict())
    lb.eval()
    x = torch.randn(2, 3, 4, 4)
    for t in (1, 3, 2):
        lb.set_level(t)
        assert torch.equal(lb.running_mean, stats[t]["running_mean"])
        assert int(lb.num_batches_tracked) == 10 * t
        ref = nn.BatchNorm2d(3).eval()
        ref.load_state_dict({**bn.state_dict(), **stats[t]})
        assert torch.equal(lb(x), ref(x))
    # training at level 2 updates level 2's statistics only
    lb.train()
    lb(x)
    updated = lb.running_mean.clone()
    lb.set_level(1)
    assert torch.equal(lb.running_mean, stats[1]["running_mean"])
    lb.set_level(2)
    assert torch.equal(lb.running_mean, updated)
    assert torch.equal(lb.stats_of(1)["running_mean"], stats[1]["running_mean"])
    assert "levels=3, level=2" in repr(lb)
    with pytest.raises(ELSAError):
        lb.set_level(4)
    with pytest.raises(ELSAError):
        level_batch_norm(nn.BatchNorm2d(3, track_running_stats=False), stats, T)


def test_import_is_light_and_forced_triton_needs_a_device():
    """`import elsa_codec` (and the CPU reference path) never imports Triton nor initialises CUDA;
    a forced Triton backend without CUDA or the interpreter is a clear error."""
    code = (
        "import sys, torch, elsa_codec as ec\n"
        "from torch import nn\n"
        "m = ec.ELSALinear.from_linear(nn.Linear(8, 4), torch.randint(1, 3, (4, 8)), num_levels=1, level=1)\n"
        "print(m); m(torch.randn(2, 8))\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "assert not torch.cuda.is_initialized()\n"
        "m.backend = 'triton'\n"
        "try:\n    m(torch.randn(2, 8))\nexcept ec.ELSAError as e:\n    print('ELSAError:', e); sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "backend 'triton'" in r.stdout


def _interpreted_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton interpreter not enabled (TRITON_INTERPRET=1 before elsa_codec.kernels.triton is imported)")
    try:
        import elsa_codec.kernels.triton as K
    except ImportError as e:
        pytest.skip(f"elsa_codec.kernels.triton not importable: {e}")
    if not all(hasattr(K, f) for f in ("elsa_linear", "tile_table", "decode_level")):
        pytest.skip("elsa_codec.kernels.triton lacks elsa_linear / tile_table / decode_level")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not K.kernels_available(dev):
        pytest.skip("kernels cannot run here")
    return K, dev


def test_triton_backend_wiring():
    """backend='triton' runs elsa_codec.kernels.triton (interpreter on the CPU): same result as the
    reference; the tile table is computed once and kept out of state_dict."""
    K, dev = _interpreted_kernels()
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 80).to(dev)
    m = ELSALinear.from_linear(lin, rand_counters(lin.weight.shape, 3, gen).to(dev), num_levels=3, backend="triton")
    x = torch.randn(5, 96, generator=gen).to(dev)
    for t in (1, 2, 3, 4):
        m.set_level(t)
        assert m.backend == ("dense" if t == 4 else "triton")
        want = F.linear(x, extract_level(m.weight, t, m.code_bits, 3), m.bias)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    table = m.tile_table()
    assert table is m.tile_table() and table.shape == (2, 2) and table.dtype == torch.uint8
    assert list(m.state_dict()) == ["weight", "bias"]
    conv = nn.Conv2d(4, 6, 3, padding=1).to(dev)
    c = ELSAConv2d.from_conv2d(conv, rand_counters(conv.weight.shape, 3, gen).to(dev), num_levels=3, backend="triton")
    xi = torch.randn(2, 4, 5, 5, generator=gen).to(dev)
    for t in (1, 2, 3, 4):
        c.set_level(t)
        assert torch.equal(c(xi), F.conv2d(xi, extract_level(c.weight, t, c.code_bits, 3), c.bias, padding=1))
    assert "backend=triton (forced triton)" in repr(c.set_level(1) and c)
