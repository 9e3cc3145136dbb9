"""encode / extract / counters_from_masks / magnitude_counters on state dicts."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.format.structure import mask_structure_ok


def small_sd(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(63, 123, generator=g).to(dtype),
        "fc.bias": torch.randn(63, generator=g).to(dtype),
        "conv.weight": torch.randn(16, 8, 3, 3, generator=g).to(dtype),
        "emb.embed_tokens.weight": torch.randn(10, 8, generator=g).to(dtype),
        "step": torch.tensor(3),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("structure", ["unstructured", "block:8x8"], ids=["unstructured", "block8x8"])
@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_encode_extract_levels(dtype, structure, distribution):
    sd = small_sd(dtype)
    before = {k: v.clone() for k, v in sd.items()}
    c = ec.magnitude_counters(sd, [0.9, 0.75, 0.5], structure=structure, distribution=distribution)
    assert sorted(c) == ["conv.weight", "fc.weight"]  # Linear/Conv weights by default, no embeddings
    enc = ec.encode(sd, c)
    for k, v in sd.items():  # the caller's tensors are untouched
        assert torch.equal(v, before[k])
    assert enc.meta.num_levels == 3 and enc.meta.code_bits == 2
    assert enc["fc.bias"] is sd["fc.bias"]
    for t in (1, 2, 3):
        lvl = ec.extract(enc, t)
        for n in c:
            ref = torch.where(c[n].to(torch.int64) <= t, enc[n], torch.zeros((), dtype=dtype))
            assert torch.equal(lvl[n], ref)
            assert mask_structure_ok(c[n] <= t, structure)
        zeros = sum(int((c[n] > t).sum()) for n in c)
        total = sum(c[n].numel() for n in c)
        assert enc.meta.levels[t - 1].sparsity == pytest.approx(zeros / total)
    dense = ec.extract(enc, "dense")
    assert all(dense[n] is enc[n] for n in enc)
    if distribution == "uniform" and structure == "unstructured":
        assert [round(s, 3) for s in enc.meta.sparsities()] == [0.9, 0.75, 0.5]


def test_nm_levels_nested_and_structured():
    sd = small_sd()
    sd["fc.weight"] = sd["fc.weight"][:, :120].contiguous()
    c = ec.magnitude_counters(sd, ["1:4", "2:4"])
    enc = ec.encode(sd, c)
    assert [lv.structure for lv in enc.meta.levels] == ["1:4", "2:4"]
    assert enc.meta.sparsities() == [0.75, 0.5]
    for n in c:
        assert mask_structure_ok(c[n] <= 1, "1:4") and mask_structure_ok(c[n] <= 2, "2:4")


def test_nm_needs_multiple_of_m():
    with pytest.raises(ELSAError, match="fc.weight.*multiple of M=4"):
        ec.magnitude_counters(small_sd(), ["1:4", "2:4"])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_counters_from_masks_roundtrip(T, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(1, T + 2, (rows, cols), generator=g)
    masks = [{"w": n <= t} for t in range(1, T + 1)]
    c = ec.counters_from_masks(masks)
    assert c.num_levels == T
    assert torch.equal(c["w"].to(torch.int64), n)


def test_counters_from_masks_not_nested():
    m1 = torch.tensor([[True, False], [False, False]])
    m2 = torch.tensor([[False, True], [True, False]])
    with pytest.raises(ELSAError, match=r"w: masks are not nested: position \(0, 0\) is in level 1 but not in level 2"):
        ec.counters_from_masks([{"w": m1}, {"w": m2}])


def test_encode_meta_errors():
    sd = small_sd()
    c = ec.magnitude_counters(sd, [0.9, 0.5])
    enc = ec.encode(sd, c)
    info = enc.meta.tensors["fc.weight"]
    assert info.max_ulp <= 2 and info.sqnr_db > 120


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda sd, c: c.update({"fc.weight": c["fc.weight"][:10]}), "fc.weight: counters have shape"),
        (lambda sd, c: c.update({"fc.weight": c["fc.weight"].float()}), "fc.weight: counters must be an integer"),
        (lambda sd, c: c.update({"fc.weight": c["fc.weight"] * 0}), r"fc.weight: counters must lie in 1..4"),
        (lambda sd, c: c.update({"fc.weight": c["fc.weight"] + 2}), r"fc.weight: counters must lie in 1..4"),
        (lambda sd, c: c.update({"nope.weight": c["fc.weight"]}), "nope.weight: counters given for a tensor that is not"),
        (lambda sd, c: sd["fc.weight"].__setitem__((0, 0), float("nan")), "fc.weight: weights must be finite, found 1 NaN"),
        (lambda sd, c: sd["conv.weight"].__setitem__((0, 0, 0, 0), float("inf")), "conv.weight: weights must be finite, found 0 NaN and 1 Inf"),
        (lambda sd, c: sd.update({"fc.weight": sd["fc.weight"].double()}), "fc.weight: unsupported dtype"),
    ],
    ids=["shape", "float", "zero", "too-high", "unknown-name", "nan", "inf", "float64"],
)
def test_encode_bad_input(mutate, msg):
    sd = small_sd()
    c = ec.magnitude_counters(sd, [0.9, 0.75, 0.5])
    c = ec.Counters(dict(c), 3)
    mutate(sd, c)
    with pytest.raises(ELSAError, match=msg):
        ec.encode(sd, c)


def test_encode_different_T_across_tensors():
    sd = small_sd()
    c = {"fc.weight": torch.randint(1, 5, sd["fc.weight"].shape), "conv.weight": torch.randint(1, 3, sd["conv.weight"].shape)}
    c["fc.weight"][0, 0] = 4
    c["conv.weight"][0, 0, 0, 0] = 2
    with pytest.raises(ELSAError, match="different T across tensors"):
        ec.encode(sd, c)


def test_too_many_levels_for_dtype():
    sd = {"w": torch.randn(8, 8).to(torch.bfloat16)}
    c = ec.Counters({"w": torch.randint(1, 10, (8, 8))}, 8)
    with pytest.raises(ELSAError, match="w: 8 levels need .* at least 4 code bits.*at most 7 levels"):
        ec.encode(sd, c)


@pytest.mark.parametrize(
    "levels, kw, msg",
    [
        ([0.5, 0.9], {}, "sparsest first"),
        ([0.9, 1.0], {}, r"not in \(0, 1\)"),
        ([0.0], {}, r"not in \(0, 1\)"),
        (["2:4", "1:4"], {}, "sparsest first"),
        ([0.9, "2:4"], {}, "mix"),
        ([0.9], {"distribution": "erk?"}, "unknown distribution"),
        ([0.9], {"structure": "tiles"}, "unknown structure"),
        ([0.9], {"names": []}, "no tensor selected"),
    ],
    ids=["order", "one", "zero", "nm-order", "mixed", "distribution", "structure", "none"],
)
def test_magnitude_counters_bad_input(levels, kw, msg):
    with pytest.raises(ELSAError, match=msg):
        ec.magnitude_counters(small_sd(), levels, **kw)


def test_level_out_of_range_extract():
    sd = small_sd()
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.9, 0.5]))
    for bad in (0, 4, -1, "sparse", 1.5):
        with pytest.raises(ELSAError, match="level"):
            ec.extract(enc, bad)


def test_magnitude_counters_filter_fn_and_removed_keywords():
    """One selector convention (filter_fn(module, fqn), as swap_ and ELSAConfig), names= a list, and
    distribution= the one-shot name; the 0.1 spellings fail naming their replacement (CHANGELOG.md)."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    c = ec.magnitude_counters(model, [0.5], filter_fn=lambda m, fqn: fqn == "2")
    assert list(c) == ["2.weight"]
    g = ec.magnitude_counters(model, [0.9, 0.5], distribution="global")
    u = ec.magnitude_counters(model, [0.9, 0.5])
    assert any(not torch.equal(g[n], u[n]) for n in g)
    with pytest.raises(ec.ELSATypeError, match="removed in 0.2.*distribution="):
        ec.magnitude_counters(model, [0.5], sparsifier="global")
    with pytest.raises(ec.ELSATypeError, match="unexpected keyword argument 'distrib'"):
        ec.magnitude_counters(model, [0.5], distrib="global")
    with pytest.raises(ec.ELSAError, match="not both"):
        ec.magnitude_counters(model, [0.5], select="all", filter_fn=lambda m, fqn: True)
    with pytest.raises(ec.ELSATypeError, match="filter_fn=\\(module, fqn\\)"):
        ec.magnitude_counters(model, [0.5], select=lambda fqn, m: fqn == "2")
    sd = {"a.weight": torch.randn(8, 8), "b.weight": torch.randn(8, 8)}
    with pytest.raises(ec.ELSATypeError, match="names= takes a list"):
        ec.magnitude_counters(sd, [0.5], names=lambda n, t: n == "a.weight")
    assert list(ec.magnitude_counters(sd, [0.5], names=["b.weight"])) == ["b.weight"]
