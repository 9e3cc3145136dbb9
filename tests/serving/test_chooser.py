"""choose_level (elsa_codec.serving.chooser): every level measured, the densest level within a latency /
memory budget selected, the model left there (or at its old level when nothing fits); LevelTable's
text and JSON forms; argument errors before any timing.

Memory budgets are set from the figures of a first call (they come from the model's own data
structures, the same on every call), so no test depends on how fast this machine runs."""
import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAError
from elsa_codec.errors import ELSATypeError
from elsa_codec.native import cpu_kernels
from elsa_codec.serving.chooser import LevelRow, LevelTable, choose_level, resident_bytes

SPARSITIES = [0.9, 0.75, 0.5]
X = torch.randn(1, 512, generator=torch.Generator().manual_seed(1))


def _served(sparsities=SPARSITIES, width=512) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).eval()
    return ec.swap_(model, ec.encode(model.state_dict(), ec.magnitude_counters(model, list(sparsities))))


@pytest.fixture(scope="module")
def served():
    return _served()


@pytest.fixture(scope="module")
def first(served):
    return choose_level(served, X, warmup=0, runs=2)


def _level_of(model) -> set:
    return {m.level for _, m in ec.elsa_modules(model)}


def test_table_rows_are_the_recorded_levels(served, first):
    want = ec.levels(served)
    assert len(first.rows) == len(SPARSITIES) + 1 == len(want)
    for r, lv in zip(first.rows, want):
        assert isinstance(r, LevelRow)
        assert (r.level, r.structure) == (lv.level, lv.structure)
        assert r.sparsity == pytest.approx(lv.sparsity)
        assert r.median_ms > 0 and r.resident_mib > 0
    assert [r.sparsity for r in first.rows[:-1]] == pytest.approx(SPARSITIES, abs=1e-3)
    assert first.rows[-1].structure == "dense" and first.rows[-1].sparsity == 0.0


def test_no_budget_or_a_huge_one_chooses_dense(served, first):
    T1 = len(SPARSITIES) + 1
    assert first.chosen == T1 and _level_of(served) == {T1}
    ec.set_level(served, 1)
    t = choose_level(served, X, max_latency_ms=1e12, max_memory_mib=1e12, warmup=0, runs=2)
    assert t.chosen == T1 and _level_of(served) == {T1}
    assert t.budget == {"max_latency_ms": 1e12, "max_memory_mib": 1e12, "min_quality": None}
    inf = choose_level(served, X, max_latency_ms=math.inf, warmup=0, runs=1)
    assert inf.chosen == T1 and inf.max_latency_ms is None


@pytest.mark.skipif(cpu_kernels() is None, reason="the sparse-cpu kernels could not be built here")
def test_sparse_level_holds_less_than_dense_on_cpu(first):
    lv1, dense = first.row(1), first.rows[-1]
    assert lv1.sparsity == pytest.approx(0.9, abs=1e-3)
    assert lv1.resident_mib < dense.resident_mib / 2  # the packed 90% level: values + indices of 10%


def test_memory_budget_between_two_levels_picks_the_densest_that_fits(served, first):
    if cpu_kernels() is None:
        pytest.skip("the sparse-cpu kernels could not be built here: no level holds less than dense")
    dense = first.rows[-1].resident_mib
    under = sorted(r.resident_mib for r in first.rows if r.resident_mib < dense)
    assert under, first
    budget = (under[-1] + dense) / 2  # every level at or under the largest figure below dense fits
    want = max(r.level for r in first.rows if r.resident_mib <= budget)
    assert want < first.rows[-1].level
    t = choose_level(served, X, max_memory_mib=budget, warmup=0, runs=2)
    assert [r.resident_mib for r in t.rows] == [r.resident_mib for r in first.rows]
    assert t.chosen == want and _level_of(served) == {want}
    assert t.max_memory_mib == budget and t.max_latency_ms is None
    ec.set_level(served, "dense")


@settings(max_examples=8, deadline=None)
@given(frac=st.floats(0.05, 3.0))
def test_memory_budget_property(served, first, frac):
    budget = frac * first.rows[-1].resident_mib
    fits = [r.level for r in first.rows if r.resident_mib <= budget]
    if fits:
        assert choose_level(served, X, max_memory_mib=budget, warmup=0, runs=1).chosen == max(fits)
        assert _level_of(served) == {max(fits)}
    else:
        with pytest.raises(ELSAError, match="closest is level"):
            choose_level(served, X, max_memory_mib=budget, warmup=0, runs=1)
    ec.set_level(served, "dense")


def test_impossible_latency_raises_and_keeps_the_level(served):
    ec.set_level(served, 2)
    with pytest.raises(ELSAError, match=r"closest is level \d .*ms.*MiB.*stays at level 2") as e:
        choose_level(served, X, max_latency_ms=1e-9, warmup=0, runs=2)
    assert _level_of(served) == {2}
    assert e.value.table.chosen is None and len(e.value.table.rows) == len(SPARSITIES) + 1
    ec.set_level(served, "dense")


def test_closest_level_is_the_smallest_relative_excess(served, first):
    # memory only: the closest is the level with the smallest figure
    tiny = min(r.resident_mib for r in first.rows) / 2
    best = min(first.rows, key=lambda r: (r.resident_mib, -r.level))
    with pytest.raises(ELSAError, match=f"closest is level {best.level} "):
        choose_level(served, X, max_memory_mib=tiny, warmup=0, runs=1)
    assert _level_of(served) == {len(SPARSITIES) + 1}


def test_repr_json_and_marker(first):
    text = repr(first)
    assert text == str(first)
    lines = text.splitlines()
    assert "level" in lines[0] and "median ms" in lines[0] and "resident MiB" in lines[0]
    for r in first.rows:
        row = [ln for ln in lines[1:-1] if ln.replace("*", " ").split()[0] == str(r.level)]
        assert len(row) == 1, (r.level, text)
        assert row[0].lstrip().startswith("*") == (r.level == first.chosen)
    assert sum(ln.lstrip().startswith("*") for ln in lines[1:-1]) == 1
    d = json.loads(first.to_json())
    assert d == first.to_dict()
    assert d["chosen"] == first.chosen and d["budget"] == {"max_latency_ms": None, "max_memory_mib": None, "min_quality": None}
    assert [row["level"] for row in d["rows"]] == [r.level for r in first.rows]
    assert set(d["rows"][0]) == {"level", "structure", "sparsity", "median_ms", "resident_mib", "cosine", "perplexity"}
    assert d["rows"][0]["cosine"] is None  # no quality report in this checkpoint
    with pytest.raises(ELSAError, match="no row for level 9"):
        first.row(9)
    with pytest.raises(AttributeError):
        first.chosen = 1  # frozen
    assert isinstance(first, LevelTable)


def test_resident_bytes_dense_is_the_parameters():
    model = _served([0.9], width=64)
    assert resident_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def test_tied_weight_counts_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    model = Tied().eval()
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.5]))
    ec.swap_(model, enc)
    assert model.a.weight is model.b.weight
    t = choose_level(model, torch.randn(2, 32), warmup=0, runs=1)
    assert t.rows[-1].resident_mib * 2**20 == pytest.approx(32 * 32 * 4 + 2 * 4)  # one weight + two level buffers


class _Counting(nn.Module):
    """Records its calls; takes positional or keyword inputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.calls = 0

    def forward(self, x, y=None):
        self.calls += 1
        assert torch.is_inference_mode_enabled()
        return self.lin(x if y is None else x + y)


def _counting():
    torch.manual_seed(0)
    m = _Counting().eval()
    sd = m.state_dict()
    return ec.swap_(m, ec.encode(sd, ec.magnitude_counters(sd, [0.5])))


def test_inputs_tensor_tuple_dict_and_counts():
    m = _counting()
    x = torch.randn(2, 16)
    choose_level(m, x, warmup=2, runs=3)
    assert m.calls == 2 * (2 + 3)  # two levels
    choose_level(m, (x, x), warmup=0, runs=1)
    choose_level(m, {"x": x, "y": x}, warmup=0, runs=1)
    assert m.calls == 10 + 2 + 2


def test_model_error_restores_the_level():
    m = _counting()
    ec.set_level(m, 1)
    with pytest.raises(RuntimeError):
        choose_level(m, torch.randn(2, 3), warmup=0, runs=1)  # wrong width: the model raises
    assert m.lin.level == 1


@pytest.mark.parametrize("kwargs, err, match", [
    ({"max_latency_ms": 0}, ELSAError, "max_latency_ms"),
    ({"max_latency_ms": -1.0}, ELSAError, "max_latency_ms"),
    ({"max_memory_mib": 0.0}, ELSAError, "max_memory_mib"),
    ({"max_memory_mib": -5}, ELSAError, "max_memory_mib"),
    ({"max_memory_mib": float("nan")}, ELSAError, "max_memory_mib"),
    ({"max_latency_ms": "5"}, ELSATypeError, "max_latency_ms"),
    ({"max_memory_mib": True}, ELSATypeError, "max_memory_mib"),
    ({"runs": 0}, ELSAError, "runs"),
    ({"runs": 2.0}, ELSATypeError, "runs"),
    ({"warmup": -1}, ELSAError, "warmup"),
    ({"warmup": None}, ELSATypeError, "warmup"),
])
def test_bad_arguments_raise_before_timing(kwargs, err, match):
    m = _counting()
    ec.set_level(m, 1)
    with pytest.raises(err, match=match):
        choose_level(m, torch.randn(2, 16), **kwargs)
    assert m.calls == 0 and m.lin.level == 1


def test_bad_model_and_inputs():
    with pytest.raises(ELSAError, match="model .*no ELSA module"):
        choose_level(nn.Linear(4, 4), torch.randn(1, 4))
    with pytest.raises(ELSATypeError, match="model must be a torch.nn.Module"):
        choose_level("model.safetensors", torch.randn(1, 4))
    m = _counting()
    with pytest.raises(ELSATypeError, match="example_inputs"):
        choose_level(m, [torch.randn(2, 16)])
    with pytest.raises(ELSATypeError, match="example_inputs"):
        choose_level(m, {0: torch.randn(2, 16)})
    assert m.calls == 0


def test_leaves_the_given_model_alone_but_its_level(served):
    # the chooser changes the level only: same parameters, same state dict
    before = copy.deepcopy(served.state_dict())
    choose_level(served, X, warmup=0, runs=1)
    after = served.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
