"""`elsa plans`: list, --json, --refresh and --clear this machine's CPU plans (a private cache folder)."""
import json

import pytest
import torch

import elsa_codec as ec
from elsa_codec.cli.commands import main
from elsa_codec.kernels.cpu import planner, plans
from elsa_codec.native import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU sparse kernels could not be built here")


def test_plans_list_json_refresh_clear(measuring, capsys):
    g = torch.Generator().manual_seed(0)
    w = ec.encode_tensor(torch.randn(200, 130, generator=g), torch.randint(0, 2, (200, 130), generator=g), 1)
    plans.plan_level(w, 1, 1, "unstructured", 0.5)
    assert main(["plans"]) == 0
    out = capsys.readouterr().out
    assert "1 plan(s)" in out and "200x130 float32 density 0.50 unstructured" in out and "M=256:" in out
    assert main(["plans", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (rec,) = doc["plans"]
    assert rec["shape"] == [200, 130] and [b["m"] for b in rec["buckets"]] == list(planner.BUCKETS)
    assert all(b["route"] in ("csr", "bitmask", "dense") and b["ratio"] > 0 for b in rec["buckets"])
    assert rec["conditions"]["threads"] == torch.get_num_threads()
    before = rec["conditions"]["time"]
    assert main(["plans", "--refresh", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["plans"]) == 1 and before
    assert main(["plans", "--clear"]) == 0
    assert "1 plan(s) removed" in capsys.readouterr().out and not measuring.exists()
    assert main(["plans"]) == 0 and "0 plan(s)" in capsys.readouterr().out
