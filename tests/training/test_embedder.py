"""LevelEmbedder in the user's own loop: plan, levels, frozen bits, resume, short runs, two optimizers."""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAConfig, ELSAError, LevelEmbedder
from elsa_codec.format.bits import bits_view

sys.path.insert(0, os.path.dirname(__file__))
import elsa_resume_job as job  # noqa: E402

torch.set_num_threads(1)


def _same_bits(a, b):
    return torch.equal(bits_view(a.detach().contiguous()), bits_view(b.detach().contiguous()))


def _run(config=None, *, stop=None, tamper=None):
    """The job's run in this process; returns (model, embedder, snapshots at each freeze)."""
    model, emb, opt, sched = job.setup(config)
    snaps = {}
    emb.on_freeze = lambda t, m: snaps.setdefault(t, copy.deepcopy(m.state_dict()))
    emb.attach(opt)
    job.train(model, emb, opt, sched, 0, emb.total_steps if stop is None else stop)
    return model, emb, snaps


def test_plan_total_steps_and_phase_ranges():
    cfg = ELSAConfig(levels=[0.9, 0.75, 0.5], steps=10, densify_steps=4, final_steps=7)
    assert cfg.total_steps == 3 * 10 + 2 * 4 + 7
    emb = LevelEmbedder(job.MLP(), cfg)
    assert emb.total_steps == cfg.total_steps
    assert [(p.kind, p.level, p.start, p.end, p.final) for p in emb.plan] == [
        ("sparsify", 1, 0, 10, False), ("densify", 1, 10, 14, False), ("sparsify", 2, 14, 24, False),
        ("densify", 2, 24, 28, False), ("sparsify", 3, 28, 38, False), ("densify", 3, 38, 45, True)]
    assert emb.phase is emb.plan[0] and emb.step == 0


def test_own_loop_levels_frozen_bits_and_served_file(tmp_path):
    model, emb, snaps = _run()
    assert emb.done and emb.step == emb.total_steps
    assert [h["steps_done"] for h in emb.history] == [p.steps for p in emb.plan]
    x, _ = job.data()
    res = emb.finalize(bn_calibration=[x[i:i + 64] for i in range(0, 256, 64)])
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.01)
    final = model.state_dict()
    for t in (1, 2):
        for n in ("fc1.weight", "fc2.weight"):
            frozen = res.counters[n] <= t
            assert _same_bits(final[n][frozen], snaps[t][n][frozen]), (n, t)
    for n in ("fc1.bias", "bn.weight"):
        assert _same_bits(final[n], snaps[1][n])  # freeze_shared
    path = str(tmp_path / "m.safetensors")
    ec.save_file(res.encode(), path)
    enc = ec.load_file(path)
    assert enc.meta.training["levels"] == [0.75, 0.5] and enc.meta.training["seed"] == 5
    served = ec.load(path, job.MLP()).eval()
    plain = job.MLP().eval()
    for t in (1, 2, 3):
        ec.set_level(served, t)
        plain.load_state_dict(ec.extract(enc, t))
        with torch.no_grad():
            torch.testing.assert_close(served(x), plain(x), rtol=1e-5, atol=1e-6)  # CPU sparse kernels: other summation order


def test_no_global_rng_draw_during_the_run():
    model, emb, opt, sched = job.setup()
    emb.attach(opt)
    state = torch.random.get_rng_state()
    job.train(model, emb, opt, sched, 0, emb.total_steps)
    x, _ = job.data()
    emb.finalize(bn_calibration=[x[:64]])
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("stop", [4, 10], ids=["inside-sparsify", "freeze-boundary"])
def test_resume_in_a_new_process_is_bit_exact(tmp_path, stop):
    ref = tmp_path / "ref"
    ref.mkdir()
    model, emb, _ = _run()
    job.finish(model, emb, str(ref))
    out = tmp_path / "resumed"
    out.mkdir()
    model, emb, opt, sched = job.setup()
    emb.attach(opt)
    job.train(model, emb, opt, sched, 0, stop)
    if stop == 4:
        assert emb.phase.kind == "sparsify" and emb._before is not None  # mid-ramp, densify_init snapshot held
    else:
        assert emb.phase.kind == "densify" and bool((emb.counters["fc1.weight"] == 1).any())
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "elsa": emb.state_dict()}, out / "ckpt.pt")
    script = os.path.join(os.path.dirname(__file__), "elsa_resume_job.py")
    r = subprocess.run([sys.executable, script, str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = torch.load(ref / "counters.pt"), torch.load(out / "counters.pt")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    # the same file bit for bit: every tensor's bits and the metadata document (the safetensors
    # header's key order is not fixed across processes, so the raw bytes are not compared)
    fa, fb = ec.load_file(str(ref / "elsa.safetensors")), ec.load_file(str(out / "elsa.safetensors"))
    assert fa.meta.to_json() == fb.meta.to_json() and list(fa) == list(fb)
    assert all(torch.equal(fa[k].reshape(-1).view(torch.uint8), fb[k].reshape(-1).view(torch.uint8)) for k in fa)
    assert all(torch.equal(fa.bn_stats[t]["bn"][s], fb.bn_stats[t]["bn"][s]) for t in (1, 2, 3)
               for s in ("running_mean", "running_var"))


def test_state_dict_refuses_another_config():
    model, emb, _ = _run(stop=3)
    other = LevelEmbedder(job.MLP(), ELSAConfig(**{**job.CONFIG, "steps": 11}))
    with pytest.raises(ELSAError, match="fields steps"):
        other.load_state_dict(emb.state_dict())


def test_finalize_early_warns_or_raises_naming_phases_and_missing_steps():
    model, emb, _ = _run(stop=13)
    with pytest.warns(UserWarning, match=r"finalize: 21 of the plan's 34 .*level 1 densify 3/6.*dense training 0/8"):
        res = emb.finalize()
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.01)  # levels still at their targets
    _, emb, _ = _run(ELSAConfig(**job.CONFIG, on_short="raise"), stop=13)
    with pytest.raises(ELSAError, match="21 of the plan's 34 optimizer steps are missing"):
        emb.finalize()


def test_end_phase_early_names_the_phase():
    _, emb, _ = _run(stop=3)
    with pytest.warns(UserWarning, match=r"level 1 sparsify -> 75.0% \(phase 0\) ran 3 of 10 optimizer steps \(7 missing\)"):
        ph = emb.end_phase()
    assert ph.kind == "sparsify" and emb.phase.kind == "densify"


def test_two_optimizers():
    torch.manual_seed(0)
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(**job.CONFIG))
    o1 = torch.optim.AdamW([model.fc1.weight, model.fc1.bias], lr=1e-2)
    o2 = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("fc1.")], lr=0.05, momentum=0.9)
    emb.attach(o1).attach(o2)
    x, y = job.data()
    for step in range(emb.total_steps):
        xb, yb = job.batch(step, x, y)
        F.cross_entropy(model(xb), yb).backward()
        o1.step()
        assert emb.step == step  # the run advances once both optimizers stepped
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
    assert emb.done and emb.step == emb.total_steps
    res = emb.finalize(bn_calibration=[x[:64]])
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.01)
    for n in ("fc1.weight", "fc2.weight"):
        assert (model.get_parameter(n)[res.counters[n] <= 2] != 0).any()


def test_attach_errors_and_detach():
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(**job.CONFIG))
    with pytest.raises(ELSAError, match="holds no parameter of the model"):
        emb.attach(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))
    with pytest.raises(ELSAError, match="torch.optim.Optimizer"):
        emb.attach(object())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    emb.attach(opt)
    emb.detach()
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert emb.step == 0


def test_verify_modes_catch_writes_to_frozen_weights():
    # "step": caught before the next optimizer step
    model, emb, opt, sched = job.setup(ELSAConfig(**job.CONFIG, verify="step"))
    emb.attach(opt)
    job.train(model, emb, opt, sched, 0, 12)
    with torch.no_grad():
        model.fc2.weight.mul_(1.5)
    with pytest.raises(ELSAError, match="fc2.weight: .* frozen weights were changed between optimizer steps"):
        job.train(model, emb, opt, sched, 12, 13)
    # "phase_end" (default): caught at the phase end or at finalize; the values come back
    _, emb, _ = _run()
    w = emb.model.fc1.weight
    frozen = emb.counters["fc1.weight"] <= 1
    keep = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(ELSAError, match="fc1.weight"):
        emb.finalize()
    assert _same_bits(w[frozen], keep[frozen])


def test_config_validation_names_the_field_and_json_roundtrip():
    for bad, field in ((dict(steps=-1), "steps"), (dict(densify_init="ones"), "densify_init"),
                       (dict(verify="always"), "verify"), (dict(select="heads"), "select"),
                       (dict(sparsifier="lottery"), "sparsifier"), (dict(encode_dtype="float64"), "encode_dtype"),
                       (dict(levels=[0.5, 0.75]), "levels"), (dict(code_bits=0), "code_bits"),
                       (dict(filter_fn="fc1"), "filter_fn"), (dict(on_short="ignore"), "on_short")):
        with pytest.raises(ELSAError, match=f"ELSAConfig.{field}"):
            ELSAConfig(**{**job.CONFIG, **bad})
    cfg = ELSAConfig(**job.CONFIG, encode_dtype="bfloat16", structure="block:2x4")
    assert cfg.encode_dtype == torch.bfloat16
    back = ELSAConfig.from_json(cfg.to_json())
    assert back == cfg and back.diff(cfg) == []
    custom = ELSAConfig(**{**job.CONFIG, "sparsifier": lambda n, w, f, t: f | True})
    with pytest.raises(ELSAError, match="ELSAConfig.sparsifier was the custom object"):
        ELSAConfig.from_json(custom.to_json())
    assert ELSAConfig.from_json(custom.to_json(), sparsifier="global").sparsifier == "global"


def test_filter_fn_selects_and_removed_prunable_names_its_replacement():
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(**job.CONFIG, filter_fn=lambda m, fqn: fqn == "fc1"))
    assert list(emb.params) == ["fc1.weight"]
    emb = LevelEmbedder(model, ELSAConfig(**job.CONFIG, select=["fc2.weight"]))
    assert list(emb.params) == ["fc2.weight"]
    res = ec.embed_levels(job.MLP(), [0.5], lambda m, p: None, steps=0, progress=False,
                          filter_fn=lambda m, fqn: fqn == "fc2")
    assert list(res.counters) == ["fc2.weight"]
    with pytest.raises(ec.ELSATypeError, match="prunable= was removed in 0.2.*filter_fn="):
        ec.embed_levels(job.MLP(), [0.5], lambda m, p: None, steps=0, progress=False,
                        prunable=lambda name, m: name == "fc2")
    with pytest.raises(ec.ELSATypeError, match="removed in 0.2.*filter_fn="):
        ec.prune_gmp(job.MLP(), 0.5, lambda m, p: None, steps=0, progress=False, prunable=["fc2.weight"])
    with pytest.raises(ec.ELSATypeError, match="unexpected keyword argument 'stepz'"):
        ec.embed_levels(job.MLP(), [0.5], lambda m, p: None, stepz=0)


def test_embed_levels_takes_a_config():
    cfg = ELSAConfig(levels=[0.5], steps=0, select=["fc2.weight"])
    res = ec.embed_levels(job.MLP(), cfg, lambda m, p: None, progress=False)
    assert list(res.counters) == ["fc2.weight"]
    with pytest.raises(ec.ELSATypeError, match="belong inside it"):
        ec.embed_levels(job.MLP(), cfg, lambda m, p: None, steps=3)


def test_zero_step_phases_and_steps_counted_only_on_the_model():
    model = job.MLP()
    emb = LevelEmbedder(model, ELSAConfig(levels=[0.5], steps=0, final_steps=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    emb.attach(opt)
    assert emb.done and emb.total_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = emb.finalize(bn_calibration=[torch.randn(8, 16)])
    assert res.sparsities == pytest.approx([0.5], abs=0.01)
