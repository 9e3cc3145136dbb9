"""What the CPU layers keep packed: ``resident="one"`` (the level in use) and ``resident="all"``
(every sparse level in one nested csr form; a switch changes which row ends the kernels read).

Unpacked levels are bit-exact; products sum in another order than ``F.linear``: per-dtype
tolerance. Never a timing (bench/cpu_serving.py, bench/cpu_e2e.py measure the switch).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec.format.bits import extract_level
from elsa_codec.kernels.cpu import nested as nested_mod
from elsa_codec.native import cpu_kernels
from elsa_codec.serving import cpu_plan

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="the CPU sparse kernels could not be built here")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _model(dtype=torch.float32, n=123, k=257, levels=(0.9, 0.75, 0.5), seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 63)).to(dtype)
    enc = ec.encode(m.state_dict(), ec.magnitude_counters(m, list(levels)))
    served = nn.Sequential(nn.Linear(k, n), nn.ReLU(), nn.Linear(n, 63)).to(dtype)
    ec.swap_(served, enc)
    return served, enc


def _close(y, ref, dtype):
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * (1 + ref.float().abs().max().item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
def test_resident_all_serves_every_level_from_one_nested_form(dtype, monkeypatch):
    served, enc = _model(dtype)
    for _, m in ec.elsa_modules(served):
        m.cpu_max_tokens = 10**6  # every call packed: the nested form's product at every M
    packs = []
    real = nested_mod.pack_nested
    monkeypatch.setattr(cpu_plan, "pack_nested", lambda *a, **k: packs.append(1) or real(*a, **k))
    assert ec.set_resident(served, "all") == 2 and len(packs) == 2
    held = {id(m._nested[1]) for _, m in ec.elsa_modules(served)}
    for t in (1, 2, 3, 2, 1, 3):
        ec.set_level(served, t)
        for fqn, m in ec.elsa_modules(served):
            w = m.weight.detach()
            assert torch.equal(m.decoded_weight().view(torch.int16 if dtype != torch.float32 else torch.int32),
                               extract_level(w, t, m.code_bits).view(torch.int16 if dtype != torch.float32 else torch.int32))
            for rows in (1, 5, 70):
                x = torch.randn(rows, w.shape[1]).to(dtype)
                with torch.no_grad():
                    _close(m(x), F.linear(x.float(), extract_level(w, t, m.code_bits).float(), m.bias.float()), dtype)
    assert len(packs) == 2 and {id(m._nested[1]) for _, m in ec.elsa_modules(served)} == held  # never packed again
    assert all(len(m._packed) == 0 for _, m in ec.elsa_modules(served))  # no per-level packed copies
    ec.set_level(served, "dense")
    assert all(m._nested is not None for _, m in ec.elsa_modules(served))  # kept for the next switch


def test_resident_all_bytes_are_the_least_sparse_levels_csr():
    served, enc = _model(n=256, k=512)
    ec.set_resident(served, "all")
    ec.set_level(served, 3)
    for _, m in ec.elsa_modules(served):
        m.cpu_max_tokens = 10**6
        from elsa_codec.kernels.cpu.packed import pack_level

        csr = pack_level(m.weight.detach(), 3, m.code_bits, "csr")
        assert m._nested[1].nbytes <= 1.1 * csr.nbytes + 64 * m.weight.shape[0] * m.num_levels
        assert m.cached_bytes == m._nested[1].nbytes  # nothing else held


def test_resident_modes_are_checked_and_one_keeps_todays_behaviour(tmp_path):
    served, enc = _model()
    with pytest.raises(ec.ELSAError, match="resident must be one of"):
        ec.set_resident(served, "some")
    lin = ec.elsa_modules(served)[0][1]
    lin.cpu_format = "bitmask"
    ec.set_level(served, 1)
    with pytest.raises(ec.ELSAError, match="cpu_format 'bitmask' needs resident='one'"):
        ec.set_resident(served, "all")
    assert lin.resident == "one" and lin._nested is None
    lin.cpu_format = None
    ec.set_resident(served, "one")
    for t in (1, 2, 3):  # one mode: the current level only, nothing decoded beside it
        ec.set_level(served, t)
        assert lin._nested is None and lin._packed.levels() in ([t], []) and lin._cached is None
    path = str(tmp_path / "m.safetensors")
    ec.save_file(enc, path)
    with pytest.raises(ec.ELSAError, match="resident must be one of"):
        ec.load(path, _model()[0], resident="every")


def test_load_resident_all_mmap_then_switch(tmp_path):
    served, enc = _model()
    path = str(tmp_path / "m.safetensors")
    ec.save_file(enc, path)
    fresh = nn.Sequential(nn.Linear(257, 123), nn.ReLU(), nn.Linear(123, 63))
    m = ec.load(path, fresh, mmap=True, resident="all", level=1)
    mods = [mod for _, mod in ec.elsa_modules(m)]
    assert all(mod.resident == "all" and mod._nested is not None and not mod.keep_weight_resident for mod in mods)
    x = torch.randn(3, 257)
    for t in (1, 2, 3, 4):
        ec.set_level(m, t)
        ref = extract_level(mods[0].weight.detach(), t, mods[0].code_bits) if t <= 3 else mods[0].weight.detach()
        with torch.no_grad():
            _close(mods[0](x), F.linear(x, ref, mods[0].bias), torch.float32)
    assert "resident=all" in repr(mods[0]) or ec.set_level(m, 1) and "resident=all" in repr(mods[0])


def test_from_pretrained_resident_all(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    src, dst = str(tmp_path / "src"), str(tmp_path / "elsa")
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    ec.convert_pretrained(src, dst, levels=[0.9, 0.5], progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, config=ec.pretrained_config(dst, level=1, resident="all"))
    mods = [m for _, m in ec.elsa_modules(model)]
    assert mods and all(m.resident == "all" and m._nested is not None and m.level == 1 for m in mods)
    plain = transformers.AutoModelForCausalLM.from_pretrained(dst)
    assert all(m.resident == "one" for _, m in ec.elsa_modules(plain))
    with pytest.raises(ec.ELSAError, match="resident must be 'one' or 'all'"):
        ec.pretrained_config(dst, resident="most")
