"""The end-to-end pruning pipeline (arXiv 2312.01653) as an ELSA sparsifier: ZerO initialisation,
the learned mask, mask-guided pruning, and the post-pruning stages; each gone when its phase ends."""
import copy

import pytest
import torch
import torch.nn.functional as F
from test_gated_sparsifiers import _plain as _plain_weights
from test_train import Tiny, _calib, _data, _same_bits
from torch import nn
from torch.nn.utils import parametrize

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.training.sparsifiers.pipeline import STAGES, LearnedMask
from elsa_codec.training.sparsifiers.soft_training import SoftStages, skip_eligible
from elsa_codec.training.sparsifiers.zero_init import hadamard, zero_matrix


class ReluNet(nn.Module):
    """Tiny's layers with an ``nn.ReLU`` module (in place), which soft activations can reach."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.fc2(self.act(self.bn(self.fc1(x))))


def pipeline_train_fn(record=None, fail_at=None):
    """A user's train_fn: label smoothing and the sparsity penalty from the pipeline, optimizer per phase."""
    x, y = _data()

    def train_fn(model, phase):
        g = torch.Generator().manual_seed(phase.seed or 0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for i in range(phase.steps):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("train_fn failed")
            idx = torch.randint(0, len(y), (32,), generator=g)
            smoothing = ec.label_smoothing(model)
            if record is not None:  # what this step trains with
                record.append((smoothing, sum(len(m._forward_hooks) for m in model.modules()),
                               any(parametrize.is_parametrized(m) for m in model.modules())))
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=smoothing) + ec.sparsity_penalty(model)
            opt.zero_grad()
            loss.backward()
            opt.step()

    return train_fn


def _plain(model):
    """Plain weights (no parametrization), no hooks, no label smoothing."""
    return _plain_weights(model) and not any(m._forward_hooks for m in model.modules()) and \
        ec.label_smoothing(model) == 0.0


# ----------------------------------------------------------------------------- stage 1: ZerO
@pytest.mark.parametrize("out,inp", [(4, 4), (3, 7), (63, 123), (123, 63), (16, 1), (10, 256)],
                         ids=["square", "narrow", "63x123", "123x63", "16x1", "10x256"])
def test_zero_matrix(out, inp):
    w = zero_matrix(out, inp)
    assert w.shape == (out, inp) and w.dtype == torch.float32
    if out <= inp:
        assert torch.equal(w, torch.eye(out, inp))  # (partial) identity
    else:
        m = max(1, (out - 1).bit_length())
        c = 2.0 ** (-(m - 1) / 2)
        assert torch.equal(w, hadamard(m)[:out, :inp] * c)
        assert torch.unique(w.abs()).numel() == 1  # every entry +c or -c


def test_hadamard_is_orthogonal():
    for m in range(5):
        h = hadamard(m)
        assert torch.equal(h @ h.t(), (2 ** m) * torch.eye(2 ** m))


def test_zero_init_linear_and_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4, 5))
    bn = copy.deepcopy(net[1].state_dict())
    names = ec.zero_init_(net)
    assert names == ["0", "3"]
    w = net[0].weight
    assert torch.equal(w[:, :, 1, 1], zero_matrix(8, 3)) and not w[:, :, 0].any() and not w[:, :, :, 2].any()
    assert not net[0].bias.any() and not net[3].bias.any()
    assert torch.equal(net[3].weight, zero_matrix(5, 32))
    assert all(torch.equal(v, bn[k]) for k, v in net[1].state_dict().items())  # norms untouched
    again = copy.deepcopy(net)
    ec.zero_init_(again)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


def test_zero_init_filter_and_refusal():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    before = net[2].weight.detach().clone()
    assert ec.zero_init_(net, lambda m, fqn: fqn == "0") == ["0"]
    assert torch.equal(net[2].weight, before)
    with pytest.raises(ELSAError, match=r"1 is a ReLU"):
        ec.zero_init_(net, lambda m, fqn: fqn == "1")


def test_pipeline_initialize_follows_the_stage():
    torch.manual_seed(0)
    a, b = ReluNet(), ReluNet()
    b.load_state_dict(a.state_dict())
    assert ec.PruningPipeline().initialize_(a) == ["fc1", "fc2"]
    assert torch.equal(a.fc1.weight, zero_matrix(32, 16))
    before = copy.deepcopy(b.state_dict())
    assert ec.PruningPipeline(zero_init=False).initialize_(b) == []
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


# ----------------------------------------------------------------------------- stage 4 pieces
def test_soft_stages_scale_with_alpha_and_remove_cleanly():
    torch.manual_seed(0)
    net = ReluNet().eval()
    x = torch.randn(5, 16)
    want = net(x)
    soft = SoftStages(net, activations=True, skip_modules=[net.fc1, net.fc2], skip=0.5, smoothing=0.2)
    assert not net.act.inplace and ec.label_smoothing(net) == pytest.approx(0.2)
    with torch.no_grad():  # the modules now carry the hooks: the expected value from F.linear
        h = net.bn(F.linear(x, net.fc1.weight, net.fc1.bias) + 0.5 * F.pad(x, (0, 16)))
        h = F.silu(h)  # alpha = 1: Swish
        torch.testing.assert_close(net(x), F.linear(h, net.fc2.weight, net.fc2.bias) + 0.5 * h[:, :4],
                                   rtol=0, atol=1e-6)
    soft.alpha = 0.0
    assert torch.equal(net(x), want) and ec.label_smoothing(net) == 0.0
    soft.alpha = 0.5
    assert not torch.equal(net(x), want) and ec.label_smoothing(net) == pytest.approx(0.1)
    soft.remove()
    soft.remove()  # idempotent
    assert net.act.inplace and torch.equal(net(x), want) and _plain(net)


@pytest.mark.parametrize("mod,ok", [(nn.Linear(3, 5), True), (nn.Conv2d(2, 4, 3, padding=1), True),
                                    (nn.Conv2d(2, 4, 3, padding="same"), True), (nn.Conv2d(2, 4, 3), False),
                                    (nn.Conv2d(2, 4, 3, padding=1, stride=2), False),
                                    (nn.Conv2d(4, 4, 3, padding=1, groups=2), False),
                                    (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), False),
                                    (nn.Conv1d(2, 4, 5, padding=2), True)],
                         ids=["linear", "conv-same", "conv-same-str", "conv-valid", "conv-stride", "conv-groups",
                              "conv-reflect", "conv1d"])
def test_skip_eligible(mod, ok):
    assert skip_eligible(mod) is ok


def test_soft_skip_pads_and_cuts_channels():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 5, 5)
    want = conv(x)
    soft = SoftStages(conv, activations=False, skip_modules=[conv], skip=1.0)
    got = conv(x)
    assert torch.equal(got[:, :2], want[:, :2] + x) and torch.equal(got[:, 2], want[:, 2])
    soft.remove()


# ----------------------------------------------------------------------------- the phase
def test_prune_gmp_schedule_exact_target_and_plain_model():
    torch.manual_seed(0)
    model, rec = ReluNet(), []
    keys = list(model.state_dict())
    sp = ec.PruningPipeline("global")
    masks = ec.prune_gmp(model, 0.9, pipeline_train_fn(rec), steps=40, seed=0, progress=False, sparsifier=sp)
    assert _plain(model) and list(model.state_dict()) == keys
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)  # exact over the layers
    assert all(not model.get_parameter(n)[~m].any() for n, m in masks.items())
    # steps 1-20: the learned mask (parametrized, no hooks, no smoothing); 21-30: stage 4 annealing; then plain
    assert all(r[2] and r[1] == 0 and r[0] == 0.0 for r in rec[:20])
    assert rec[20][0] == pytest.approx(0.1) and rec[20][1] == 3 and not rec[20][2]  # ReLU + 2 skips
    smooth = [r[0] for r in rec[20:30]]
    assert smooth == sorted(smooth, reverse=True) and smooth[-1] > 0.0
    assert all(r == (0.0, 0, False) for r in rec[30:])
    assert sp.history == [dict(target=0.9, steps=40, pruned_at=20, anneal_steps=10, skips=2, activations=1)]


def test_learned_mask_folds_and_guides_the_ranking():
    """A score at 0 gives the mask sigmoid(0) / sigmoid(3): its row is scaled by that and kept;
    closed scores rank their row last, so it is the one pruned."""
    torch.manual_seed(0)
    model = ReluNet()
    sp = ec.PruningPipeline("global", mask_strength=0.0, soft_activations=False, soft_skips=False,
                            label_smoothing=0.0)
    before = model.fc1.weight.detach().clone()

    def set_scores(m, phase):
        lm = m.fc1.parametrizations.weight[0]
        assert isinstance(lm, LearnedMask)
        assert torch.equal(lm.mask()[~lm.frozen], torch.ones(int((~lm.frozen).sum())))  # starts at exactly 1
        with torch.no_grad():
            lm.scores[0].fill_(-50.0)
            lm.scores[1].fill_(0.0)

    with pytest.warns(UserWarning):  # no optimizer step ran
        ec.prune_gmp(model, 16 / (16 * 32 + 32 * 4), set_scores, steps=1, progress=False, sparsifier=sp)
    assert not model.fc1.weight[0].any()
    s0 = torch.sigmoid(torch.tensor(3.0))
    torch.testing.assert_close(model.fc1.weight[1], before[1] * (0.5 / s0), rtol=1e-6, atol=0)
    assert torch.equal(model.fc1.weight[2:], before[2:])
    assert _plain(model)


def test_erk_distribution_by_default():
    torch.manual_seed(0)
    model = ReluNet()
    masks = ec.prune_gmp(model, 0.9, pipeline_train_fn(), steps=20, seed=0, progress=False,
                         sparsifier=ec.PruningPipeline())
    want = ec.erk_densities({n: tuple(m.shape) for n, m in masks.items()}, 0.1)
    for n, m in masks.items():
        assert int(m.sum()) == round(want[n] * m.numel()), n


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_turns_off(stage):
    torch.manual_seed(0)
    model, rec = ReluNet(), []
    sp = ec.PruningPipeline("global", **{stage: 0.0 if stage == "label_smoothing" else False})
    ec.prune_gmp(model, 0.8, pipeline_train_fn(rec), steps=20, seed=0, progress=False, sparsifier=sp)
    assert _plain(model)
    h = sp.history[0]
    if stage == "learned_mask":
        assert not sp.adds_parameters and not any(r[2] for r in rec)
    if stage == "label_smoothing":
        assert all(r[0] == 0.0 for r in rec)
    if stage == "soft_activations":
        assert h["activations"] == 0 and h["skips"] == 2
    if stage == "soft_skips":
        assert h["skips"] == 0 and h["activations"] == 1
    assert (stage in ("label_smoothing", "soft_activations", "soft_skips")) or max(r[0] for r in rec) > 0


def test_elsa_levels_nested_frozen_untouched_and_the_file_loads(tmp_path):
    torch.manual_seed(0)
    model, snaps = ReluNet(), {}
    sp = ec.PruningPipeline()
    sp.initialize_(model)
    res = ec.embed_levels(model, [0.9, 0.6], pipeline_train_fn(), steps=20, densify_steps=8, seed=0,
                          progress=False, sparsifier=sp, bn_calibration=_calib(),
                          on_freeze=lambda t, m: snaps.__setitem__(t, copy.deepcopy(m.state_dict())))
    assert _plain(model) and type(model.act) is nn.ReLU and model.act.inplace
    assert [round(s, 3) for s in res.sparsities] == [0.9, 0.6]
    enc = res.encode()
    m1 = {n: ec.extract(enc, 1)[n] != 0 for n in res.counters}
    m2 = {n: ec.extract(enc, 2)[n] != 0 for n in res.counters}
    assert all(not (m1[n] & ~m2[n]).any() for n in m1)  # nested
    for t in (1, 2):
        plain = ec.extract(enc, t)
        assert all(_same_bits(plain[n], snaps[t][n]) for n in res.counters)  # frozen weights never moved
    path = str(tmp_path / "pipe.elsa.safetensors")
    res.save(path)
    served = ec.load(path, ReluNet().eval())  # the original architecture
    x, _ = _data(2, 8)
    for t in (1, 2):
        ec.set_level(served, t)
        ref = ReluNet().eval()
        ref.load_state_dict(ec.extract(enc, t))
        with torch.no_grad():
            torch.testing.assert_close(served(x), ref(x), rtol=1e-5, atol=1e-5)


def test_train_fn_failing_after_pruning_removes_everything():
    torch.manual_seed(0)
    model = ReluNet()
    with pytest.raises(RuntimeError, match="train_fn failed"):
        ec.prune_gmp(model, 0.8, pipeline_train_fn(fail_at=15), steps=20, progress=False,
                     sparsifier=ec.PruningPipeline())
    assert _plain(model) and model.act.inplace


def test_reproducible():
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = ReluNet()
        ec.prune_gmp(model, 0.9, pipeline_train_fn(), steps=20, seed=3, progress=False,
                     sparsifier=ec.PruningPipeline())
        outs.append(model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_refusals():
    torch.manual_seed(0)
    with pytest.raises(ELSAError, match="nn.ReLU modules"):  # Tiny uses F.relu
        ec.prune_gmp(Tiny(), 0.8, pipeline_train_fn(), steps=4, progress=False, sparsifier=ec.PruningPipeline())
    model = Tiny()
    ec.prune_gmp(model, 0.8, pipeline_train_fn(), steps=4, progress=False,
                 sparsifier=ec.PruningPipeline(soft_activations=False))
    assert _plain(model)
    for sp in (ec.PruningPipeline(), ec.PruningPipeline(learned_mask=False)):
        with pytest.raises(ELSAError, match="unstructured"):
            ec.prune_gmp(ReluNet(), "2:4", pipeline_train_fn(), steps=4, progress=False, sparsifier=sp)


@pytest.mark.parametrize("kw,match", [(dict(label_smoothing=1.0), "label_smoothing"),
                                      (dict(mask_fraction=0.0), "mask_fraction"),
                                      (dict(anneal_fraction=1.5), "anneal_fraction"),
                                      (dict(mask_scale=0.0), "mask_scale"), (dict(skip=-1.0), "skip"),
                                      (dict(mask_strength=-1.0), "strength"),
                                      (dict(mask_init=float("nan")), "init"),
                                      (dict(pruning="random"), "pruning"), (dict(distribution="foo"), "distribution")],
                         ids=["smoothing", "fraction", "anneal", "scale", "skip", "strength", "init", "pruning",
                              "distribution"])
def test_bad_arguments(kw, match):
    with pytest.raises(ELSAError, match=match):
        ec.PruningPipeline(**kw)


@pytest.mark.parametrize("pruning", ["gradual", "one-shot"])
def test_pruning_gradual_or_at_once(pruning):
    """Gradual: the zeros grow along the GMP ramp scaled to stage 2 (10 updates, one per step for a
    stage of 20 steps); one-shot: none until stage 2 ends (step 20)."""
    torch.manual_seed(0)
    model, zeros = ReluNet(), []
    x, y = _data()

    def train_fn(m, phase):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _i in range(phase.steps):
            w = m.fc1.parametrizations.weight.original if parametrize.is_parametrized(m.fc1) else m.fc1.weight
            zeros.append(int((w == 0).sum()))  # before step i + 1
            loss = F.cross_entropy(m(x[:32]), y[:32]) + ec.sparsity_penalty(m)
            opt.zero_grad()
            loss.backward()
            opt.step()

    ec.prune_gmp(model, 0.9, train_fn, steps=40, seed=0, progress=False,
                 sparsifier=ec.PruningPipeline("uniform", pruning=pruning))
    final = int((model.fc1.weight == 0).sum())
    assert final == round(0.9 * 512) and zeros[0] == 0
    if pruning == "one-shot":
        assert max(zeros[:20]) == 0 and zeros[20] == final
    else:
        assert 0 < zeros[1] < zeros[5] < final and zeros[10] == final
