"""The step guard: grad mode (masked gradients + zeroed first moments, nothing after the step) for
the element-wise torch optimizers, restore mode otherwise; frozen weights bit for bit and pruned
weights +0.0 after every step, through each change of the optimizer state."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elsa_codec import ELSAConfig, LevelEmbedder
from elsa_codec.format.bits import bits_view
from elsa_codec.training.guard import ZERO_UPDATE

torch.set_num_threads(1)

CFG = dict(levels=[0.75, 0.5], steps=8, densify_steps=4, final_steps=4, seed=0, verify="step")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(63, 123), nn.ReLU(), nn.Linear(123, 17), nn.ReLU(), nn.Linear(17, 5))


def _batch(g):
    return torch.randn(9, 63, generator=g), torch.randint(0, 5, (9,), generator=g)


def _bits(t):
    return bits_view(t.detach().contiguous())


def _assert_guarded(emb, snaps):
    """Frozen entries equal their freeze-time values bit for bit; pruned entries are +0.0."""
    st = emb.state
    for n, p in st.params.items():
        f = st.frozen[n]
        if f.any():
            assert torch.equal(_bits(p)[f], _bits(st.values[n])[f]), n
        if st.mask is not None:
            assert not _bits(p)[~st.mask[n]].any(), n  # all bits zero: +0.0


def _train(make_opt, config=CFG, *, each=None, closure=False):
    model = _model()
    opt = make_opt(model.parameters())
    emb = LevelEmbedder(model, ELSAConfig(**config))
    snaps = {}
    emb.on_freeze = lambda t, m: snaps.setdefault(t, {n: p.detach().clone() for n, p in m.named_parameters()})
    emb.attach(opt)
    g = torch.Generator().manual_seed(1)
    for i in range(emb.total_steps):
        x, y = _batch(g)

        def loss_fn():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        _assert_guarded(emb, snaps)
        if each is not None:
            each(i, model, opt, emb)
    res = emb.finalize()
    for t, snap in snaps.items():
        for n, c in res.counters.items():
            k = c <= t
            assert torch.equal(_bits(dict(model.named_parameters())[n])[k], _bits(snap[n])[k]), (n, t)
    return model, opt, emb


def _modes(emb, opt):
    plan = emb.guard.plans[id(opt)]
    return set(plan.exempt), set(plan.restore)


GRAD_MODE = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd-dampening-maximize": lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.5, dampening=0.2, maximize=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw-no-decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "rmsprop-momentum-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5),
}


@pytest.mark.parametrize("name", list(GRAD_MODE))
def test_grad_mode_keeps_frozen_bits_and_pruned_zeros_without_a_restore(name):
    seen = []

    def each(i, model, opt, emb):
        seen.append(_modes(emb, opt))

    model, opt, emb = _train(GRAD_MODE[name], each=each)
    assert type(opt) in ZERO_UPDATE
    assert all(not restore for _, restore in seen), "grad mode: nothing restored after the step"
    assert any(exempt for exempt, _ in seen)


class _MyAdamW(torch.optim.AdamW):
    pass


RESTORE_MODE = {
    "adamw-decay": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam-coupled-decay": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "subclass": lambda p: _MyAdamW(p, lr=1e-2, weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(RESTORE_MODE))
def test_restore_mode_for_decay_on_frozen_weights_and_unknown_optimizers(name):
    seen = []
    model, opt, emb = _train(RESTORE_MODE[name], each=lambda i, m, o, e: seen.append((i, _modes(e, o))))
    frozen_phase = [modes for i, modes in seen if i >= emb.plan[1].start]  # level 1 frozen from then on
    assert all(restore for _, restore in frozen_phase), "weights with frozen entries are restored"
    if name == "subclass":
        assert all(not exempt for exempt, _ in frozen_phase), "a subclass may change the update: restore mode"


def test_decay_only_moves_frozen_weights_so_pruned_only_weights_stay_in_grad_mode():
    seen = []
    _, _, emb = _train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
                       each=lambda i, m, o, e: seen.append((i, _modes(e, o))))
    first = [modes for i, modes in seen if 0 < i < emb.plan[1].start]  # level 1 sparsify: pruned, nothing frozen
    assert first and all(exempt and not restore for exempt, restore in first)


def _moments(opt, emb, n):
    return opt.state[emb.state.params[n]]["exp_avg"]


def test_first_moments_are_zeroed_where_gmp_prunes_and_where_a_level_freezes():
    checked = {"pruned": 0, "frozen": 0}
    box = {}

    def before_update(opt, args, kwargs):  # registered after the embedder's: its work is done
        emb = box["emb"]
        st, plan = emb.state, emb.guard.plans[id(opt)]
        for n in plan.exempt:
            if emb.state.params[n] not in opt.state:
                continue
            m = _bits(_moments(opt, emb, n))
            if st.mask is not None and (~st.mask[n]).any():
                assert not m[~st.mask[n]].any(), n
                checked["pruned"] += 1
            if st.frozen[n].any():
                assert not m[st.frozen[n]].any(), n
                checked["frozen"] += 1

    def each(i, model, opt, emb):
        if i == 0:
            box["emb"] = emb
            opt.register_step_pre_hook(before_update)

    _train(lambda p: torch.optim.Adam(p, lr=1e-2), each=each)
    assert checked["pruned"] and checked["frozen"]


def test_loaded_optimizer_state_is_zeroed_again_before_its_next_step():
    saved = {}

    def each(i, model, opt, emb):
        if i == 2:  # level 1 sparsify, before most pruning: moments everywhere
            saved["sd"] = {"state": {k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                                     for k, v in opt.state_dict()["state"].items()},
                           "param_groups": opt.state_dict()["param_groups"]}
        if i == 21:  # level 2 densify (no mask update follows): the loaded moments are nonzero at frozen entries
            opt.load_state_dict(saved["sd"])
            assert id(opt) in emb.guard.stale

    _train(lambda p: torch.optim.Adam(p, lr=1e-2), each=each)


def test_weight_decay_changed_mid_run_switches_the_mode_and_back():
    seen = []

    def each(i, model, opt, emb):
        seen.append(_modes(emb, opt))
        if i == 13:
            opt.param_groups[0]["weight_decay"] = 0.05
        if i == 17:
            opt.param_groups[0]["weight_decay"] = 0.0

    _train(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), each=each)
    assert not seen[13][1] and seen[14][1] and seen[17][1] and not seen[18][1]


def test_closure_steps_mask_the_gradients_the_closure_computes():
    seen = []
    _train(lambda p: torch.optim.Adam(p, lr=1e-2), closure=True, each=lambda i, m, o, e: seen.append(_modes(e, o)))
    assert all(not restore for _, restore in seen)


def test_a_weight_held_by_two_optimizers_is_restored():
    model = _model()
    a = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    b = torch.optim.SGD(list(model.parameters())[:2], lr=0.05, momentum=0.9)
    emb = LevelEmbedder(model, ELSAConfig(**CFG))
    emb.attach(a)
    emb.attach(b)
    g = torch.Generator().manual_seed(1)
    for _ in range(emb.total_steps):
        x, y = _batch(g)
        a.zero_grad()
        b.zero_grad()
        F.cross_entropy(model(x), y).backward()
        a.step()
        b.step()
        _assert_guarded(emb, {})
        assert "0.weight" not in emb.guard.plans[id(a)].exempt
    emb.finalize()
