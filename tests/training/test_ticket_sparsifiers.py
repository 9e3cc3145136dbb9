"""Sparsifiers that decide when to prune inside a phase: early-bird tickets (You et al. 2020) and
lottery tickets with rewinding (Frankle et al. 2019), through prune_gmp, embed_levels and LevelEmbedder."""
import copy
import os
import sys

import pytest
import torch
from test_train import Tiny, _calib, _same_bits, make_train_fn

import elsa_codec as ec
from elsa_codec import ELSAError

sys.path.insert(0, os.path.dirname(__file__))
import elsa_resume_job as job  # noqa: E402


def _gmp(sparsifier, steps, *, sparsity=0.8, tamper=None):
    torch.manual_seed(0)
    model = Tiny()
    masks = ec.prune_gmp(model, sparsity, make_train_fn(tamper=tamper), steps=steps, seed=0, progress=False,
                         sparsifier=sparsifier)
    return model, masks


def _embed(sparsifier, *, steps=40):
    torch.manual_seed(0)
    model, snaps = Tiny(), {}
    res = ec.embed_levels(model, [0.75, 0.5], make_train_fn(), steps=steps, densify_steps=8, seed=0, progress=False,
                          sparsifier=sparsifier, bn_calibration=_calib(),
                          on_freeze=lambda t, m: snaps.__setitem__(t, copy.deepcopy(m.state_dict())))
    return res, snaps


def _check_levels(res, snaps):
    """Exact targets, nested levels, and each shipped level bit for bit the one that was frozen."""
    assert [round(s, 3) for s in res.sparsities] == [0.75, 0.5]
    enc = res.encode()
    for t in (1, 2):
        plain = ec.extract(enc, t)
        assert all(_same_bits(plain[n], snaps[t][n]) for n in res.counters)
    for _n, c in res.counters.items():
        assert bool(((c <= 2) | ~(c <= 1)).all())


# ---- early-bird ----

def test_early_bird_draws_the_ticket_early_and_keeps_it():
    sp = ec.EarlyBirdSparsifier(interval=4, threshold=0.2, patience=2)
    seen = []
    model, masks = _gmp(sp, 80, tamper=lambda m, ph, i: seen.append((i + 1, m.fc1.weight.detach().eq(0).clone())))
    d = sp.draws[-1]
    assert d["drawn_at"] is not None and d["drawn_at"] < 80, d
    assert all(x < 0.2 for x in d["distances"][-2:])
    # dense training before the draw, the fixed ticket after it
    assert all(not z.any() for step, z in seen if step < d["drawn_at"])
    after = [z for step, z in seen if step >= d["drawn_at"]]
    assert all(torch.equal(z, ~masks["fc1.weight"]) for z in after)
    assert abs(float(masks["fc1.weight"].float().mean()) - 0.2) < 0.01


def test_early_bird_that_never_settles_prunes_at_the_end():
    sp = ec.EarlyBirdSparsifier(interval=2, threshold=1e-9, patience=50)
    _, masks = _gmp(sp, 20)
    assert sp.draws[-1]["drawn_at"] is None and len(sp.draws[-1]["distances"]) == 9
    assert all(abs(float(m.float().mean()) - 0.2) < 0.01 for m in masks.values())


def test_early_bird_elsa_levels():
    sp = ec.EarlyBirdSparsifier(interval=3, threshold=0.2, patience=2)
    res, snaps = _embed(sp)
    _check_levels(res, snaps)
    assert len(sp.draws) == 2 and all(d["drawn_at"] is not None for d in sp.draws)


@pytest.mark.parametrize("kw", [dict(interval=0), dict(patience=0), dict(threshold=0.0), dict(threshold=1.0),
                                dict(interval=2.5), dict(distribution="erk-ish")],
                         ids=["interval", "patience", "threshold0", "threshold1", "float-interval", "distribution"])
def test_early_bird_bad_arguments(kw):
    with pytest.raises(ELSAError):
        ec.EarlyBirdSparsifier(**kw)


def test_resume_inside_a_phase_of_a_ticket_sparsifier_is_refused():
    cfg = ec.ELSAConfig(**{**job.CONFIG, "sparsifier": ec.EarlyBirdSparsifier(interval=2)})
    model, emb, opt, sched = job.setup(cfg)
    emb.attach(opt)
    job.train(model, emb, opt, sched, 0, 4)  # inside level 1's sparsify phase
    saved = emb.state_dict()
    _, other, _, _ = job.setup(ec.ELSAConfig(**{**job.CONFIG, "sparsifier": ec.EarlyBirdSparsifier(interval=2)}))
    with pytest.raises(ELSAError, match="phase boundary"):
        other.load_state_dict(saved)


# ---- lottery ticket with rewinding ----

def test_lottery_ticket_rounds_and_rewinding():
    sp = ec.LotteryTicketSparsifier(rounds=2, rewind=0.1)
    snaps = {}
    _, masks = _gmp(sp, 40, tamper=lambda m, ph, i: snaps.__setitem__(i + 1, m.fc1.weight.detach().clone()))
    rounds = sp.rounds_done[-1]
    assert [s for s, _ in rounds] == [16, 28]  # k = 4, then 3 segments of 12 steps
    (s1, sp1), (s2, sp2) = rounds
    assert sp1 == pytest.approx(1 - 0.2 ** 0.5) and sp2 == 0.8
    keep = masks["fc1.weight"]
    # the survivors of the last round are back at their values after the rewinding step k = 4
    assert torch.equal(snaps[s2][keep], snaps[4][keep])
    assert not snaps[s2][~keep].any()
    assert abs(float(keep.float().mean()) - 0.2) < 0.01


def test_lottery_ticket_elsa_levels():
    sp = ec.LotteryTicketSparsifier(rounds=2, rewind=0.1)
    res, snaps = _embed(sp)
    _check_levels(res, snaps)
    assert len(sp.rounds_done) == 2 and all(len(r) == 2 for r in sp.rounds_done)


def test_lottery_ticket_phase_too_short():
    with pytest.raises(ELSAError, match="too short"):
        _gmp(ec.LotteryTicketSparsifier(rounds=5, rewind=0.5), 8)


@pytest.mark.parametrize("kw", [dict(rounds=0), dict(rounds=True), dict(rewind=1.0), dict(rewind=-0.1)],
                         ids=["rounds0", "rounds-bool", "rewind1", "rewind-neg"])
def test_lottery_ticket_bad_arguments(kw):
    with pytest.raises(ELSAError):
        ec.LotteryTicketSparsifier(**kw)


def test_gradual_sparsifiers_unchanged_by_the_phase_hooks():
    """Magnitude GMP still prunes along its ramp (the hooks are no-ops for it)."""
    seen = []
    _gmp(ec.MagnitudeSparsifier(), 20,
         tamper=lambda m, ph, i: seen.append(float(m.fc1.weight.detach().eq(0).float().mean())))
    assert seen[0] < seen[7] < seen[-1] and abs(seen[-1] - 0.8) < 0.01


@pytest.mark.parametrize("make", [lambda: ec.EarlyBirdSparsifier(interval=4, threshold=0.2, patience=2),
                                  lambda: ec.LotteryTicketSparsifier(rounds=2, rewind=0.1)],
                         ids=["early-bird", "lottery"])
def test_reproducible_with_a_seed(make):
    out = []
    for i in range(2):
        torch.manual_seed(100 + i)  # the global RNG differs; the model and the run's seed do not
        model = Tiny()
        model.load_state_dict(_tiny_state())
        out.append(ec.prune_gmp(model, 0.8, make_train_fn(), steps=40, seed=0, progress=False, sparsifier=make()))
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])


def _tiny_state():
    torch.manual_seed(0)
    return Tiny().state_dict()
