"""LevelEmbedder on tied weights (GPT-2 from a config), DDP / torch.compile wrappers, FSDP names."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import elsa_codec as ec
from elsa_codec import ELSAConfig, LevelEmbedder
from elsa_codec.wrappers import strip_wrapper_prefix, unwrap_model

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))
    return model, ids


def _train_lm(model, emb, ids, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    emb.attach(opt)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("how", ["blocks+head", "linear-only"])
def test_tied_gpt2_one_mask_one_counter(how):
    """The tied lm_head / wte is one tensor: one counter tensor, one mask, frozen values once;
    selecting only the (tied) head no longer fails in freeze_shared."""
    model, ids = _gpt2()
    kw = dict(select="blocks+head") if how == "blocks+head" else dict(filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    emb = LevelEmbedder(model, ELSAConfig(levels=[0.75, 0.5], steps=4, densify_steps=2, seed=0, **kw))
    tied = [n for n in emb.params if n in ("transformer.wte.weight", "lm_head.weight")]
    assert len(tied) == 1
    if how == "linear-only":
        assert list(emb.params) == tied
    _train_lm(model, emb, ids, emb.total_steps)
    res = emb.finalize()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert res.sparsities == pytest.approx([0.75, 0.5], abs=0.02)
    enc = res.encode()
    assert enc.meta.tied  # stored once, served under both names
    served = ec.swap_(_gpt2()[0].eval(), enc)
    plain = _gpt2()[0].eval()
    with torch.no_grad():
        for t in (1, 2, 3):
            ec.set_level(served, t)
            plain.load_state_dict(ec.extract(enc, t), strict=False)
            plain.tie_weights()
            torch.testing.assert_close(served(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_ddp_wrapped_model_embedder_encode_and_load(tmp_path):
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        torch.manual_seed(0)
        ddp = nn.parallel.DistributedDataParallel(Net())
        assert next(iter(ddp.state_dict())).startswith("module.")
        emb = LevelEmbedder(ddp, ELSAConfig(levels=[0.75, 0.5], steps=6, densify_steps=3, seed=0))
        assert list(emb.params) == ["fc1.weight", "fc2.weight"]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        emb.attach(opt)
        g = torch.Generator().manual_seed(0)
        for _ in range(emb.total_steps):
            x = torch.randn(16, 12, generator=g)
            F.cross_entropy(ddp(x), x[:, :3].argmax(1)).backward()
            opt.step()
            opt.zero_grad()
        res = emb.finalize()
        enc = res.encode()
        assert sorted(enc.meta.tensors) == ["fc1.weight", "fc2.weight"]
        path = str(tmp_path / "ddp.safetensors")
        ec.save_file(enc, path)
        torch.manual_seed(1)
        served = nn.parallel.DistributedDataParallel(Net())
        assert ec.load(path, served) is served  # the wrapped model is accepted
        x = torch.randn(5, 12)
        plain = Net()
        for t in (1, 2, 3):
            ec.set_level(served, t)
            plain.load_state_dict(ec.extract(enc, t))
            with torch.no_grad():
                torch.testing.assert_close(served(x), plain(x), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_compiled_model_names_and_load(tmp_path):
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net)  # nothing compiles until a forward pass
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    assert unwrap_model(compiled) is net
    enc = ec.encode(net.state_dict(), ec.magnitude_counters(net, [0.5]))
    ec.swap_(compiled, enc)
    assert isinstance(net.fc1, ec.ELSALinear)


class FakeFSDP(nn.Module):
    """Stands for an FSDP(v1) unit: the wrapped module under ``_fsdp_wrapped_module``."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, x):
        return self._fsdp_wrapped_module(x)


def test_fsdp_style_names_are_mapped_to_the_bare_model():
    assert strip_wrapper_prefix("module._orig_mod.h.0._fsdp_wrapped_module.fc.weight") == "h.0.fc.weight"
    assert strip_wrapper_prefix("encoder.module_list.0.weight") == "encoder.module_list.0.weight"
    torch.manual_seed(0)
    inner = Net()
    inner.fc1 = FakeFSDP(inner.fc1)
    model = FakeFSDP(inner)
    emb = LevelEmbedder(model, ELSAConfig(levels=[0.5], steps=2, filter_fn=lambda m, fqn: isinstance(m, nn.Linear)))
    assert list(emb.params) == ["fc1.weight", "fc2.weight"]
    assert emb.params["fc1.weight"] is inner.fc1._fsdp_wrapped_module.weight
