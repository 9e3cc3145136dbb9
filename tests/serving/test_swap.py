"""Model-level serving (elsa_codec.serving.swap): swap_ / set_level / set_sparsity / levels / load /
elsa_state_dict on an MLP, a CNN with batch norm and a depthwise conv, and a tiny BertModel.

At every level the swapped model must equal (torch.equal: same kernels run) the original model with
``extract(encoded, level)`` loaded; the rebuilt state dict must save and read back to the same
checkpoint; every bad input must raise ELSAError and leave the model exactly as it was."""
import copy
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAError, ELSALinear, ELSAStateDict
from elsa_codec.serving.batch_norm import LevelBatchNormMixin


# ---------------------------------------------------------------------------------------------
# models and helpers
# ---------------------------------------------------------------------------------------------
def mlp(width=24, dtype=torch.float32):
    return nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype).eval()


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 5))

    def forward(self, x):
        x = torch.relu(self.bn1(self.stem(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.head(self.pw(x))


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def linear_names(model):
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_counters(sd, names, T, seed):
    g = torch.Generator().manual_seed(seed)
    return ec.Counters({n: torch.randint(1, T + 2, sd[n].shape, generator=g).to(torch.uint8) for n in names}, T)


def bn_stats_for(model, T, seed=0):
    """Random per-level statistics for every BatchNorm; the dense level's are the model's own."""
    g = torch.Generator().manual_seed(seed)
    out = {t: {} for t in range(1, T + 2)}
    for fqn, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in range(1, T + 1):
                out[t][fqn] = {"running_mean": torch.randn(m.num_features, generator=g),
                               "running_var": torch.rand(m.num_features, generator=g) + 0.5,
                               "num_batches_tracked": torch.tensor(100 * t)}
            out[T + 1][fqn] = {s: getattr(m, s).clone() for s in ("running_mean", "running_var", "num_batches_tracked")}
    return out


def cnn_and_encoded(T=3, seed=0):
    torch.manual_seed(seed)
    model = CNN().eval()
    with torch.no_grad():  # non-trivial dense statistics
        for m in (model.bn1, model.bn2):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    sd = model.state_dict()
    levels = [0.8, 0.5, 0.25][-T:] if T <= 3 else None
    cnt = ec.magnitude_counters(sd, levels)
    return model, ec.encode(sd, cnt, bn_stats=bn_stats_for(model, T, seed))


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [getattr(m, "level", None) for m in model.modules()])


def assert_unchanged(model, snap):
    sd, types, lv = snapshot(model)
    assert types == snap[1], "module types changed"
    assert sd.keys() == snap[0].keys()
    for k in sd:
        assert torch.equal(sd[k], snap[0][k]), f"{k} changed"
    assert lv == snap[2], "levels changed"


def assert_levels_match(served, original, enc, run):
    """At every level, served == original with extract(enc, level) loaded: bit-exact at the dense
    level and on the reference path; within float32 summation-order tolerance where the
    sparse-cpu kernels serve a sparse level (another summation order)."""
    ref = copy.deepcopy(original)
    T = enc.meta.num_levels
    for t in list(range(1, T + 2)) + ["dense", 2 if T >= 2 else 1]:
        lv = ec.set_level(served, t)
        ref.load_state_dict(ec.extract(enc, lv))
        with torch.no_grad():
            a, b = run(served), run(ref)
        if lv > T or all(m.backend != "sparse-cpu" for _, m in ec.elsa_modules(served)):
            assert torch.equal(a, b), f"level {t}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"level {t}")


# ---------------------------------------------------------------------------------------------
# swaps that work
# ---------------------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 1000), width=st.integers(1, 20))
def test_mlp_every_level(T, dtype, seed, width):
    k = ec.default_code_bits(T)
    if k > ec.MAX_CODE_BITS[dtype]:
        T = 2
    model = mlp(width, dtype)
    sd = model.state_dict()
    enc = ec.encode(sd, random_counters(sd, linear_names(model), T, seed))
    served = copy.deepcopy(model)
    assert ec.swap_(served, enc) is served
    assert all(isinstance(served[i], ELSALinear) for i in (0, 2, 4))
    assert list(served.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(seed)).to(dtype)
    assert_levels_match(served, model, enc, lambda m: m(x))


def test_cnn_bn_depthwise_every_level_and_file_roundtrip(tmp_path):
    model, enc = cnn_and_encoded()
    served = copy.deepcopy(model)
    ec.swap_(served, enc)
    text = repr(served)
    assert "ELSAConv2d(8, 8, kernel_size=(3, 3)" in text and "groups=8" in text and "padding_mode=reflect" in text
    assert "LevelBatchNorm2d(8" in text and "ELSALinear(in_features=256" in text
    assert isinstance(served.bn1, LevelBatchNormMixin) and isinstance(served.bn1, nn.BatchNorm2d)
    assert list(served.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert_levels_match(served, model, enc, lambda m: m(x))

    # the rebuilt checkpoint equals the one served (whatever the active level), saves and reads back
    ec.set_level(served, 2)
    rebuilt = ec.elsa_state_dict(served)
    assert rebuilt.meta.to_json() == enc.meta.to_json()
    assert rebuilt.keys() == enc.keys() and all(torch.equal(rebuilt[n], enc[n]) for n in enc)
    for t in enc.bn_stats:
        for fqn, stats in enc.bn_stats[t].items():
            for s, v in stats.items():
                assert torch.equal(rebuilt.bn_stats[t][fqn][s], v)
    path = str(tmp_path / "cnn.safetensors")
    ec.save_file(rebuilt, path)
    back = ec.load_file(path)
    assert back.meta.to_json() == enc.meta.to_json()
    # a fresh model loads the file and serves every level the same
    fresh = CNN().eval()
    ec.load(path, fresh)
    assert_levels_match(fresh, model, back, lambda m: m(x))
    # a plain load_state_dict of the file is the dense network
    plain = CNN().eval()
    plain.load_state_dict(back)
    ec.set_level(fresh, "dense")
    with torch.no_grad():
        assert torch.equal(plain(x), fresh(x))


def test_bn_statistics_follow_level_and_training_updates_are_kept():
    model, enc = cnn_and_encoded()
    served = ec.swap_(copy.deepcopy(model), enc)
    for t in (1, 2, 3, 4):
        ec.set_level(served, t)
        assert torch.equal(served.bn1.running_mean, enc.bn_stats[t]["bn1"]["running_mean"])
    ec.set_level(served, 1)
    served.train()
    served(torch.randn(4, 3, 8, 8))  # recalibrates level 1's statistics
    served.eval()
    calibrated = served.bn2.running_var.clone()
    assert int(served.bn2.num_batches_tracked) == 101
    ec.set_level(served, 3)
    rebuilt = ec.elsa_state_dict(served)
    assert torch.equal(rebuilt.bn_stats[1]["bn2"]["running_var"], calibrated)
    ec.set_level(served, 1)
    assert torch.equal(served.bn2.running_var, calibrated)


def test_tiny_bert_every_level(tmp_path):
    pytest.importorskip("transformers")
    model = tiny_bert()
    sd = model.state_dict()
    names = linear_names(model)
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5, 0.25], names=names))
    served = ec.swap_(copy.deepcopy(model), enc)
    n_elsa = sum(isinstance(m, ELSALinear) for m in served.modules())
    assert n_elsa == len(names) == 2 * 6 + 1
    assert "(query): ELSALinear(in_features=32, out_features=32, bias=True, T=3, k=2" in repr(served)
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    assert_levels_match(served, model, enc, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state)
    path = str(tmp_path / "bert.safetensors")
    ec.save_file(ec.elsa_state_dict(served), path)
    fresh = tiny_bert()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # make sure everything is loaded from the file
    ec.swap_(fresh, path)
    assert_levels_match(fresh, model, enc, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state)


def test_filter_fn_narrows_and_levels_api(caplog):
    model, enc = cnn_and_encoded()
    served = ec.swap_(copy.deepcopy(model), enc, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    assert type(served.stem) is nn.Conv2d and type(served.dw) is nn.Conv2d
    assert isinstance(served.head[1], ELSALinear)
    # filtered convolutions hold their encoded weights as plain tensors (the dense level)
    assert torch.equal(served.dw.weight, enc["dw.weight"])
    lv = ec.levels(served)
    assert [x.level for x in lv] == [1, 2, 3, 4] and lv[-1].structure == "dense"
    assert [x.sparsity for x in lv[:3]] == pytest.approx([0.8, 0.5, 0.25], abs=0.01)
    with caplog.at_level(logging.INFO, logger="elsa_codec"):
        assert ec.set_sparsity(served, 0.6) == 2
    assert "level 2" in caplog.text
    assert ec.set_sparsity(served, 0.0) == 4
    assert ec.set_sparsity(served, 1.0) == 1
    assert ec.set_sparsity(served, 0.37) == 3
    with pytest.raises(ELSAError):
        ec.set_sparsity(served, 1.5)


def test_swap_twice_and_module_level_api():
    model = mlp()
    sd = model.state_dict()
    enc = ec.encode(sd, random_counters(sd, linear_names(model), 3, 1))
    served = ec.swap_(copy.deepcopy(model), enc)
    ec.set_level(served, 1)
    served[0].backend = "reference"
    enc2 = ec.encode(sd, random_counters(sd, linear_names(model), 3, 2))
    ec.swap_(served, enc2)  # ELSA modules are replaced again
    assert served[0].level == 4 and served[0].backend_request == "reference"
    x = torch.randn(2, 10)
    assert_levels_match(served, model, enc2, lambda m: m(x))
    assert [n for n, _ in ec.elsa_modules(served)] == ["0", "2", "4"]


# ---------------------------------------------------------------------------------------------
# bad input: a clear ELSAError naming the module, and the model exactly as it was
# ---------------------------------------------------------------------------------------------
def _with(enc, tensors=None, bn=None, drop=()):
    t = {k: v for k, v in enc.items() if k not in drop}
    t.update(tensors or {})
    return ELSAStateDict(t, enc.meta, enc.bn_stats if bn is None else bn)


def _bad_cases():
    """(id, build() -> (model, encoded, kwargs), message regex)."""
    def extra_tensor():
        model, enc = cnn_and_encoded()
        return model, _with(enc, {"extra.weight": torch.zeros(3)}), {}

    def shape():
        model = mlp(24)
        sd = mlp(16).state_dict()
        return model, ec.encode(sd, random_counters(sd, linear_names(model), 2, 0)), {}

    def dtype():
        model = mlp(24, torch.bfloat16)
        sd = mlp(24).state_dict()
        return model, ec.encode(sd, random_counters(sd, linear_names(model), 2, 0)), {}

    def bias_shape():
        model, enc = cnn_and_encoded()
        return model, _with(enc, {"pw.bias": torch.zeros(15)}), {}

    def no_match():
        model, enc = cnn_and_encoded()
        return model, enc, {"filter_fn": lambda m, fqn: False}

    def bn_levels_short():
        model, enc = cnn_and_encoded()
        bn = {t: v for t, v in enc.bn_stats.items() if t <= 3}
        return model, _with(enc, bn=bn), {}

    def bn_levels_long():
        model, enc = cnn_and_encoded()
        return model, _with(enc, bn={**enc.bn_stats, 5: enc.bn_stats[4]}), {}

    def bn_not_bn():
        model, enc = cnn_and_encoded()
        bn = {t: {**per, "pw": per["bn2"]} for t, per in enc.bn_stats.items()}
        return model, _with(enc, bn=bn), {}

    def bn_stat_shape():
        model, enc = cnn_and_encoded()
        bn = copy.deepcopy(enc.bn_stats)
        bn[2]["bn2"]["running_var"] = torch.ones(7)
        return model, _with(enc, bn=bn), {}

    def unsupported_module():
        model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
        sd = model.state_dict()
        return model, ec.encode(sd, random_counters(sd, ["0.weight", "1.weight"], 2, 0)), {}

    def embedding_max_norm():
        model = nn.Sequential(nn.Embedding(20, 8, max_norm=1.0), nn.Linear(8, 4))
        sd = model.state_dict()
        return model, ec.encode(sd, random_counters(sd, ["0.weight", "1.weight"], 2, 0)), {}

    def encoded_bias():
        model = mlp()
        sd = model.state_dict()
        return model, ec.encode(sd, random_counters(sd, ["0.weight", "0.bias"], 2, 0)), {}

    def model_tensor_missing():
        model, enc = cnn_and_encoded()
        return model, _with(enc, drop=("pw.bias",)), {}

    def mha_out_proj():
        model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
        sd = model.state_dict()
        return model, ec.encode(sd, random_counters(sd, ["self_attn.out_proj.weight", "linear1.weight"], 2, 0)), {}

    def other_T():
        model = mlp()
        sd = model.state_dict()
        ec.swap_(model, ec.encode(sd, random_counters(sd, linear_names(model), 3, 0)))
        sd = model.state_dict()
        return model, ec.encode(sd, random_counters(sd, ["0.weight"], 1, 0)), {}

    return [
        ("file tensor missing from model", extra_tensor, r"'extra\.weight'.*missing from the model"),
        ("shape", shape, r"module '0'.*'0\.weight' has shape \(16, 10\) in the checkpoint but \(24, 10\)"),
        ("dtype", dtype, r"module '0'.*dtype float32 in the checkpoint but bfloat16"),
        ("bias shape", bias_shape, r"module 'pw'.*'pw\.bias' has shape"),
        ("no module matching", no_match, r"no module of the model matches"),
        ("bn stats for fewer levels", bn_levels_short, r"batch-norm module 'bn1'.*levels 1\.\.3.*T=3 needs levels 1\.\.4"),
        ("bn stats for more levels", bn_levels_long, r"batch-norm module 'bn1'.*levels 1\.\.5.*T=3"),
        ("bn stats for a conv", bn_not_bn, r"module 'pw' is a Conv2d, not a batch-norm layer"),
        ("bn stat shape", bn_stat_shape, r"batch-norm module 'bn2': running_var of level 2 is \(7,\)"),
        ("encoded LayerNorm weight", unsupported_module, r"module '0' is a LayerNorm.*can only be served by"),
        ("embedding with max_norm", embedding_max_norm, r"module '0' is an Embedding with max_norm=1.0.*overwrite their level codes"),
        ("encoded bias", encoded_bias, r"module '0'.*only the weight"),
        ("model tensor missing from file", model_tensor_missing, r"module 'pw': tensor 'pw\.bias'.*missing from the checkpoint"),
        ("MultiheadAttention out_proj", mha_out_proj, r"module 'self_attn\.out_proj'.*MultiheadAttention reads it directly"),
        ("ELSA modules with another T", other_T, r"module '2' already serves an ELSA weight with T=3"),
    ]


@pytest.mark.parametrize("build,message", [c[1:] for c in _bad_cases()], ids=[c[0] for c in _bad_cases()])
def test_bad_input_leaves_model_unchanged(build, message):
    model, enc, kw = build()
    snap = snapshot(model)
    with pytest.raises(ELSAError, match=message):
        ec.swap_(model, enc, **kw)
    assert_unchanged(model, snap)


def test_bad_level_and_unswapped_model_leave_model_unchanged():
    model, enc = cnn_and_encoded()
    ec.swap_(model, enc)
    ec.set_level(model, 2)
    snap = snapshot(model)
    for bad in (0, 5, -1, "sparse", 2.5, None):
        with pytest.raises(ELSAError, match="level"):
            ec.set_level(model, bad)
        assert_unchanged(model, snap)
    plain = mlp()
    with pytest.raises(ELSAError, match="no ELSA module"):
        ec.set_level(plain, 1)
    with pytest.raises(ELSAError, match="no ELSA module"):
        ec.elsa_state_dict(plain)
    with pytest.raises(ELSAError, match="ELSAStateDict"):
        ec.swap_(plain, dict(plain.state_dict()))


def test_bad_file_leaves_model_unchanged(tmp_path):
    model, enc = cnn_and_encoded()
    path = str(tmp_path / "cnn.safetensors")
    ec.save_file(enc, path)
    other = mlp()
    snap = snapshot(other)
    with pytest.raises(ELSAError, match="missing from the model"):
        ec.load(path, other)
    assert_unchanged(other, snap)
    with pytest.raises(ELSAError):
        ec.load(str(tmp_path / "nope.safetensors"), other)
    assert_unchanged(other, snap)
