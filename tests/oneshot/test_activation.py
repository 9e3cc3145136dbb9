"""Activation-aware one-shot levels (issue 45): Wanda and RIA counters against a naive reference
(bit-exact), the hooks' statistics, nesting, structures, ties, and the refusals.

The naive reference is the papers' formulas written out per weight and a Python sort per output
row; it gets the same float32 statistics as the library (the hooks are checked separately
against a float64 norm of the stored activations).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elsa_codec as ec
from elsa_codec import ELSAError, ELSATypeError
from elsa_codec.format.structure import parse_levels
from elsa_codec.oneshot.activation import input_norms
from elsa_codec.oneshot.scores import tensor_activation_counters


def naive_scores(w: torch.Tensor, sumsq: torch.Tensor, method: str) -> list:
    """Per weight, as the papers write it (float32 scalars; ``sumsq`` ``[1, cols]``)."""
    rows, cols = w.shape
    a = w.abs().to(torch.float32)
    norm = [torch.sqrt(sumsq[0, j]) for j in range(cols)]
    if method == "wanda":  # Sun et al. 2023, eq. 1: |W_ij| * ||X_j||_2
        return [[a[i, j] * norm[j] for j in range(cols)] for i in range(rows)]
    col = a.sum(dim=0)
    row = a.sum(dim=1)
    # Zhang et al. 2024, eq. 3-4: (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** 0.5
    return [[(a[i, j] / col[j] + a[i, j] / row[i]) * norm[j] ** 0.5 for j in range(cols)] for i in range(rows)]


def naive_counters(w, sumsq, sparsities, method) -> torch.Tensor:
    """Counter = 1 + #levels whose per-row keep count the weight's rank reaches (stable sort)."""
    s = naive_scores(w, sumsq, method)
    rows, cols = w.shape
    out = torch.empty(rows, cols, dtype=torch.uint8)
    for i in range(rows):
        order = sorted(range(cols), key=lambda j: (-float(s[i][j]), j))
        for rank, j in enumerate(order):
            out[i, j] = 1 + sum(rank >= round((1 - sp) * cols) for sp in sparsities)
    return out


@settings(max_examples=12, deadline=None)
@given(rows=st.sampled_from([1, 8, 63]), cols=st.sampled_from([5, 64, 123]), seed=st.integers(0, 2**16),
       method=st.sampled_from(["wanda", "ria"]))
def test_counters_match_the_naive_reference(rows, cols, seed, method):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    sumsq = torch.rand(1, cols, generator=g) * 10
    sumsq[0, 0] = 0.0  # a dead input feature
    sps = [0.9, 0.7, 0.5]
    got = tensor_activation_counters(w, parse_levels(sps), sumsq, method)
    assert torch.equal(got, naive_counters(w, sumsq, sps, method))
    for t, sp in enumerate(sps, start=1):  # every row keeps exactly its share at every level: nested
        assert ((got <= t).sum(1) == round((1 - sp) * cols)).all()


class Mixed(torch.nn.Module):
    """A Linear, a Conv2d with padding and a grouped Conv1d: every scored module kind."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(63, 24)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.gconv = torch.nn.Conv1d(4, 8, 3, groups=2)

    def forward(self, x, img, seq):
        return self.fc(x).sum() + self.conv(img).sum() + self.gconv(seq).sum()


def _stored_inputs(model, batches):
    """The naive side: every module's whole input, kept."""
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].clone()))
             for n, m in model.named_children()]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return seen


def test_hook_statistics_are_the_input_norms():
    torch.manual_seed(0)
    model = Mixed()
    batches = [{"x": torch.randn(2, 5, 63), "img": torch.randn(2, 3, 9, 9), "seq": torch.randn(3, 4, 10)} for _ in range(3)]
    sums, counts, n = input_norms(model, ["fc", "conv", "gconv"], batches)
    seen = _stored_inputs(model, batches)
    x = torch.cat([t.reshape(-1, 63) for t in seen["fc"]]).double()
    assert n == 3 and counts["fc"] == 30
    torch.testing.assert_close(sums["fc"][0].double(), (x * x).sum(0), rtol=1e-5, atol=0)
    cols = torch.cat([torch.nn.functional.unfold(t, 3, padding=1, stride=2) for t in seen["conv"]], 0)  # [B, 27, L]
    torch.testing.assert_close(sums["conv"][0].double(), cols.double().pow(2).sum((0, 2)), rtol=1e-5, atol=0)
    seq = torch.cat(seen["gconv"]).double()  # [B, 4, 10]: group g reads channels 2g, 2g+1 at 3 taps
    want = torch.tensor([[float(seq[:, 2 * g + c, k:k + 8].pow(2).sum()) for c in range(2) for k in range(3)]
                         for g in range(2)], dtype=torch.float64)
    torch.testing.assert_close(sums["gconv"].double(), want, rtol=1e-5, atol=0)
    assert sums["gconv"].shape == (2, 6)


def test_activation_counters_end_to_end_and_structures():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16))
    batches = [{"input": torch.randn(7, 64)} for _ in range(2)]
    everything = lambda m, fqn: True  # noqa: E731
    sums, _, _ = input_norms(model, ["0", "2"], batches)
    c = ec.activation_counters(model, [0.75, 0.5], batches, method="ria", filter_fn=everything)
    assert torch.equal(c["0.weight"], naive_counters(model[0].weight.detach(), sums["0"], [0.75, 0.5], "ria"))
    nm = ec.activation_counters(model, ["1:4", "2:4"], batches, filter_fn=everything)
    for t, keep in ((1, 1), (2, 2)):
        g = (nm["0.weight"] <= t).reshape(48, 16, 4).sum(-1)
        assert (g == keep).all()
    assert ((nm["0.weight"] <= 1) <= (nm["0.weight"] <= 2)).all()  # nested
    blk = ec.activation_counters(model, [0.5], batches, structure="block:4x8", filter_fn=everything)
    tiles = (blk["0.weight"] <= 1).reshape(12, 4, 8, 8).float().mean((1, 3))
    assert ((tiles == 0) | (tiles == 1)).all() and math.isclose(float(tiles.mean()), 0.5, abs_tol=0.05)
    enc = ec.encode(model.state_dict(), c)  # the counters encode like magnitude ones
    assert enc.meta.num_levels == 2


def test_wanda_beats_magnitude_on_a_layer_with_loud_inputs():
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, 64)
    scale = torch.ones(128)
    scale[:8] = 30.0  # a few outlier features, the case Wanda was made for
    x = torch.randn(256, 128) * scale
    seq = torch.nn.Sequential(lin)
    err = {}
    for name, c in (("magnitude", ec.magnitude_counters(seq, [0.5], filter_fn=lambda m, f: True)),
                    ("wanda", ec.activation_counters(seq, [0.5], [{"input": x}], filter_fn=lambda m, f: True))):
        w = lin.weight.detach() * (c["0.weight"] <= 1)
        err[name] = float((x @ (lin.weight.detach() - w).t()).norm())
    assert err["wanda"] < 0.8 * err["magnitude"]


def test_a_tied_weight_is_scored_once_from_all_its_uses():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16, bias=False)
            self.b = torch.nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(3)
    m = Shared()
    batch = {"x": torch.randn(5, 16), "y": torch.randn(5, 16) * 3}
    c = ec.activation_counters(m, [0.5], [batch], filter_fn=lambda mod, fqn: True)
    assert list(c) == ["a.weight"]
    ss = (batch["x"] ** 2).sum(0) + (batch["y"] ** 2).sum(0)
    assert torch.equal(c["a.weight"], naive_counters(m.a.weight.detach(), ss[None], [0.5], "wanda"))


def test_gpt2_conv1d_groups_lie_along_the_input_dimension():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    c = ec.activation_counters(model, ["2:4"], [{"input_ids": torch.randint(0, 50, (2, 16))}], select="blocks+head")
    w = c["transformer.h.0.mlp.c_fc.weight"]  # [in=32, out=128]
    assert w.shape == (32, 128) and ((w <= 1).t().reshape(128, 8, 4).sum(-1) == 2).all()
    assert "lm_head.weight" in c or "transformer.wte.weight" in c  # the tied head, once
    assert len([n for n in c if n in ("lm_head.weight", "transformer.wte.weight")]) == 1


def test_nan_activations_name_the_layer_and_the_hooks_come_off():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).train()
    with torch.no_grad():
        model[0].bias[3] = float("nan")
    with pytest.raises(ELSAError, match=r"^1: NaN or Inf in the input activations"):
        ec.activation_counters(model, [0.5], [{"input": torch.randn(2, 8)}], filter_fn=lambda m, f: True)
    assert all(not m._forward_pre_hooks for m in model.modules()) and model.training


@pytest.mark.parametrize("inputs, err, match", [
    ({"input": torch.randn(2, 8)}, ELSATypeError, "iterable of dicts"),
    ([torch.randn(2, 8)], ELSATypeError, r"inputs\[0\] is a Tensor"),
    ([], ELSAError, "no calibration batch"),
])
def test_bad_inputs(inputs, err, match):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(err, match=match):
        ec.activation_counters(model, [0.5], inputs, filter_fn=lambda m, f: True)


def test_bad_method_and_uncalled_module():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with pytest.raises(ELSAError, match="method must be one of 'wanda', 'ria'"):
        ec.activation_counters(model, [0.5], [{"input": torch.randn(1, 8)}], method="sparsegpt")

    class Skips(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ELSAError, match="unused: the module was never called"):
        ec.activation_counters(Skips(), [0.5], [{"x": torch.randn(1, 8)}], filter_fn=lambda m, f: True)


def test_encode_file_with_statistics_is_the_in_memory_encode(tmp_path):
    from safetensors.torch import save_file

    from elsa_codec.oneshot.activation import weight_statistics

    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24))
    batches = [{"input": torch.randn(9, 64)} for _ in range(2)]
    everything = lambda m, fqn: True  # noqa: E731
    src, out = str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    names = ["0.weight", "2.weight"]
    stats, tokens, n = weight_statistics(model, names, batches)
    assert sorted(stats) == names and tokens == 18 and n == 2
    for levels in ([0.8, 0.5], ["2:4"]):
        ec.encode_file(src, out, levels=levels, names=names, statistics=stats, method="ria", progress=False)
        want = ec.encode(model.state_dict(), ec.activation_counters(model, levels, batches, method="ria",
                                                                    filter_fn=everything))
        got = ec.load_file(out)
        assert all(torch.equal(got[k].view(torch.int32), want[k].view(torch.int32)) for k in want)
    with pytest.raises(ELSAError, match="statistics= makes activation-aware levels and needs levels="):
        ec.encode_file(src, out, counters=ec.magnitude_counters(model.state_dict(), [0.5], names=names), statistics=stats)
    with pytest.raises(ELSAError, match="distribution='uniform'"):
        ec.encode_file(src, out, levels=[0.5], names=names, statistics=stats, distribution="global", progress=False)


def test_a_module_called_with_a_keyword_input():
    class KW(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 6)

        def forward(self, x):
            return self.fc(input=x)

    torch.manual_seed(6)
    m, x = KW(), torch.randn(4, 12)
    c = ec.activation_counters(m, [0.5], [{"x": x}], filter_fn=lambda mod, fqn: True)
    assert torch.equal(c["fc.weight"], naive_counters(m.fc.weight.detach(), (x * x).sum(0)[None], [0.5], "wanda"))


def test_an_embedding_keeps_magnitude_levels_of_the_counter_dtype():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16)
    torch.manual_seed(7)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    c = ec.activation_counters(model, ["2:4"], [{"input_ids": torch.randint(0, 50, (2, 16))}], select="all")
    want = ec.magnitude_counters(model, ["2:4"], select="all")["transformer.wpe.weight"]
    assert c["transformer.wpe.weight"].dtype == torch.uint8 and torch.equal(c["transformer.wpe.weight"], want)
