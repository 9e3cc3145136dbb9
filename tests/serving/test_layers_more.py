"""ELSATransformersConv1D (transformers, weight [in, out]), ELSAEmbedding and ELSAConv1d: every level equal
to the stock module on ``extract_level``'s weight, on the reference path and on the Triton path
(interpreter on the CPU), odd sizes beside round ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAConv1d, ELSAEmbedding, ELSAError
from elsa_codec.format.bits import extract_level

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rand_counters(shape, T, gen):
    return torch.randint(1, T + 2, shape, generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("nx,nf", [(64, 128), (63, 123)], ids=["64x128", "63x123"])
def test_conv1d_transformers_every_level(nx, nf, dtype, backend):
    gen = torch.Generator().manual_seed(nx + nf)
    conv = Conv1D(nf, nx).to(DEV, dtype)
    m = ec.ELSATransformersConv1D.from_conv1d(conv, rand_counters((nx, nf), 3, gen).to(DEV), num_levels=3, backend=backend)
    assert isinstance(m, Conv1D) and m.weight.shape == (nx, nf)
    x = torch.randn(2, 5, nx, generator=gen).to(DEV, dtype)
    for t in (1, 2, 3, 4):
        m.set_level(t)
        w = extract_level(m.weight, t, m.code_bits, 3)
        want = torch.addmm(m.bias, x.view(-1, nx), w).view(2, 5, nf)
        got = m(x)
        if backend == "reference" or t == 4:
            assert torch.equal(got, want)  # the stock op on the same decoded weight
        else:
            assert m.backend == "triton"
            torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert repr(m).startswith(f"ELSATransformersConv1D(nf={nf}, nx={nx}, T=3, k=2")
    assert list(m.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("num,dim", [(64, 32), (123, 63)], ids=["64x32", "123x63"])
def test_embedding_decodes_only_looked_up_rows(num, dim, dtype, backend):
    gen = torch.Generator().manual_seed(num)
    emb = nn.Embedding(num, dim, padding_idx=3).to(DEV, dtype)
    m = ELSAEmbedding.from_embedding(emb, rand_counters((num, dim), 3, gen).to(DEV), num_levels=3, backend=backend)
    ids = torch.randint(0, num, (3, 7), generator=gen).to(DEV)
    for t in (1, 2, 3, 4):
        m.set_level(t)
        want = F.embedding(ids, extract_level(m.weight, t, m.code_bits, 3), padding_idx=3)
        assert torch.equal(m(ids), want)  # integer work: bit-exact on every path
        assert m.cached_bytes == 0  # no decoded copy of the table
    assert "Embedding(" in repr(m) and "padding_idx=3" in repr(m) and "T=3, k=2" in repr(m)


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(ELSAError, match="max_norm=1.0 renormalises"):
        ELSAEmbedding(10, 4, max_norm=1.0, num_levels=1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_conv1d_torch_every_level(backend):
    gen = torch.Generator().manual_seed(5)
    conv = nn.Conv1d(6, 9, 3, padding=1, groups=3).to(DEV)
    m = ELSAConv1d.from_conv(conv, rand_counters(conv.weight.shape, 2, gen).to(DEV), num_levels=2, backend=backend)
    x = torch.randn(2, 6, 11, generator=gen).to(DEV)
    for t in (1, 2, 3):
        m.set_level(t)
        assert torch.equal(m(x), F.conv1d(x, extract_level(m.weight, t, m.code_bits, 2), m.bias, padding=1, groups=3))
    assert "ELSAConv1d(6, 9, kernel_size=(3,)" in repr(m)
    with pytest.raises(ELSAError, match="needs a Conv1d, got Conv2d"):
        ELSAConv1d.from_conv(nn.Conv2d(2, 2, 1), torch.ones(2, 2, 1, 1, dtype=torch.uint8), num_levels=1)


def test_swap_serves_conv1d_embedding_and_conv1d_transformers():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(40, 12), "conv": nn.Conv1d(12, 12, 3, padding=1),
                           "proj": Conv1D(20, 12)})
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(model, [0.75, 0.5], select="all"))

    def run(m, ids):
        h = m["emb"](ids).transpose(1, 2)
        return m["proj"](m["conv"](h).transpose(1, 2).contiguous())

    ids = torch.randint(0, 40, (2, 9))
    ref = {}
    for t in (1, 2, 3):
        plain = nn.ModuleDict({"emb": nn.Embedding(40, 12), "conv": nn.Conv1d(12, 12, 3, padding=1), "proj": Conv1D(20, 12)})
        plain.load_state_dict(ec.extract(enc, t))
        ref[t] = run(plain, ids)
    ec.swap_(model, enc)
    assert [type(m).__name__ for m in model.values()] == ["ELSAEmbedding", "ELSAConv1d", "ELSATransformersConv1D"]
    for t in (1, 2, 3):
        ec.set_level(model, t)
        assert torch.equal(run(model, ids), ref[t])
