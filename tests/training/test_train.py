"""The ELSA training procedure: freezing under SGD and AdamW, bit-exact levels, GMP, BN, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elsa_codec import ELSAError, embed_levels, encode, extract, load_file, prune_gmp, recalibrate_bn, save_file
from elsa_codec.format.bits import bits_view
from elsa_codec.format.structure import mask_structure_ok
from elsa_codec.training.schedule import GMPSchedule

torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def _data(seed=0, n=128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return x, y


def make_train_fn(opt="sgd", *, bs=32, tamper=None):
    x, y = _data()

    def train_fn(model, phase):
        g = torch.Generator().manual_seed(phase.seed or 0)
        if opt == "sgd":
            o = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        else:
            o = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        model.train()
        for i in range(phase.steps):
            idx = torch.randint(0, len(y), (bs,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            o.zero_grad()
            loss.backward()
            o.step()
            if tamper is not None:
                tamper(model, phase, i)

    return train_fn


def _calib():
    x, _ = _data(1)
    return [x[i : i + 32] for i in range(0, len(x), 32)]


def _same_bits(a, b):
    return torch.equal(bits_view(a.detach().contiguous()), bits_view(b.detach().contiguous()))


def _run(opt="sgd", levels=(0.75, 0.5), seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    snaps = {}

    def on_freeze(t, m):
        snaps[t] = copy.deepcopy(m.state_dict())

    kw.setdefault("bn_calibration", _calib())
    res = embed_levels(model, list(levels), make_train_fn(opt), steps=12, densify_steps=8, seed=seed,
                       progress=False, on_freeze=on_freeze, **kw)
    return model, res, snaps


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_frozen_weights_bit_identical_and_levels_bit_exact(opt):
    """Frozen weights never move under SGD+momentum / AdamW+weight decay; extract(level t) is
    bit-for-bit the network frozen at level t (prunable weights and, with freeze_shared, biases
    and BN affine)."""
    model, res, snaps = _run(opt)
    enc = res.encode()
    T = res.num_levels
    assert T == 2 and set(snaps) == {1, 2}
    final = model.state_dict()
    for t in (1, 2):
        lvl = extract(enc, t)
        for name in ("fc1.weight", "fc2.weight"):
            frozen = res.counters[name] <= t
            # the values frozen at level t survive every later phase bit for bit
            assert _same_bits(final[name][frozen], snaps[t][name][frozen])
            # ... and the extracted level is exactly the network that was frozen
            assert _same_bits(lvl[name], snaps[t][name])
        for name in ("fc1.bias", "fc2.bias", "bn.weight", "bn.bias"):
            assert _same_bits(lvl[name], snaps[t][name])
    # training happened: the dense-only weights changed after level 2 froze
    dense_only = res.counters["fc1.weight"] == T + 1
    assert not torch.equal(final["fc1.weight"][dense_only], snaps[2]["fc1.weight"][dense_only])
    # re-encoding the already-encoded model changes nothing
    for name in ("fc1.weight", "fc2.weight"):
        assert _same_bits(enc[name], final[name])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_frozen_prunable_weights_without_freeze_shared(opt):
    model, res, snaps = _run(opt, freeze_shared=False)
    final = model.state_dict()
    for t in (1, 2):
        for name in ("fc1.weight", "fc2.weight"):
            frozen = res.counters[name] <= t
            assert _same_bits(final[name][frozen], snaps[t][name][frozen])
    assert not torch.equal(final["fc1.bias"], snaps[1]["fc1.bias"])  # shared parameters kept training


def test_prune_gmp_keeps_given_frozen_weights_under_adamw():
    torch.manual_seed(0)
    model = Tiny()
    w0 = model.fc1.weight.detach().clone()
    frozen = {"fc1.weight": w0.abs() > w0.abs().flatten().kthvalue(w0.numel() * 9 // 10).values,
              "fc2.weight": torch.zeros(4, 32, dtype=torch.bool)}
    masks = prune_gmp(model, 0.5, make_train_fn("adamw"), steps=10, frozen=frozen, seed=0, progress=False)
    assert _same_bits(model.fc1.weight[frozen["fc1.weight"]], w0[frozen["fc1.weight"]])
    assert bool((masks["fc1.weight"] | ~frozen["fc1.weight"]).all())
    assert (model.fc1.weight[~masks["fc1.weight"]] == 0).all()


def test_two_level_run_roundtrip(tmp_path):
    model, res, _ = _run("sgd")
    assert res.targets == [0.75, 0.5]
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.01)
    assert [h["kind"] for h in res.history] == ["sparsify", "densify", "sparsify", "densify"]
    assert all(h["steps_done"] == h["steps"] for h in res.history)
    enc = encode(model.state_dict(), res.counters, bn_stats=res.bn_stats)
    path = tmp_path / "tiny.safetensors"
    save_file(enc, str(path))
    back = load_file(str(path))
    assert back.num_levels == 2
    for t, target in ((1, 0.75), (2, 0.5)):
        a, b = extract(enc, t), extract(back, t)
        for k in a:
            assert _same_bits(a[k], b[k]) if a[k].is_floating_point() else torch.equal(a[k], b[k])
        zeros = sum(int((a[n] == 0).sum()) for n in ("fc1.weight", "fc2.weight"))
        assert zeros / (32 * 16 + 4 * 32) == pytest.approx(target, abs=0.01)
    fresh = Tiny()
    fresh.load_state_dict(extract(back, "dense"))


def test_per_level_bn_stats_match_recalibration():
    model, res, _ = _run("sgd")
    enc = res.encode()
    assert sorted(res.bn_stats) == [1, 2, 3]
    for t in (1, 2, 3):
        m = Tiny()
        m.load_state_dict(extract(enc, t))
        stats = recalibrate_bn(m, _calib())
        for s in ("running_mean", "running_var"):
            torch.testing.assert_close(stats["bn"][s], res.bn_stats[t]["bn"][s])
    # the model keeps the dense level's statistics
    torch.testing.assert_close(model.bn.running_mean, res.bn_stats[3]["bn"]["running_mean"])
    assert not torch.allclose(res.bn_stats[1]["bn"]["running_var"], res.bn_stats[3]["bn"]["running_var"])


def test_seed_makes_runs_reproducible():
    m1, r1, _ = _run("adamw", seed=3)
    m2, r2, _ = _run("adamw", seed=3)
    for n in r1.counters:
        assert torch.equal(r1.counters[n], r2.counters[n])
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


def test_gmp_schedule_followed_during_training():
    torch.manual_seed(0)
    model = Tiny()
    kept = []

    def record(m, phase, i):
        kept.append(int((m.fc1.weight != 0).sum()))

    sched = GMPSchedule(begin=0.0, end=0.5, updates=5)  # 20 steps: prune after steps 2, 4, 6, 8, 10
    prune_gmp(model, 0.8, make_train_fn("sgd", tamper=record), steps=20, schedule=sched, seed=0, progress=False)
    numel = model.fc1.weight.numel()
    assert sched.update_steps(20) == [2, 4, 6, 8, 10]
    for step in range(1, 21):
        last_update = max([0] + [u for u in sched.update_steps(20) if u <= step])
        s = sched.sparsity(last_update, 20, 0.8)  # cubic: 0.8 - 0.8 * (1 - last_update / 10) ** 3
        assert s == pytest.approx(0.8 - 0.8 * (1 - last_update / 10) ** 3)
        assert kept[step - 1] == round((1 - s) * numel), step
    assert kept[-1] == round(0.2 * numel)


def test_nm_levels():
    model, res, _ = _run("sgd", levels=("1:4", "2:4"))
    assert res.structures == ["1:4", "2:4"]
    for _n, c in res.counters.items():
        assert mask_structure_ok(c <= 1, "1:4") and mask_structure_ok(c <= 2, "2:4")


def test_densify_restore_and_erk_and_global():
    for kw in (dict(densify_init="restore"), dict(sparsifier="erk"), dict(sparsifier="global"),
               dict(structure="block:2x4")):
        _, res, _ = _run("sgd", **kw)
        assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.02), kw


# ---------------------------------------------------------------- bad input
def test_bad_levels_fail_before_anything_changes():
    torch.manual_seed(0)
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    for levels in ([0.5, 0.75], [0.75, 0.75], [1.2], [0.0], [], ["1:4", 0.5], ["1:4", "2:8"]):
        with pytest.raises(ELSAError):
            embed_levels(model, levels, make_train_fn(), steps=2, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_no_prunable_layer():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))
    with pytest.raises(ELSAError, match="no prunable layer"):
        embed_levels(model, [0.5], make_train_fn(), steps=2, progress=False)


def test_target_exceeded_by_frozen_weights():
    torch.manual_seed(0)
    model = Tiny()
    frozen = {"fc1.weight": torch.ones(32, 16, dtype=torch.bool)}
    with pytest.raises(ELSAError, match="fc1.weight.*exceed"):
        prune_gmp(model, 0.5, make_train_fn(), steps=2, frozen=frozen, progress=False)


@pytest.mark.parametrize("when", ["between_steps", "after_last_step"])
def test_train_fn_changing_frozen_weights_is_detected(when):
    torch.manual_seed(0)
    model = Tiny()
    snaps = {}

    def tamper(m, phase, i):
        if phase.kind == "densify" and (i == 1 if when == "between_steps" else i == phase.steps - 1):
            with torch.no_grad():
                m.fc2.weight.mul_(1.5)

    def on_freeze(t, m):
        snaps[t] = m.fc2.weight.detach().clone()

    with pytest.raises(ELSAError, match="fc2.weight"):
        embed_levels(model, [0.75, 0.5], make_train_fn(tamper=tamper), steps=4, densify_steps=4,
                     progress=False, on_freeze=on_freeze, bn_calibration=_calib(), verify="step")
    # nothing lost: the frozen values are back
    frozen = snaps[1] != 0
    assert _same_bits(model.fc2.weight[frozen], snaps[1][frozen])


def test_non_finite_and_bad_dtype():
    model = Tiny().double()
    with pytest.raises(ELSAError, match="fc1.weight"):
        embed_levels(model, [0.5], make_train_fn(), steps=1, progress=False)
    model = Tiny()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ELSAError, match="fc2.weight"):
        embed_levels(model, [0.5], make_train_fn(), steps=1, progress=False)


def test_train_fn_without_optimizer_warns():
    model = Tiny()
    with pytest.warns(UserWarning, match="no torch.optim optimizer step"):
        res = embed_levels(model, [0.5], lambda m, p: None, steps=3, progress=False, bn_calibration=_calib())
    assert res.sparsities == pytest.approx([0.5], abs=0.01)


def test_encode_dtype_bf16_master_weights():
    """float32 training, bfloat16 checkpoint: frozen weights are bf16 values encoded in bf16."""
    model, res, snaps = _run("adamw", encode_dtype=torch.bfloat16)
    enc = res.encode()
    assert enc["fc1.weight"].dtype == torch.bfloat16 and enc["bn.running_var"].dtype == torch.bfloat16
    assert res.bn_stats and enc.bn_stats[1]["bn"]["running_mean"].dtype == torch.bfloat16
    for t in (1, 2):
        lvl = extract(enc, t)
        for name in ("fc1.weight", "fc2.weight", "fc1.bias", "bn.weight"):
            snap = snaps[t][name]
            assert torch.equal(snap.to(torch.bfloat16).float(), snap)  # exactly representable
            assert _same_bits(lvl[name], snap.to(torch.bfloat16))
    with pytest.raises(ELSAError, match="encode_dtype"):
        embed_levels(Tiny(), [0.5], make_train_fn(), steps=1, progress=False, encode_dtype=torch.float64)
