"""The distillation term toward the original network: config, the kept copy, the term, the hooks, resume."""
import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import elsa_codec as ec
from elsa_codec import DistillConfig, ELSAConfig, ELSAError, LevelEmbedder
from elsa_codec.format.bits import bits_view
from elsa_codec.training.distill import distill_term, select_output

sys.path.insert(0, os.path.dirname(__file__))
import elsa_resume_job as job  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:LevelEmbedder.finalize")
CFG = dict(levels=[0.75, 0.5], steps=6, densify_steps=4, final_steps=5, seed=0, select="all")


def _same_bits(a, b):
    return torch.equal(bits_view(a.detach().contiguous()), bits_view(b.detach().contiguous()))


def _kl(s, t, T):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T


# ------------------------------------------------------------------ config and term
@pytest.mark.parametrize("kw, match", [
    (dict(weight=-1.0), "weight"), (dict(weight=float("nan")), "weight"), (dict(temperature=0), "temperature"),
    (dict(loss="l1"), "loss"), (dict(phases="sparsify"), "phases"), (dict(teacher="cache"), "teacher"),
    (dict(teacher="given"), "hooks=False"), (dict(output=3), "output"), (dict(hooks="yes"), "hooks")])
def test_config_refuses_bad_fields(kw, match):
    with pytest.raises(ELSAError, match=match):
        DistillConfig(**kw)


def test_elsa_config_round_trips_the_distill_field():
    cfg = ELSAConfig(levels=[0.5], steps=3, distill=dict(weight=2.0, temperature=3, loss="mse"))
    assert cfg.distill == DistillConfig(weight=2.0, temperature=3.0, loss="mse")
    again = ELSAConfig.from_json(cfg.to_json())
    assert again.distill == cfg.distill and not cfg.diff(again)
    with pytest.raises(ELSAError, match="ELSAConfig.distill"):
        ELSAConfig(levels=[0.5], steps=3, distill=dict(wieght=1.0))
    with pytest.raises(ELSAError, match="ELSAConfig.distill"):
        ELSAConfig(levels=[0.5], steps=3, distill=1.0)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 7), classes=st.sampled_from([2, 5, 63]), T=st.sampled_from([1.0, 2.0, 4.0]))
def test_kl_term_is_the_temperature_scaled_kl(rows, classes, T):
    g = torch.Generator().manual_seed(rows * 100 + classes)
    s, t = torch.randn(rows, 3, classes, generator=g), torch.randn(rows, 3, classes, generator=g)
    got = distill_term(s, t, DistillConfig(weight=0.5, temperature=T))
    want = 0.5 * _kl(s.reshape(-1, classes), t.reshape(-1, classes), T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(distill_term(t, t, DistillConfig(temperature=T))) == pytest.approx(0.0, abs=1e-6)


def test_mse_cosine_terms_and_shape_error():
    s, t = torch.randn(4, 123), torch.randn(4, 123)
    torch.testing.assert_close(distill_term(s, t, DistillConfig(loss="mse")), F.mse_loss(s, t))
    torch.testing.assert_close(distill_term(s, t, DistillConfig(loss="cosine")),
                               (1 - F.cosine_similarity(s, t, dim=-1)).mean())
    with pytest.raises(ELSAError, match=r"shape \(4, 123\).*\(4, 63\)"):
        distill_term(s, t[:, :63], DistillConfig())


def test_select_output_fields():
    x = torch.ones(2)
    assert select_output(x, None) == (x, None)
    assert select_output((x, 3), None) == (x, 0)
    assert select_output({"loss": x * 2, "logits": x}, None) == (x, "logits")
    assert select_output({"last_hidden_state": x}, None) == (x, "last_hidden_state")
    with pytest.raises(ELSAError, match=r"fields \['hidden'\].*output='<field>'"):
        select_output({"hidden": x}, None)
    with pytest.raises(ELSAError, match="'pooler'"):
        select_output({"logits": x}, "pooler")


# ------------------------------------------------------------------ own loop, explicit term
def _loop(emb, model, opt, steps, *, extra=None):
    x, y = job.data()
    for step in range(steps):
        xb, yb = job.batch(step, x, y)
        out = model(xb)
        loss = F.cross_entropy(out, yb) + (extra(out, xb) if extra is not None else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_explicit_term_is_zero_outside_densify_and_the_kl_to_the_original_inside():
    torch.manual_seed(0)
    model = job.MLP()
    original = copy.deepcopy(model).eval()
    emb = LevelEmbedder(model, ELSAConfig(**CFG, distill=DistillConfig(temperature=2.0, hooks=False)))
    assert emb.teacher is not None and emb.teacher.nbytes == sum(
        t.numel() * t.element_size() for t in original.state_dict().values())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    emb.attach(opt)
    x, _ = job.data()
    seen = []

    def term(out, xb):
        t = emb.distill_loss(out, xb)
        if emb.distilling:
            with torch.no_grad():
                want = _kl(out, original(xb), 2.0)
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(emb.teacher_outputs(xb), original(xb), rtol=0, atol=0)
        else:
            assert float(t) == 0.0 and not t.requires_grad
        seen.append((emb.phase.kind, emb.distilling))
        return t

    _loop(emb, model, opt, emb.total_steps, extra=term)
    assert ("sparsify", False) in seen and ("densify", True) in seen and ("sparsify", True) not in seen
    assert model.training  # the original ran in eval mode; the student's modes came back
    emb.finalize()
    with pytest.raises(ELSAError, match="has no distill"):
        LevelEmbedder(job.MLP(), ELSAConfig(**CFG)).distill_loss(model(x))


def test_given_teacher_outputs_and_no_copy():
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(**{**CFG, "steps": 0}, distill=DistillConfig(teacher="given", hooks=False)))
    emb._ensure_started()
    assert emb.teacher is None and emb.distilling
    x = torch.randn(8, 16)
    out = model(x)
    with pytest.raises(ELSAError, match="teacher=<the original"):
        emb.distill_loss(out, x)
    with pytest.raises(ELSAError, match="keeps no copy"):
        emb.teacher_outputs(x)
    torch.testing.assert_close(emb.distill_loss(out, teacher=out.detach() * 2), _kl(out, out.detach() * 2, 1.0))


# ------------------------------------------------------------------ hooks
def test_hooked_gradient_equals_the_explicit_term_gradient():
    torch.manual_seed(0)
    a = job.MLP()
    b = copy.deepcopy(a)
    cfg = dict(CFG, steps=0, densify_steps=0)
    ea = LevelEmbedder(a, ELSAConfig(**cfg, distill=DistillConfig(weight=0.7, temperature=2.0)))
    eb = LevelEmbedder(b, ELSAConfig(**cfg, distill=DistillConfig(weight=0.7, temperature=2.0, hooks=False)))
    ea._ensure_started(), eb._ensure_started()
    assert ea.phase.final and ea.distilling
    x, y = job.data()
    with torch.no_grad():  # move the students off the original, so the term is not zero
        for p, q in zip(a.parameters(), b.parameters()):
            p.mul_(0.9), q.mul_(0.9)
    F.cross_entropy(a(x[:32]), y[:32]).backward()
    out = b(x[:32])
    (F.cross_entropy(out, y[:32]) + eb.distill_loss(out, x[:32])).backward()
    assert ea._distill_hooks.calls == 1 and float(ea._distill_hooks.last) > 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():
        a(x)  # evaluation adds nothing
    assert ea._distill_hooks.calls == 1
    with pytest.raises(ELSAError, match="hooks=False"):
        ea.distill_loss(a(x), x)


def test_hooks_keep_every_level_bit_for_bit_and_come_off_at_finalize():
    torch.manual_seed(0)
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(**CFG, distill=DistillConfig(weight=2.0)))
    snaps = {}
    emb.on_freeze = lambda t, m: snaps.setdefault(t, copy.deepcopy(m.state_dict()))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    emb.attach(opt)
    _loop(emb, model, opt, emb.total_steps)
    res = emb.finalize()
    sd = model.state_dict()
    for t in (1, 2):
        for n, c in res.counters.items():
            assert _same_bits(sd[n][c <= t], snaps[t][n][c <= t]), (n, t)
    assert not model._forward_hooks


def test_warns_when_the_hooked_module_never_runs():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = job.MLP()

        def forward(self, x):
            return self.net(x)

    x, y = job.data()

    def run(through_wrapper):
        w = Wrapper()
        emb = LevelEmbedder(w, ELSAConfig(**{**CFG, "steps": 1}, distill=DistillConfig()))
        opt = torch.optim.SGD(w.parameters(), lr=1e-2)
        emb.attach(opt)
        for _ in range(1 + CFG["densify_steps"]):  # level 1 sparsify (1 step), then its densify phase
            F.cross_entropy((w if through_wrapper else w.net)(x[:8]), y[:8]).backward()
            opt.step()
            opt.zero_grad()
        assert emb.phase.kind == "sparsify" and emb.phase.level == 2

    with pytest.warns(UserWarning, match="level 1 densify: the distillation term was never added"):
        run(through_wrapper=False)  # the loop bypasses the module given to ELSA
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(through_wrapper=True)


def test_hf_model_output_loss_gets_the_term():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(cfg)
    original = copy.deepcopy(model).eval()
    emb = LevelEmbedder(model, ELSAConfig(levels=[0.5], steps=0, final_steps=3, distill=DistillConfig()))
    emb._ensure_started()
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    ids, labels = torch.randint(1, 64, (4, 10)), torch.tensor([0, 1, 2, 1])
    out = model(input_ids=ids, labels=labels)
    plain = F.cross_entropy(out.logits, labels)
    with torch.no_grad():
        t = original(input_ids=ids).logits
    torch.testing.assert_close(out.loss, plain + _kl(out.logits, t, 1.0), rtol=1e-5, atol=1e-6)
    assert model.training


# ------------------------------------------------------------------ resume
def test_resume_restores_the_original_copy_bit_for_bit():
    cfg = ELSAConfig(**CFG, distill=DistillConfig(weight=1.0))
    torch.manual_seed(0)
    ref = job.MLP()
    er = LevelEmbedder(ref, cfg)
    o = torch.optim.Adam(ref.parameters(), lr=1e-2)
    er.attach(o)
    _loop(er, ref, o, 12)
    sd, opt_sd, model_sd = er.state_dict(), copy.deepcopy(o.state_dict()), copy.deepcopy(ref.state_dict())
    assert set(sd["teacher"]) == set(model_sd)
    x, y = job.data()

    def finish(model, emb, opt):
        for step in range(12, emb.total_steps):
            xb, yb = job.batch(step, x, y)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return emb.finalize()

    finish(ref, er, o)
    again = job.MLP()
    again.load_state_dict(model_sd)  # the resumed model is no longer the original
    ea = LevelEmbedder(again, cfg)
    oa = torch.optim.Adam(again.parameters(), lr=1e-2)
    oa.load_state_dict(opt_sd)
    ea.load_state_dict(sd)
    ea.attach(oa)
    finish(again, ea, oa)
    for (n, p), q in zip(ref.state_dict().items(), again.state_dict().values()):
        assert _same_bits(p, q) if p.is_floating_point() else torch.equal(p, q), n
    broken = LevelEmbedder(job.MLP(), cfg)
    with pytest.raises(ELSAError, match="no copy of the original"):
        broken.load_state_dict({**sd, "teacher": None})


def test_embed_levels_adds_the_term_through_the_hooks():
    torch.manual_seed(0)
    model = job.MLP()
    x, y = job.data()
    seen = []

    def train_fn(m, phase):
        opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
        for step in range(phase.steps):
            xb, yb = job.batch(step, x, y)
            out = m(xb)
            F.cross_entropy(out, yb).backward()
            opt.step()
            opt.zero_grad()

    res = ec.embed_levels(model, [0.75, 0.5], train_fn, steps=4, densify_steps=3, final_steps=3, seed=0,
                          distill=DistillConfig(), progress=False, on_phase_end=lambda ph, m: seen.append(ph.name))
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.03) and not model._forward_hooks
    assert res.config["distill"]["weight"] == 1.0


@pytest.mark.parametrize("kind", ["tensor", "tuple", "namedtuple", "dict"])
def test_hooks_inject_the_gradient_into_every_output_kind(kind):
    import collections

    Out = collections.namedtuple("Out", "logits aux")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            y = self.fc(x)
            return {"tensor": lambda: y, "tuple": lambda: (y, 1), "namedtuple": lambda: Out(y, 1),
                    "dict": lambda: {"logits": y}}[kind]()

    torch.manual_seed(0)
    net = Net()
    emb = LevelEmbedder(net, ELSAConfig(levels=[0.5], steps=0, final_steps=2, select="all", distill=DistillConfig()))
    emb._ensure_started()
    with torch.no_grad():
        net.fc.weight.mul_(2.0)
    x = torch.randn(4, 6)
    out = net(x)
    y = select_output(out, None)[0]
    assert type(out).__name__ == {"tensor": "Tensor", "tuple": "tuple", "namedtuple": "Out", "dict": "dict"}[kind]
    y.sum().backward()
    want = torch.autograd.grad(
        nn.functional.linear(x, net.fc.weight).sum() + net.fc.bias.sum() * 0 + _kl(
            nn.functional.linear(x, net.fc.weight, net.fc.bias), emb.teacher_outputs(x) if kind == "tensor" else
            select_output(emb.teacher_outputs(x), None)[0], 1.0), net.fc.weight)[0]
    torch.testing.assert_close(net.fc.weight.grad, want, rtol=1e-5, atol=1e-6)
