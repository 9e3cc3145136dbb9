"""RandomSparsifier: random pruning with uniform / ERK layer-wise ratios (Liu et al. 2022), nested."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import Tiny, _calib, _same_bits, make_train_fn

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.format.structure import mask_structure_ok
from elsa_codec.oneshot.masks import magnitude_mask
from elsa_codec.training.schedule import erk_densities
from elsa_codec.training.sparsifiers.base import check_masks


def _weights(seed=0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"conv.weight": (8, 4, 3, 3), "fc.weight": (10, 32), "odd.weight": (63, 123)}
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _none(ws):
    return {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in ws.items()}


def _levels(sp, ws, targets, structure="unstructured"):
    frozen, out = _none(ws), []
    for t in targets:
        ms = check_masks(sp.masks(ws, frozen, t, structure), ws, frozen, structure)
        out.append(ms)
        frozen = ms
    return out


@pytest.mark.parametrize("dist", ["uniform", "erk"])
def test_levels_nested_and_exact(dist):
    ws = _weights()
    total = sum(w.numel() for w in ws.values())
    levels = _levels(ec.RandomSparsifier(dist, seed=1), ws, [0.9, 0.75, 0.5])
    for sparser, denser in zip(levels, levels[1:]):
        assert all(bool((denser[n] | ~sparser[n]).all()) for n in ws)  # every denser level keeps the sparser's
    for target, ms in zip([0.9, 0.75, 0.5], levels):
        kept = sum(int(m.sum()) for m in ms.values())
        assert abs(kept - (1 - target) * total) <= len(ws)
        if dist == "uniform":
            for _n, m in ms.items():
                assert int(m.sum()) == round((1 - target) * m.numel())


def test_erk_ratios_are_the_erk_densities():
    ws = _weights()
    ms = _levels(ec.RandomSparsifier("erk", seed=0), ws, [0.8])[0]
    dens = erk_densities({n: tuple(w.shape) for n, w in ws.items()}, 0.2)
    for n, m in ms.items():
        assert abs(int(m.sum()) - dens[n] * m.numel()) <= 1, n


def test_reproducible_with_a_seed_and_independent_of_order():
    ws = _weights()
    a = _levels(ec.RandomSparsifier("uniform", seed=7), ws, [0.75])[0]
    rev = dict(reversed(list(ws.items())))
    b = _levels(ec.RandomSparsifier("uniform", seed=7), rev, [0.75])[0]
    c = _levels(ec.RandomSparsifier("uniform", seed=8), ws, [0.75])[0]
    assert all(torch.equal(a[n], b[n]) for n in ws)
    assert not all(torch.equal(a[n], c[n]) for n in ws)


def test_masks_ignore_the_weights_values():
    """Random, not magnitude: the mask does not change when the weights do, and it overlaps the
    magnitude mask only as much as chance would (density^2 of the weights)."""
    ws = _weights(shapes={"w": (256, 256)})
    sp = ec.RandomSparsifier("uniform", seed=0)
    m1 = sp.masks(ws, _none(ws), 0.5)["w"]
    m2 = sp.masks({"w": ws["w"] * -3.0 + 1.0}, _none(ws), 0.5)["w"]
    assert torch.equal(m1, m2)
    overlap = float((m1 & magnitude_mask(ws["w"], 0.5)).float().mean())
    assert 0.22 < overlap < 0.28  # chance: 0.25; a magnitude-like mask would give 0.5


@pytest.mark.parametrize("structure,targets", [("2:4", ["1:4", "2:4"]), ("block:4x4", [0.75, 0.5])],
                         ids=["nm", "block"])
def test_structures(structure, targets):
    ws = _weights(shapes={"a.weight": (16, 32), "b.weight": (64, 48)})
    sp = ec.RandomSparsifier("uniform", seed=3)
    frozen = _none(ws)
    for t in targets:
        st_ = t if isinstance(t, str) else structure
        sparsity = 1 - int(t.split(":")[0]) / 4 if isinstance(t, str) else t
        ms = check_masks(sp.masks(ws, frozen, sparsity, st_), ws, frozen, st_)
        assert all(mask_structure_ok(m, st_) for m in ms.values())
        frozen = ms


@pytest.mark.parametrize("kw,match", [(dict(distribution="global"), "unknown distribution"),
                                      (dict(distribution="magnitude"), "unknown distribution"),
                                      (dict(seed=1.5), "seed must be an int"), (dict(seed=True), "seed")],
                         ids=["global", "magnitude", "float-seed", "bool-seed"])
def test_bad_arguments(kw, match):
    with pytest.raises(ELSAError, match=match):
        ec.RandomSparsifier(**kw)


def test_frozen_over_target_is_an_error():
    ws = _weights()
    frozen = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in ws.items()}
    with pytest.raises(ELSAError):
        ec.RandomSparsifier("uniform").masks(ws, frozen, 0.5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.floats(0.05, 0.95), min_size=1, max_size=4, unique=True),
       st.sampled_from(["uniform", "erk"]), st.sampled_from([(63, 123), (64, 128), (7, 5)]))
def test_nesting_property(seed, targets, dist, shape):
    ws = _weights(seed, {"a.weight": shape, "b.weight": (shape[1], shape[0])})
    total = sum(w.numel() for w in ws.values())
    frozen = _none(ws)
    for t in sorted(targets, reverse=True):
        ms = check_masks(ec.RandomSparsifier(dist, seed=seed).masks(ws, frozen, t), ws, frozen)
        assert abs(sum(int(m.sum()) for m in ms.values()) - (1 - t) * total) <= len(ws)
        frozen = ms


def test_embed_levels_with_random_pruning_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    snaps = {}
    res = ec.embed_levels(model, [0.75, 0.5], make_train_fn(), steps=12, densify_steps=8, seed=0, progress=False,
                          sparsifier=ec.RandomSparsifier("erk", seed=0), schedule=ec.GMPSchedule(end=0.0),
                          bn_calibration=_calib(),
                          on_freeze=lambda t, m: snaps.__setitem__(t, copy.deepcopy(m.state_dict())))
    assert [round(s, 3) for s in res.sparsities] == [0.75, 0.5]
    enc = res.encode()
    for t in (1, 2):
        plain = ec.extract(enc, t)
        for n in res.counters:
            assert _same_bits(plain[n], snaps[t][n]), (t, n)  # the level that ships is the one frozen
    for n, c in res.counters.items():  # random, not magnitude: level 1 is not the largest weights
        assert not torch.equal(c <= 1, magnitude_mask(snaps[1][n], 0.75)), n
    ec.save_file(enc, str(tmp_path / "r.safetensors"))
    assert "RandomSparsifier('erk', seed=0)" in str(ec.read_meta(str(tmp_path / "r.safetensors")).training)


def test_prune_gmp_with_random_pruning_is_reproducible():
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Tiny()
        out.append(ec.prune_gmp(model, 0.8, make_train_fn(), steps=10, seed=0, progress=False,
                                sparsifier=ec.RandomSparsifier("uniform", seed=5)))
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])
    assert all(abs(float(m.float().mean()) - 0.2) < 0.01 for m in out[0].values())
