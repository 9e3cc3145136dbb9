"""Served models refuse what would silently break their levels:

1. ``load_state_dict`` of weights without the ELSA layers' level codes (plain float weights: their
   low mantissa bits would become codes) raises an ELSAError naming the layer's key and the fix,
   with ``strict`` True or False, before any tensor changes; the served model's own state
   (``state_dict()``, ``elsa_state_dict``) still loads, every level unchanged.
2. A pickled / ``torch.save``-d served model keeps the model-level cast guard (a refused cast
   converts nothing) and the load check.
3. Modules pruned with ``torch.nn.utils.prune`` (``weight_orig`` + ``weight_mask``) are refused,
   not skipped, by selection, encoding, training and ``swap_``.
"""
import copy
import io
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import elsa_codec as ec
from elsa_codec import ELSAError, ELSALinear
from elsa_codec.format.bits import bits_view, decode_codes, encode_tensor, extract_level


def served_mlp(T=2, seed=0, dtype=torch.float32, levels=None):
    """A LayerNorm first (loaded before any ELSA layer), then two encoded Linears. Returns
    ``(served model, encoded state dict, plain state dict of the original model)``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 7)).to(dtype)
    plain = copy.deepcopy(model.state_dict())
    counters = ec.magnitude_counters(model, levels or [0.9, 0.5][:T] + [0.25] * max(0, T - 2))
    enc = ec.encode(model.state_dict(), counters)
    ec.swap_(model, enc)
    return model, enc, plain


def snapshot(model):
    return {k: (v.dtype, bits_view(v).clone() if v.is_floating_point() else v.clone()) for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert list(after) == list(before)
    for k, (dt, b) in before.items():
        v = after[k]
        assert v.dtype == dt, f"{k}: dtype changed to {v.dtype}"
        assert torch.equal(bits_view(v) if v.is_floating_point() else v, b), f"{k}: changed"


def outputs(model, x):
    T = ec.levels(model)[-1].level - 1
    out = []
    with torch.no_grad():
        for t in range(1, T + 2):
            ec.set_level(model, t)
            out.append(model(x))
    ec.set_level(model, "dense")
    return out


# -- 1. foreign state ------------------------------------------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("how", ["swap_", "load"])
def test_plain_weights_into_a_served_model_are_refused_and_change_nothing(strict, how, tmp_path):
    model, enc, plain = served_mlp()
    if how == "load":
        path = str(tmp_path / "m.safetensors")
        ec.save_file(enc, path)
        model = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 7))
        ec.load(path, model)
    x = torch.randn(5, 32)
    want = outputs(model, x)
    levels = ec.levels(model)
    before = snapshot(model)
    plain["0.weight"] = plain["0.weight"] + 1.0  # the LayerNorm comes first: it must not be loaded either
    with pytest.raises(ELSAError) as e:
        model.load_state_dict(plain, strict=strict)
    msg = str(e.value)
    assert "'1.weight'" in msg and "ELSALinear" in msg
    assert "elsa_codec.load" in msg and "elsa_codec.encode" in msg and "Nothing was loaded" in msg
    assert_unchanged(model, before)
    assert ec.levels(model) == levels
    for a, b in zip(outputs(model, x), want):
        assert torch.equal(a, b)


def test_plain_weights_would_have_changed_the_served_sparsity():
    """The finding itself: the raw low bits of a plain weight decode to other kept fractions than the
    layer serves; the refusal names the level and both fractions."""
    model, _, plain = served_mlp()
    codes = decode_codes(plain["1.weight"], model[1].code_bits)
    assert abs(float((codes < 1).float().mean()) - 0.1) > 0.05  # level 1 would not be 90% sparse
    with pytest.raises(ELSAError, match=r"'1.weight'.*(level 1 would keep|codes above T=2)"):
        model.load_state_dict(plain)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("source", ["state_dict", "elsa_state_dict"])
def test_own_state_still_loads_and_serves_every_level(source, assign, strict):
    model, _, _ = served_mlp(T=3)
    x = torch.randn(4, 32)
    want = outputs(model, x)
    sd = dict(model.state_dict()) if source == "state_dict" else ec.elsa_state_dict(model)
    sd = {k: v.clone() for k, v in sd.items()}
    other, _, _ = served_mlp(T=3)  # same architecture and codes (same seed), fresh tensors
    with torch.no_grad():
        other[0].weight.zero_()
    other.load_state_dict(sd, strict=strict, assign=assign)
    for a, b in zip(outputs(other, x), want):
        assert torch.equal(a, b)
    model.load_state_dict(sd, strict=strict, assign=assign)  # into itself
    for a, b in zip(outputs(model, x), want):
        assert torch.equal(a, b)


def test_another_encoding_of_the_same_shapes_is_refused():
    model, _, _ = served_mlp(levels=[0.9, 0.5])
    other, _, _ = served_mlp(levels=[0.75, 0.5])
    before = snapshot(model)
    with pytest.raises(ELSAError, match=r"'1.weight'.*level 1 would keep 25.00% .* serves 10.00%"):
        model.load_state_dict(other.state_dict())
    assert_unchanged(model, before)


def test_another_dtype_is_refused():
    model, _, plain = served_mlp()
    before = snapshot(model)
    half = {k: v.half() for k, v in plain.items()}
    with pytest.raises(ELSAError, match=r"'1.weight'.*float16.*float32"):
        model.load_state_dict(half)
    assert_unchanged(model, before)


def _layer_kinds():
    kinds = {
        "linear": (lambda: nn.Linear(24, 20), ELSALinear.from_linear),
        "conv2d": (lambda: nn.Conv2d(4, 6, 3), ec.ELSAConv2d.from_conv),
        "conv1d": (lambda: nn.Conv1d(4, 6, 3), ec.ELSAConv1d.from_conv),
        "embedding": (lambda: nn.Embedding(30, 8), ec.ELSAEmbedding.from_embedding),
    }
    try:
        from transformers.pytorch_utils import Conv1D

        from elsa_codec.serving.transformers_conv1d import ELSATransformersConv1D

        kinds["conv1d_t"] = (lambda: Conv1D(20, 24), ELSATransformersConv1D.from_conv1d)
    except ImportError:
        pass
    return kinds


@pytest.mark.parametrize("kind", sorted(_layer_kinds()))
def test_every_layer_kind_refuses_plain_weights_when_loaded_alone(kind):
    make, build = _layer_kinds()[kind]
    torch.manual_seed(1)
    stock = make()
    g = torch.Generator().manual_seed(2)
    c = torch.randint(1, 4, stock.weight.shape, generator=g, dtype=torch.uint8)
    m = build(stock, c, num_levels=2)
    before = snapshot(m)
    for strict in (True, False):
        with pytest.raises(ELSAError, match=rf"{type(m).__name__} 'weight'"):
            m.load_state_dict(make().state_dict(), strict=strict)
        assert_unchanged(m, before)
    m.load_state_dict(copy.deepcopy(m.state_dict()))  # its own codes
    assert_unchanged(m, before)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 6), seed=st.integers(0, 2**16), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       strict=st.booleans())
def test_load_is_refused_exactly_when_the_decoded_fractions_differ(T, seed, dtype, strict):
    """Property: a weight loads iff every code is <= T and each level's decoded kept fraction is the
    layer's; a loaded one serves its levels bit for bit, a refused one changes nothing."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(17, 9).to(dtype)
    m = ELSALinear.from_linear(lin, torch.randint(1, T + 2, (9, 17), generator=g, dtype=torch.uint8), num_levels=T,
                               backend="reference")  # F.linear on the decoded weight: bit-exact
    k = m.code_bits
    incoming = nn.Linear(17, 9).to(dtype).state_dict()
    if seed % 2:  # half the cases: another weight with the same codes
        incoming["weight"] = encode_tensor(incoming["weight"], decode_codes(m.weight, k), k)
    codes = decode_codes(incoming["weight"], k)
    n = codes.numel()
    fits = int(codes.max()) <= T and all(
        abs((1.0 - int((codes < t).sum()) / n) - m.sparsities[t - 1]) <= 1e-9 for t in range(1, T + 1))
    before = snapshot(m)
    if fits:
        m.load_state_dict(incoming, strict=strict)
        x = torch.randn(3, 17, generator=g).to(dtype)
        for t in range(1, T + 2):
            m.set_level(t)
            want = nn.functional.linear(x, extract_level(incoming["weight"], t, k), incoming["bias"])
            assert torch.equal(m(x), want)
    else:
        with pytest.raises(ELSAError, match="'weight'"):
            m.load_state_dict(incoming, strict=strict)
        assert_unchanged(m, before)


def test_a_bare_module_takes_the_first_encoded_weight_and_its_sparsities():
    torch.manual_seed(4)
    src = ELSALinear.from_linear(nn.Linear(12, 7), torch.randint(1, 4, (7, 12), generator=torch.Generator().manual_seed(3)),
                                 num_levels=2)
    dst = ELSALinear(12, 7, num_levels=2)
    assert dst.sparsities == [0.0, 0.0]
    dst.load_state_dict(src.state_dict())
    assert dst.sparsities == src.sparsities
    x = torch.randn(2, 12)
    for t in (1, 2, 3):
        src.set_level(t)
        dst.set_level(t)
        assert torch.equal(src(x), dst(x))
    # from then on it holds a record: plain weights are refused
    with pytest.raises(ELSAError, match="'weight'"):
        dst.load_state_dict(nn.Linear(12, 7).state_dict())


def test_swap_refuses_foreign_codes_for_an_elsa_layer_it_does_not_replace():
    model, enc, _ = served_mlp(levels=[0.9, 0.5])
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 40), nn.ReLU(), nn.Linear(40, 7))
    enc2 = ec.encode(fresh.state_dict(), ec.magnitude_counters(fresh, [0.75, 0.5]))
    before = snapshot(model)
    with pytest.raises(ELSAError, match=r"'1.weight'.*level 1 would keep"):
        ec.swap_(model, enc2, filter_fn=lambda m, fqn: fqn == "3")  # layer 1 stays; enc2's codes are not its own
    assert_unchanged(model, before)
    assert type(model[3]).__name__ == "ELSALinear" and model[3].weight is not enc2["3.weight"]


def test_the_load_check_is_registered_once():
    model, enc, _ = served_mlp()
    ec.swap_(model, enc)  # again: the same ELSAStateDict may serve its model again
    from elsa_codec.serving.base import refuse_foreign_state

    hooks = [h for h in model._load_state_dict_pre_hooks.values() if getattr(h, "hook", None) is refuse_foreign_state]
    assert len(hooks) == 1


# -- 2. pickling keeps the cast guard --------------------------------------------------------------
def _roundtrips():
    def torch_save(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": torch_save, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", sorted(_roundtrips()))
def test_a_pickled_served_model_keeps_the_cast_guard(how):
    model, _, plain = served_mlp()
    with pytest.raises(ELSAError) as before_pickle:
        copy.deepcopy(model).double()
    x = torch.randn(3, 32)
    want = outputs(model, x)
    back = _roundtrips()[how](model)
    before = snapshot(back)
    with pytest.raises(ELSAError) as e:
        back.double()
    assert str(e.value) == str(before_pickle.value) and "Nothing was converted" in str(e.value)
    assert_unchanged(back, before)  # every tensor keeps its dtype and bits
    for a, b in zip(outputs(back, x), want):
        assert torch.equal(a, b)
    # the load check came along too
    with pytest.raises(ELSAError, match="'1.weight'"):
        back.load_state_dict(plain)
    assert_unchanged(back, before)
    # and a cast that keeps the codes still re-encodes every level
    back.half()
    assert back[1].weight.dtype == torch.float16 and back[0].weight.dtype == torch.float16


def test_the_guard_of_an_unpickled_model_is_its_own():
    model, _, _ = served_mlp()
    back = pickle.loads(pickle.dumps(model))
    assert back.__dict__["_apply"].model is back
    back.half()
    assert model[0].weight.dtype == torch.float32  # casting the copy left the original alone


# -- 3. torch.nn.utils.prune -----------------------------------------------------------------------
def pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    return model


FIX = r"module '0' is pruned with torch.nn.utils.prune.*torch\.nn\.utils\.prune\.remove\(model\.get_submodule\('0'\), 'weight'\)"


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: ec.select_weights(m), id="select_weights"),
    pytest.param(lambda m: ec.select_weights(m, "all"), id="select_weights-all"),
    pytest.param(lambda m: ec.magnitude_counters(m, [0.5]), id="magnitude_counters-model"),
    pytest.param(lambda m: ec.LevelEmbedder(m, ec.ELSAConfig(levels=[0.5], steps=10, densify_steps=2, final_steps=2)),
                 id="LevelEmbedder"),
    pytest.param(lambda m: ec.LevelEmbedder(m, ec.ELSAConfig(levels=[0.5], steps=10, densify_steps=2, final_steps=2,
                                                            filter_fn=lambda mod, fqn: True)), id="LevelEmbedder-filter_fn"),
])
def test_a_pruned_model_is_refused_not_skipped(call):
    model = pruned_mlp()
    with pytest.raises(ELSAError, match=FIX):
        call(model)


@pytest.mark.parametrize("call", [
    pytest.param(lambda sd: ec.encode(sd, ec.Counters({"2.weight": torch.full((4, 24), 2, dtype=torch.uint8)}, 1)),
                 id="encode"),
    pytest.param(lambda sd: ec.magnitude_counters(sd, [0.5]), id="magnitude_counters-state-dict"),
])
def test_a_pruned_state_dict_is_refused_not_skipped(call):
    sd = pruned_mlp().state_dict()
    assert "0.weight_orig" in sd and "0.weight_mask" in sd and "0.weight" not in sd
    with pytest.raises(ELSAError, match=r"module '0' is pruned.*'0.weight_orig' and '0.weight_mask'.*prune\.remove"):
        call(sd)


def test_a_bare_state_dict_with_orig_and_mask_names_is_refused_too():
    sd = {"x.weight_orig": torch.randn(3, 4), "x.weight_mask": torch.ones(3, 4), "y.weight": torch.randn(2, 3)}
    with pytest.raises(ELSAError, match=r"module 'x' is pruned"):
        ec.encode(sd, ec.Counters({"y.weight": torch.full((2, 3), 2, dtype=torch.uint8)}, 1))
    # names alone are no pruning: a '_mask' of another shape is an ordinary tensor
    ok = {"x.weight_orig": torch.randn(3, 4), "x.weight_mask": torch.ones(4), "y.weight": torch.randn(2, 3)}
    ec.encode(ok, ec.Counters({"y.weight": torch.full((2, 3), 2, dtype=torch.uint8)}, 1))


def test_swap_into_a_pruned_module_is_refused_with_the_fix():
    src = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    enc = ec.encode(src.state_dict(), ec.magnitude_counters(src, [0.5]))
    model = pruned_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ELSAError, match=FIX):
        ec.swap_(model, enc, strict=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_after_prune_remove_the_model_encodes_and_serves():
    model = pruned_mlp()
    prune.remove(model[0], "weight")
    assert ec.select_weights(model) == ["0.weight", "2.weight"]
    enc = ec.encode(model.state_dict(), ec.magnitude_counters(model, [0.75]))
    served = copy.deepcopy(model)
    ec.swap_(served, enc)
    assert [lv.sparsity for lv in ec.levels(served)][:1] == [pytest.approx(0.75, abs=0.01)]
