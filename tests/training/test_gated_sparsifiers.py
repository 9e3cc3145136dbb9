"""Sparsifiers that train extra parameters: L0 gates (Louizos et al. 2018) and sparse variational
dropout (Molchanov et al. 2017): installed for a sparsify phase, gone afterwards, exact targets."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_train import Tiny, _calib, _data, _same_bits
from torch import nn
from torch.nn.utils import parametrize

import elsa_codec as ec
from elsa_codec import ELSAError

METHODS = {"l0": lambda: ec.L0Sparsifier(strength=0.5), "vd": lambda: ec.VariationalDropoutSparsifier(strength=0.5)}


def penalised_train_fn(record=None, fail_at=None):
    """A user's train_fn: cross-entropy plus ec.sparsity_penalty(model), the optimizer made per phase."""
    x, y = _data()

    def train_fn(model, phase):
        g = torch.Generator().manual_seed(phase.seed or 0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for i in range(phase.steps):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("train_fn failed")
            idx = torch.randint(0, len(y), (32,), generator=g)
            pen = ec.sparsity_penalty(model)
            loss = F.cross_entropy(model(x[idx]), y[idx]) + pen
            opt.zero_grad()
            loss.backward()
            opt.step()
            if record is not None:
                record.append(float(pen))

    return train_fn


def _plain(model):
    return not any(parametrize.is_parametrized(m) for m in model.modules()) and all(
        type(p) is nn.Parameter for p in model.parameters())


@pytest.mark.parametrize("method", list(METHODS))
def test_prune_gmp_exact_target_plain_weights_and_penalty(method):
    torch.manual_seed(0)
    model, pens = Tiny(), []
    keys = list(model.state_dict())
    sp = METHODS[method]()
    masks = ec.prune_gmp(model, 0.8, penalised_train_fn(pens), steps=40, seed=0, progress=False, sparsifier=sp)
    assert _plain(model) and list(model.state_dict()) == keys  # the extra parameters are gone
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)  # exact, over all layers
    assert all(not model.get_parameter(n)[~m].any() for n, m in masks.items())
    assert pens[0] > 0 and pens[-1] < pens[0]  # the penalty was in the loss and training lowered it
    assert float(ec.sparsity_penalty(model)) == 0.0  # nothing installed outside the phase


@pytest.mark.parametrize("method", list(METHODS))
def test_masks_rank_by_the_learned_scores(method):
    torch.manual_seed(0)
    model = Tiny()
    sp = METHODS[method]()
    masks = ec.prune_gmp(model, 0.7, penalised_train_fn(), steps=30, seed=0, progress=False, sparsifier=sp)
    scores = torch.cat([sp.learned_scores[n].reshape(-1) for n in masks])
    kept = torch.cat([masks[n].reshape(-1) for n in masks])
    assert float(scores[kept].min()) >= float(scores[~kept].max())  # one global ranking: learned per-layer shares
    shares = [float(m.float().mean()) for m in masks.values()]
    assert max(shares) - min(shares) > 0.01  # not uniform


@pytest.mark.parametrize("method", list(METHODS))
def test_elsa_levels_with_learned_sparsity(method):
    torch.manual_seed(0)
    model, snaps = Tiny(), {}
    res = ec.embed_levels(model, [0.75, 0.5], penalised_train_fn(), steps=20, densify_steps=8, seed=0,
                          progress=False, sparsifier=METHODS[method](), bn_calibration=_calib(),
                          on_freeze=lambda t, m: snaps.__setitem__(t, copy.deepcopy(m.state_dict())))
    assert _plain(model)
    assert [round(s, 3) for s in res.sparsities] == [0.75, 0.5]
    enc = res.encode()
    for t in (1, 2):
        plain = ec.extract(enc, t)
        assert all(_same_bits(plain[n], snaps[t][n]) for n in res.counters)  # frozen weights never moved


def test_l0_folds_the_test_time_gate():
    """After the phase the weights hold weight * (test-time gate): a gate at log_alpha = 0 is 0.5
    (row 1 halves), an open one (log_alpha = 50) is 1 (rows 2+ unchanged); the closed row 0 is pruned."""
    torch.manual_seed(0)
    model = Tiny()
    sp = ec.L0Sparsifier(strength=0.0, init=50.0)
    before = model.fc1.weight.detach().clone()

    def no_training(m, phase):
        gate = m.fc1.parametrizations.weight[0]
        with torch.no_grad():
            gate.log_alpha[0].fill_(-50.0)  # close row 0's gates
            gate.log_alpha[1].fill_(0.0)  # test-time gate sigmoid(0) * 1.2 - 0.1 = 0.5

    with pytest.warns(UserWarning):  # no optimizer step ran
        ec.prune_gmp(model, 16 / 640, no_training, steps=1, progress=False, sparsifier=sp)  # exactly row 0
    assert not model.fc1.weight[0].any()
    torch.testing.assert_close(model.fc1.weight[1], before[1] * 0.5, rtol=1e-6, atol=0)
    assert torch.equal(model.fc1.weight[2:], before[2:])


@pytest.mark.parametrize("method", list(METHODS))
def test_train_fn_failing_removes_the_parameters(method):
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(RuntimeError, match="train_fn failed"):
        ec.prune_gmp(model, 0.8, penalised_train_fn(fail_at=3), steps=10, progress=False, sparsifier=METHODS[method]())
    assert _plain(model)


def test_structured_levels_and_own_loops_refused():
    torch.manual_seed(0)
    with pytest.raises(ELSAError, match="unstructured"):
        ec.prune_gmp(Tiny(), "2:4", penalised_train_fn(), steps=4, progress=False, sparsifier=ec.L0Sparsifier())
    model = Tiny()
    emb = ec.LevelEmbedder(model, ec.ELSAConfig(levels=[0.5], steps=4, sparsifier=ec.VariationalDropoutSparsifier()))
    with pytest.raises(ELSAError, match="adds parameters"):
        emb.attach(torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("make", [lambda: ec.L0Sparsifier(strength=-1.0), lambda: ec.L0Sparsifier(init=float("nan")),
                                  lambda: ec.VariationalDropoutSparsifier(strength=-0.1),
                                  lambda: ec.VariationalDropoutSparsifier(init=float("inf")),
                                  lambda: ec.L0Sparsifier(seed=1.5)],
                         ids=["l0-strength", "l0-init", "vd-strength", "vd-init", "seed"])
def test_bad_arguments(make):
    with pytest.raises(ELSAError):
        make()


@pytest.mark.parametrize("method", list(METHODS))
def test_reproducible_with_a_seed_whatever_the_global_rng(method):
    out = []
    for i in range(2):
        torch.manual_seed(0)
        model = Tiny()
        torch.manual_seed(100 + i)  # the global RNG differs between the runs; the sparsifier's noise does not
        out.append(ec.prune_gmp(model, 0.8, penalised_train_fn(), steps=10, seed=0, progress=False,
                                sparsifier=METHODS[method]()))
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])
