"""set_level(..., semi_structured=True): a 2:4 level on sparse tensor cores where the device has them."""
import pytest
import torch
from test_swap import assert_unchanged, snapshot
from torch import nn

import elsa_codec as ec


def swapped(levels, width=64, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, width)).to(device=device, dtype=dtype)
    sd = model.state_dict()
    enc = ec.encode(sd, ec.magnitude_counters(sd, levels))
    ec.swap_(model, enc)
    return model, enc


def test_semi_structured_refused_without_support_and_model_unchanged():
    model, _ = swapped(["1:4", "2:4"])
    ec.set_level(model, 1)
    snap = snapshot(model)
    if not torch.cuda.is_available():
        with pytest.raises(ec.ELSAError, match="compute capability >= 8.0"):
            ec.set_level(model, 2, semi_structured=True)
        assert_unchanged(model, snap)
        assert model[0].level == 1 and model[0].backend_request == "auto"


def test_semi_structured_needs_a_2_4_level():
    model, _ = swapped([0.75, 0.5])
    snap = snapshot(model)
    with pytest.raises(ec.ELSAError, match="module '0': level 1 has structure unstructured, semi_structured needs 2:4"):
        ec.set_level(model, 1, semi_structured=True)
    with pytest.raises(ec.ELSAError, match="dense level has no 2:4"):
        ec.set_level(model, "dense", semi_structured=True)
    assert_unchanged(model, snap)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8), reason="needs a CUDA GPU with 2:4 sparse tensor cores"
)
def test_semi_structured_matches_reference_on_gpu():
    model, enc = swapped(["1:4", "2:4"], width=128, device="cuda", dtype=torch.float16)
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    for t in (1, 2):
        ref_model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).to("cuda", torch.float16)
        ref_model.load_state_dict(ec.extract(enc, t))
        ec.set_level(model, t, semi_structured=True)
        assert model[0].backend == "semi-structured"
        torch.testing.assert_close(model(x), ref_model(x), rtol=2e-2, atol=2e-2)
    ec.set_level(model, 2)
    assert model[0].backend_request == "auto"
