"""Sparsifiers: GMP schedule values, ERK densities, nesting of masks on frozen weights."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elsa_codec import ELSAError
from elsa_codec.format.structure import mask_structure_ok
from elsa_codec.training.schedule import GMPSchedule, erk_densities, gmp_sparsity
from elsa_codec.training.sparsifiers.base import MagnitudeSparsifier, MaskFnSparsifier, as_sparsifier, check_masks


# ---------------------------------------------------------------- GMP (Zhu & Gupta 2017)
def test_gmp_formula_values():
    kw = dict(initial=0.0, final=0.9, begin=10, n=4, every=5)  # ramp over steps 10..30
    assert gmp_sparsity(0, **kw) == 0.0
    assert gmp_sparsity(10, **kw) == 0.0
    # s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))**3
    assert gmp_sparsity(15, **kw) == pytest.approx(0.9 - 0.9 * 0.75**3)
    assert gmp_sparsity(20, **kw) == pytest.approx(0.9 - 0.9 * 0.5**3)
    assert gmp_sparsity(25, **kw) == pytest.approx(0.9 - 0.9 * 0.25**3)
    assert gmp_sparsity(30, **kw) == pytest.approx(0.9)
    assert gmp_sparsity(1000, **kw) == 0.9
    # non-zero initial sparsity
    assert gmp_sparsity(20, initial=0.5, final=0.9, begin=10, n=2, every=10) == pytest.approx(0.9 - 0.4 * 0.5**3)
    # monotone
    vals = [gmp_sparsity(t, **kw) for t in range(40)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_gmp_formula_bad_input():
    with pytest.raises(ELSAError):
        gmp_sparsity(0, initial=0.0, final=1.0, begin=0, n=1, every=1)
    with pytest.raises(ELSAError):
        gmp_sparsity(0, initial=0.0, final=0.5, begin=0, n=1, every=0)


def test_gmp_schedule_plan():
    s = GMPSchedule(begin=0.0, end=0.5, updates=5)
    assert s.plan(100) == (0, 5, 10)
    assert s.update_steps(100) == [10, 20, 30, 40, 50]
    assert s.sparsity(0, 100, 0.8) == 0.0
    assert s.sparsity(50, 100, 0.8) == pytest.approx(0.8)
    assert s.sparsity(20, 100, 0.8) == pytest.approx(0.8 - 0.8 * 0.6**3)
    assert GMPSchedule(every=7, end=1.0).plan(70) == (0, 10, 7)
    assert GMPSchedule().plan(0) == (0, 0, 1)
    with pytest.raises(ELSAError):
        GMPSchedule(begin=0.8, end=0.5)


# ---------------------------------------------------------------- ERK (Evci et al. 2020)
def test_erk_proportional_and_total():
    shapes = {"a": (64, 32, 3, 3), "b": (128, 64, 3, 3), "c": (10, 512)}
    d = erk_densities(shapes, 0.05)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(0.05 * sum(numel.values()))
    # densities proportional to sum(shape)/prod(shape) when none is capped
    assert all(d[n] < 1 for n in shapes)
    assert d["a"] / d["b"] == pytest.approx(raw["a"] / raw["b"])
    assert d["c"] / d["b"] == pytest.approx(raw["c"] / raw["b"])


def test_erk_caps_at_one_and_redistributes():
    shapes = {"tiny": (4, 1, 3, 3), "big": (256, 256), "mid": (64, 64)}
    d = erk_densities(shapes, 0.1)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert d["tiny"] == 1.0 and d["mid"] < 1.0
    assert sum(d[n] * numel[n] for n in shapes) == pytest.approx(0.1 * sum(numel.values()))
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    assert d["mid"] / d["big"] == pytest.approx(raw["mid"] / raw["big"])
    assert erk_densities(shapes, 1.0) == {"tiny": 1.0, "big": 1.0, "mid": 1.0}


def test_erk_monotone_in_density():
    shapes = {"a": (16, 1, 3, 3), "b": (32, 16, 3, 3), "c": (10, 128)}
    prev = None
    for dens in (0.05, 0.1, 0.25, 0.5, 0.9):
        d = erk_densities(shapes, dens)
        if prev is not None:
            assert all(d[n] >= prev[n] - 1e-12 for n in shapes)
        prev = d


# ---------------------------------------------------------------- masks
def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=g),
        "fc.weight": torch.randn(10, 32, generator=g),
    }


def _none(ws):
    return {n: torch.zeros(w.shape, dtype=torch.bool) for n, w in ws.items()}


@pytest.mark.parametrize("dist", ["uniform", "global", "erk"])
def test_magnitude_levels_nest(dist):
    ws = _weights()
    sp = MagnitudeSparsifier(dist)
    frozen = _none(ws)
    total = sum(w.numel() for w in ws.values())
    for target in (0.9, 0.75, 0.5):
        # perturb the weights between levels (training happens in between)
        ws = {n: w + 0.3 * torch.randn_like(w) for n, w in ws.items()}
        ms = check_masks(sp.masks(ws, frozen, target), ws, frozen)
        for n in ws:
            assert bool((ms[n] | ~frozen[n]).all()), "a level's mask contains the previous level's"
        kept = sum(int(m.sum()) for m in ms.values())
        assert abs(kept - (1 - target) * total) <= len(ws)
        frozen = ms


def test_global_is_one_threshold():
    ws = _weights(1)
    ms = MagnitudeSparsifier("global").masks(ws, _none(ws), 0.7)
    kept = torch.cat([ws[n].abs()[ms[n]] for n in ws])
    pruned = torch.cat([ws[n].abs()[~ms[n]] for n in ws])
    assert kept.min() >= pruned.max()


def test_uniform_per_tensor():
    ws = _weights(2)
    ms = MagnitudeSparsifier("uniform").masks(ws, _none(ws), 0.75)
    for n, w in ws.items():
        assert int(ms[n].sum()) == round(0.25 * w.numel())


def test_nm_gradual_and_nested():
    w = {"fc.weight": torch.randn(6, 16)}
    sp = MagnitudeSparsifier()
    frozen = _none(w)
    m = sp.masks(w, frozen, 0.0, "2:8")["fc.weight"]
    assert bool(m.all())  # dense at the start of the ramp
    m = sp.masks(w, frozen, 0.5, "2:8")["fc.weight"]
    assert mask_structure_ok(m, "4:8") and int(m.sum()) == 6 * 2 * 4
    m1 = sp.masks(w, frozen, 0.875, "1:8")["fc.weight"]
    assert mask_structure_ok(m1, "1:8")
    m2 = sp.masks(w, {"fc.weight": m1}, 0.75, "2:8")["fc.weight"]
    assert mask_structure_ok(m2, "2:8") and bool((m2 | ~m1).all())


def test_block_structure_nested():
    w = {"fc.weight": torch.randn(8, 16)}
    sp = MagnitudeSparsifier()
    m1 = sp.masks(w, _none(w), 0.75, "block:2x4")["fc.weight"]
    assert mask_structure_ok(m1, "block:2x4")
    m2 = sp.masks(w, {"fc.weight": m1}, 0.5, "block:2x4")["fc.weight"]
    assert mask_structure_ok(m2, "block:2x4") and bool((m2 | ~m1).all())


@pytest.mark.parametrize("dist", ["uniform", "global"])
def test_frozen_exceeding_target_is_an_error(dist):
    ws = _weights()
    frozen = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in ws.items()}
    with pytest.raises(ELSAError, match="exceed"):
        MagnitudeSparsifier(dist).masks(ws, frozen, 0.5)


def test_mask_function_plugs_in_and_is_checked():
    ws = _weights()

    def random_mask(name, weight, frozen, target):
        g = torch.Generator().manual_seed(len(name))
        return frozen | (torch.rand(weight.shape, generator=g) > target)

    sp = as_sparsifier(random_mask)
    assert isinstance(sp, MaskFnSparsifier)
    frozen = _none(ws)
    ms = check_masks(sp.masks(ws, frozen, 0.5), ws, frozen)
    assert set(ms) == set(ws)

    def bad(name, weight, frozen, target):
        return torch.zeros(weight.shape, dtype=torch.bool)

    frozen = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in ws.items()}
    with pytest.raises(ELSAError, match="drops"):
        check_masks(as_sparsifier(bad).masks(ws, frozen, 0.5), ws, frozen)
    with pytest.raises(ELSAError):
        as_sparsifier("nonsense")
    with pytest.raises(ELSAError):
        as_sparsifier(42)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 10_000),
    st.lists(st.floats(0.05, 0.95), min_size=1, max_size=4, unique=True),
    st.sampled_from(["uniform", "global", "erk"]),
)
def test_nesting_property(seed, targets, dist):
    ws = _weights(seed)
    frozen = _none(ws)
    sp = MagnitudeSparsifier(dist)
    for target in sorted(targets, reverse=True):
        ms = check_masks(sp.masks(ws, frozen, target), ws, frozen)
        frozen = ms
