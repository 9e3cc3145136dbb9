"""Casting a served model (``.half()``, ``.to(torch.bfloat16)``...) keeps every level, or raises
before any tensor changes (issue: any-model serving, item 4)."""
import pytest
import torch
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.format.bits import decode_counters


def served_mlp(T, seed=0, width=63):
    torch.manual_seed(seed)
    # a plain module first: without the model-level check .double() would convert it before the
    # first ELSA module could refuse
    model = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 40), nn.ReLU(), nn.Linear(40, 7))
    sd = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    names = ["1.weight", "3.weight"]
    counters = ec.Counters({n: torch.randint(1, T + 2, sd[n].shape, generator=g, dtype=torch.uint8) for n in names}, T)
    enc = ec.encode(sd, counters)
    ec.swap_(model, enc)
    return model, enc


def bits(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cast", [
    pytest.param(lambda m: m.to(torch.bfloat16), id="to-bfloat16"),
    pytest.param(lambda m: m.half(), id="half"),
    pytest.param(lambda m: m.to(dtype=torch.float16, device="cpu"), id="to-float16-cpu"),
])
@pytest.mark.parametrize("T", [1, 3, 7])
def test_cast_keeps_every_level(cast, T):
    model, enc = served_mlp(T)
    counters = {n: decode_counters(model.get_submodule(n[:-7]).weight, enc.code_bits) for n in enc.meta.tensors}
    before = {n: model.get_submodule(n[:-7]).weight.detach().clone() for n in enc.meta.tensors}
    cast(model)
    x = torch.randn(5, 63)
    for n in enc.meta.tensors:
        m = model.get_submodule(n[:-7])
        assert m.weight.dtype in (torch.bfloat16, torch.float16)
        assert torch.equal(decode_counters(m.weight, m.code_bits), counters[n]), f"{n}: levels changed by the cast"
        # cast rounding (0.5 ulp) + the code rule in the new dtype (2**(k-1) ulp); ulp <= 2 eps |w|
        rel = ((m.weight.float() - before[n]).abs() / before[n].abs().clamp_min(1e-30)).max().item()
        eps = torch.finfo(m.weight.dtype).eps
        assert rel <= (0.5 + 2 ** (m.code_bits - 1)) * eps * 2, f"{n}: relative error {rel}"
    for t in range(1, T + 2):
        ec.set_level(model, t)
        h = model[0](x.to(model[1].weight.dtype))
        want = nn.functional.linear(
            torch.relu(nn.functional.linear(h, model[1].decoded_weight(), model[1].bias)),
            model[3].decoded_weight(), model[3].bias,
        )
        assert torch.equal(model(x.to(model[1].weight.dtype)), want)


def test_cast_that_cannot_keep_the_codes_changes_nothing():
    model, enc = served_mlp(7)  # 8 codes need k=3: bfloat16 fits, float64 holds no codes
    snap = bits(model)
    with pytest.raises(ELSAError, match=r"float64 would drop its level codes.*Nothing was converted"):
        model.double()
    after = model.state_dict()
    for k, v in snap.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    model8, _ = served_mlp(8)  # 9 codes need k=4: bfloat16 holds 3
    snap = bits(model8)
    with pytest.raises(ELSAError, match=r"9 levels need 4 code bits, bfloat16 holds at most 3"):
        model8.to(torch.bfloat16)
    for k, v in snap.items():
        assert torch.equal(model8.state_dict()[k], v), k
    model8.half()  # float16 holds 4 bits: fine
    assert model8[1].weight.dtype == torch.float16 and model8[1].code_bits == 4


def test_cast_of_a_submodule_never_drops_codes_silently():
    model, _ = served_mlp(2)
    with pytest.raises(ELSAError, match="would drop its level codes"):
        model[1].double()
    assert model[1].weight.dtype == torch.float32


def test_cast_keeps_a_tied_weight_tied_and_levelled():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    c = ec.magnitude_counters(model.state_dict(), [0.75, 0.5], names=["emb.weight"])
    enc = ec.encode(model.state_dict(), c)
    ec.swap_(model, enc)
    counters = decode_counters(model["emb"].weight, enc.code_bits)
    model.to(torch.bfloat16)
    assert model["emb"].weight is model["head"].weight and model["emb"].weight.dtype == torch.bfloat16
    assert torch.equal(decode_counters(model["emb"].weight, enc.code_bits), counters)
    ids = torch.tensor([[1, 7, 49]])
    ec.set_level(model, 1)
    h = model["emb"](ids)
    assert torch.equal(h, model["emb"].decoded_weight()[ids])
    assert torch.equal(model["head"](h), h @ model["head"].decoded_weight().t())
