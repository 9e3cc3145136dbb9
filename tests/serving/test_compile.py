"""torch.compile of swapped models: same outputs as eager at every level, and the number of
compilations a level switch costs (docs/SERVING.md).

- ``compile_mode="tensor"`` (default): the level is a 0-d int32 buffer read by the graph, so ONE
  graph serves every level: switching levels never recompiles.
- ``compile_mode="static"``: the level is a Python constant of the graph: one compilation per
  distinct level visited, none when a level is visited again.

Compilations are counted with ``torch._dynamo.testing.CompileCounterWithBackend`` (one count per
graph dynamo hands to the backend) and ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``.
"""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import elsa_codec as ec
from elsa_codec import ELSAConv2d, ELSALinear

LEVEL_WALK = [4, 1, 2, 3, 4, 1, "dense", 2, 3, 1]
pytestmark = pytest.mark.isolated  # each test in its own process: tests/conftest.py, "process isolation"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def swapped_mlp(compile_mode="tensor"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(sd, [0.8, 0.5, 0.25]))
    ec.swap_(model, enc)
    for m in model.modules():
        if isinstance(m, (ELSALinear, ELSAConv2d)):
            m.compile_mode = compile_mode
    return model


def walk(model, compiled, x, levels=LEVEL_WALK, exact=True):
    for lv in levels:
        ec.set_level(model, lv)
        with torch.no_grad():
            got, want = compiled(x), model(x)
        if exact:
            assert torch.equal(got, want), lv
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inductor_fullgraph_tensor_level_one_compile():
    """Inductor (C++ on the CPU), fullgraph: bit-exact with eager at every level, one graph total."""
    model = swapped_mlp("tensor")
    cnt = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    walk(model, compiled, torch.randn(5, 32))
    assert cnt.frame_count == 1
    assert counters["stats"]["unique_graphs"] == 1


def test_static_level_compiles_once_per_distinct_level():
    model = swapped_mlp("static")
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    walk(model, compiled, torch.randn(5, 32))
    assert cnt.frame_count == 4  # levels 1, 2, 3 and dense; revisits hit the cache


def test_cnn_with_level_batch_norm_one_compile():
    """Convolutions (depthwise, reflect padding) and per-level batch norm: one graph for all levels
    (the batch-norm statistics are swapped into the same buffers, graph inputs)."""
    from test_swap import cnn_and_encoded

    model, enc = cnn_and_encoded()
    ec.swap_(model, enc)
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    walk(model, compiled, torch.randn(2, 3, 8, 8), exact=False)  # eager: the sparse-cpu head
    assert cnt.frame_count == 1


def test_tiny_bert_fullgraph_one_compile():
    pytest.importorskip("transformers")
    from test_swap import linear_names, tiny_bert

    model = tiny_bert()
    sd = model.state_dict()
    ec.swap_(model, ec.encode(sd, ec.magnitude_counters(sd, [0.75, 0.5, 0.25], names=linear_names(model))))
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True)
    for lv in LEVEL_WALK:
        ec.set_level(model, lv)
        with torch.no_grad():
            assert torch.equal(compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state), lv
    assert cnt.frame_count == 1
